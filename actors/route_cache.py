"""Route vectors kept on the node's disk, so that a router embeds a route only once.

A router embeds every expert's routes when it starts (a few seconds of CPU for the
shipped team's 176 routes): after a crash, a Ray restart, a redeploy, or for a second
team on the same node, it would embed the same sentences with the same model again.
`VectorCache.encode` returns what the cache holds and embeds only the rest.

One file per model, `<folder>/<identity>.npz`: the SHA-256 of each text (`keys`) and
its vector (`vectors`). The identity is the model's name and its file's size and
modification time, so a changed model never reuses old vectors. Writes go to a
temporary file renamed over the old one (atomic: concurrent routers never read half a
file); a file that cannot be read is ignored and rewritten. At most `MAX_ENTRIES`
texts are kept per model (routes are configured, not per request, so this bound is
never reached by traffic). `CHORUS_EMBEDDING_CACHE` names the folder (default
`~/.cache/chorus/embeddings`); `off` turns the cache off. No Ray.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
MAX_ENTRIES = 20_000
ENV = "CHORUS_EMBEDDING_CACHE"


def default_folder() -> Path | None:
    chosen = os.environ.get(ENV, "")
    if chosen.lower() == "off":
        return None
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache/chorus/embeddings"


def identity(name: str, model_file: Path) -> str:
    """A model's name and its file's size and mtime, hashed: which vectors are whose."""
    stat = model_file.stat()
    return hashlib.sha256(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class VectorCache:
    """`encode(texts)` as the model would, from the disk where it can."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], model_id: str,
                 folder: Path | None) -> None:
        self._encode = encode
        self.path = folder / f"{model_id}.npz" if folder is not None else None
        self.hits = self.misses = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        known = self._read()
        missing = list(dict.fromkeys(t for t in texts if _key(t) not in known))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self._encode(missing)
            known.update({_key(t): row for t, row in zip(missing, fresh, strict=True)})
            self._write(known)
        if not texts:
            return self._encode([])
        return np.stack([known[_key(t)] for t in texts]).astype(np.float32)

    def _read(self) -> dict[str, np.ndarray]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as data:
                keys, vectors = data["keys"], data["vectors"]
                return {str(k): v for k, v in zip(keys, vectors, strict=True)}
        except Exception as exc:  # noqa: BLE001 - a damaged cache is only a slower start
            log.warning("embedding cache %s unreadable (%s): embedding anew", self.path, exc)
            return {}

    def _write(self, known: dict[str, np.ndarray]) -> None:
        if self.path is None:
            return
        items = list(known.items())[-MAX_ENTRIES:]
        temp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz.tmp")
            with os.fdopen(fd, "wb") as out:
                np.savez(out, keys=np.array([k for k, _ in items], dtype="<U64"),
                         vectors=np.stack([v for _, v in items]).astype(np.float32))
            os.replace(temp, self.path)
        except OSError as exc:  # a read-only home: serve anyway, without the cache
            log.warning("embedding cache %s not written (%s)", self.path, exc)
            if temp is not None and os.path.exists(temp):
                os.unlink(temp)
            self.path = None
