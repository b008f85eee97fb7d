"""The engine protocol: the only thing an `ExpertActor` knows about mock or vLLM.

An engine turns a `GenerationRequest` into a stream of `Delta`s: text plus the number
of tokens it stands for; the last one carries the finish reason, and the engine's
prompt token count comes with the first. When the consumer is slower than the engine,
an engine merges what piled up into one delta (vLLM's output collector does; the mock
emits every token that came due while it was suspended). Cancellation is
asyncio cancellation: when the actor task is cancelled (`ray.cancel` at a deadline, or
the caller went away) the engine sees `CancelledError` inside `stream()` and must free
whatever the request held (vLLM aborts the request) before re-raising.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict


@dataclass(slots=True)
class Delta:
    """A piece of generated text and what it cost."""

    text: str
    tokens: int = 1
    # Set on the last delta: `stop` (natural end or a stop sequence) or `length`.
    finish_reason: str | None = None
    # The prompt's length in the engine's tokens (on the first delta, when known).
    prompt_tokens: int | None = None


class GenerationRequest(BaseModel):
    """What an engine is asked to generate: one chat turn plus sampling options."""

    model_config = ConfigDict(extra="forbid")

    # Unique per attempt: an engine may still be aborting the previous attempt.
    request_id: str
    # Stable across attempts, so a sampling seed derived from it replays the same text.
    sampling_key: str = ""
    prompt: str
    system_prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int | None = None
    # Larger means sooner; engines with their own scheduler map it (vLLM: lower first).
    priority: int = 0

    def sampling_seed(self) -> int | None:
        """The caller's seed, else one derived from `sampling_key`.

        A retried attempt of the same task then samples the same text, so the executor
        can resume a stream where the failed attempt stopped without a visible seam.
        """
        if self.seed is not None or not self.sampling_key:
            return self.seed
        return int.from_bytes(hashlib.sha256(self.sampling_key.encode()).digest()[:4], "big")


@runtime_checkable
class Engine(Protocol):
    """An async text generator an expert can run."""

    async def start(self) -> None:
        """Load weights / warm up. Called once in the actor before serving."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Yield deltas; raise `EngineError` (retryable) when the engine fails."""

    async def stats(self) -> dict[str, Any]:
        """Counters: requests, active, peak_active, cancelled, plus engine specifics."""

    async def shutdown(self) -> None:
        """Release the engine (GPU memory, background processes)."""
