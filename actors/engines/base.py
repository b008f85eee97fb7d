"""The engine protocol: the only thing an `ExpertActor` knows about mock or vLLM.

An engine turns a `GenerationRequest` into a stream of `Delta`s: text plus the number
of tokens it stands for (and their logprobs, when asked); the last delta of each choice
carries its finish reason, and the engine's prompt token count comes with the first.
With `sampling.n` > 1 the deltas of the choices interleave, told apart by `index`.
When the consumer is slower than the engine, an engine merges what piled up into one
delta (vLLM's output collector does; the mock emits every token that came due while it
was suspended). Cancellation is asyncio cancellation: when the actor task is cancelled (`ray.cancel` at a deadline, or
the caller went away) the engine sees `CancelledError` inside `stream()` and must free
whatever the request held (vLLM aborts the request) before re-raising.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestration.generation import Sampling


@dataclass(slots=True)
class Delta:
    """A piece of generated text of one choice and what it cost."""

    text: str
    tokens: int = 1
    # Set on the last delta of a choice: `stop` (natural end or a stop sequence) or `length`.
    finish_reason: str | None = None
    # The prompt's length in the engine's tokens (on the first delta, when known); with
    # a `prefix`, the prompt includes it.
    prompt_tokens: int | None = None
    # A continuation's `prefix` in the engine's tokens (on the first delta).
    prefix_tokens: int | None = None
    # Which choice (0 .. n-1) this piece belongs to.
    index: int = 0
    # When asked: one entry per token of this delta, OpenAI's chat shape
    # ({token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}).
    logprobs: list[dict[str, Any]] | None = None


class GenerationRequest(BaseModel):
    """What an engine is asked to generate: a conversation (or a raw prompt) plus sampling."""

    model_config = ConfigDict(extra="forbid")

    # Unique per attempt: an engine may still be aborting the previous attempt.
    request_id: str
    # Stable across attempts, so a sampling seed derived from it replays the same text.
    sampling_key: str = ""
    # The chat turns (system first, see orchestration.generation.chat_turns), rendered
    # with the model's chat template; or `prompt`, the model's raw input (no template).
    messages: list[dict[str, Any]] = Field(default_factory=list)
    prompt: str | None = None
    # The start of the answer, already delivered (a failed attempt's): the engine
    # continues it — the final assistant turn of the chat, or text appended to a raw
    # prompt — and yields only what follows. `max_tokens` counts the prefix's tokens.
    prefix: str = ""
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    # Larger means sooner; engines with their own scheduler map it (vLLM: lower first).
    rank: int = 0

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if bool(self.messages) == (self.prompt is not None):
            raise ValueError("give messages or a raw prompt, exactly one")
        return self

    def key_text(self) -> str:
        """The conversation without its system turn (or the raw prompt), as one text."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(str(m.get("content") or "") for m in self.messages
                         if m.get("role") != "system")

    def sampling_seed(self) -> int | None:
        """The caller's seed, else one derived from `sampling_key`.

        Every attempt of one task samples with the same seed (a continuation picks up
        the same sampling stream's style; a retry that starts over replays its text).
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
