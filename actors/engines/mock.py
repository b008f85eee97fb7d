"""The mock engine: deterministic text, real streaming latency, and the seeds' faults.

Faults follow the request counter, as in the seed's `mockWebLLMEngine`: every
`fail_every`-th request raises a simulated CUDA error, every `slow_every`-th sleeps
`slow_s` first, every `crash_every`-th exits the process mid-generation (as a CUDA
fault would), every `hang_every`-th never finishes until cancelled, and every
`garbage_every`-th emits noise. The counter lives in the process, so it restarts from
zero when Ray restarts a crashed actor.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from actors.engines.base import GenerationRequest
from orchestration.config import MockOptions
from orchestration.errors import EngineError

SEEN_LIMIT = 64
_WORDS = ["the", "answer", "draws", "on", "careful", "reasoning", "about", "structure", "data", "systems", "models", "latency", "throughput", "memory", "experts", "routing", "cluster", "tokens", "streams", "results", "quality", "evidence", "context", "because", "therefore", "however", "first", "second", "finally"]


def mock_text(expert: str, prompt: str, seed: int, tokens: int) -> list[str]:
    """Deterministic tokens for (expert, prompt, seed): same inputs, same words."""
    digest = hashlib.sha256(f"{expert}\x00{prompt}\x00{seed}".encode()).digest()
    rng = random.Random(digest)
    words = [f"[{expert}]"] + [rng.choice(_WORDS) for _ in range(max(tokens - 1, 0))]
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)]


class MockEngine:
    """A fault-injecting stand-in for an LLM engine, counting what happens to it."""

    def __init__(self, name: str, options: MockOptions) -> None:
        self.name = name
        self.options = options
        self.requests = 0
        self.active = 0
        self.peak_active = 0
        self.cancelled = 0
        self.completed = 0
        self.failed = 0
        # (request_id, priority) of the latest requests, in the order they reached the
        # engine; bounded because `/v1/stats` (polled every second by /ops) returns it.
        self.seen: deque[tuple[str, int]] = deque(maxlen=SEEN_LIMIT)

    async def start(self) -> None:
        return None

    def _due(self, every: int, n: int) -> bool:
        return every > 0 and n % every == 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        opts = self.options
        self.requests += 1
        n = self.requests
        self.seen.append((request.request_id, request.priority))
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            if self._due(opts.fail_every, n):
                await asyncio.sleep(0.05)
                self.failed += 1
                raise EngineError(f"{self.name}: {opts.fail_message} (request #{n})")
            if self._due(opts.crash_every, n):
                await asyncio.sleep(opts.ttft_s)
                os._exit(17)  # a CUDA fault takes the whole worker process down
            if self._due(opts.hang_every, n):
                await asyncio.Event().wait()
            if self._due(opts.slow_every, n):
                await asyncio.sleep(opts.slow_s)
            await asyncio.sleep(opts.ttft_s)
            seed = opts.seed if request.seed is None else request.seed
            text = mock_text(self.name, request.prompt, seed, min(opts.tokens, request.max_tokens))
            if self._due(opts.garbage_every, n):
                rng = random.Random(n)
                text = ["".join(chr(rng.randint(0x21, 0x2FF)) for _ in range(6)) for _ in text]
            if opts.inject:
                size = opts.inject_chunk or len(opts.inject)
                text += [opts.inject[i : i + size] for i in range(0, len(opts.inject), size)]
            for i, token in enumerate(text):
                if i:
                    await asyncio.sleep(opts.token_latency_s)
                yield token
            self.completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            # The deadline or a caller that went away: count it so tests can verify
            # that cancellation really reached the engine.
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def stats(self) -> dict[str, Any]:
        return {
            "engine": "mock",
            "requests": self.requests,
            "active": self.active,
            "peak_active": self.peak_active,
            "cancelled": self.cancelled,
            "completed": self.completed,
            "failed": self.failed,
            "seen": list(self.seen),
        }

    async def shutdown(self) -> None:
        return None
