"""The mock engine: deterministic text, real streaming latency, and the seeds' faults.

Faults follow the request counter, as in the seed's `mockWebLLMEngine`: every
`fail_every`-th request raises a simulated CUDA error, every `slow_every`-th sleeps
`slow_s` first, every `crash_every`-th exits the process mid-generation (as a CUDA
fault would), every `hang_every`-th never finishes until cancelled, and every
`garbage_every`-th emits noise; a fault strikes before the first token, or after
`fault_after_tokens` of them. A request with a `prefix` continues it with more words
(no expert marker), up to `tokens` in all. The counter lives in the process, so it restarts from
zero when Ray restarts a crashed actor.

Tokens come due on a schedule (`ttft_s`, then one every `token_latency_s`); each
delta carries every token that is due when the consumer asks, so a slow consumer gets
fewer, bigger deltas, as from vLLM. It honours `max_tokens`, `stop` (the text ends
before the stop string) and `n` (choice i samples with seed + i); a JSON response
format or a forced tool choice gets a value valid against the schema, and `tools` with
`tool_choice: auto` a Hermes `<tool_call>` text for the expert's tool parser. Logprobs
are deterministic stand-ins; the other sampling parameters change nothing (there is no
distribution to shape). State is bounded: counters plus the last
`HISTORY` requests (`seen`, for tests of dispatch order).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from actors.engines.base import Delta, GenerationRequest
from orchestration.config import MockOptions
from orchestration.errors import EngineError
from orchestration.tools import example_instance, json_constraint

HISTORY = 256
_WORDS = ["the", "answer", "draws", "on", "careful", "reasoning", "about", "structure", "data", "systems", "models", "latency", "throughput", "memory", "experts", "routing", "cluster", "tokens", "streams", "results", "quality", "evidence", "context", "because", "therefore", "however", "first", "second", "finally"]


def mock_text(expert: str, prompt: str, seed: int, tokens: int) -> list[str]:
    """Deterministic tokens for (expert, prompt, seed): same inputs, same words."""
    digest = hashlib.sha256(f"{expert}\x00{prompt}\x00{seed}".encode()).digest()
    rng = random.Random(digest)
    words = [f"[{expert}]"] + [rng.choice(_WORDS) for _ in range(max(tokens - 1, 0))]
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)]


def continuation(expert: str, prompt: str, prefix: str, seed: int, tokens: int) -> list[str]:
    """Deterministic words that continue `prefix` (no expert marker: the answer goes on)."""
    digest = hashlib.sha256(f"{expert}\x00{prompt}\x00{prefix}\x00{seed}".encode()).digest()
    rng = random.Random(digest)
    return [f" {rng.choice(_WORDS)}" for _ in range(max(tokens, 0))]


def count_tokens(request: GenerationRequest) -> int:
    """The mock's prompt tokens: whitespace-separated words of every turn (or the raw
    prompt), and of the prefix a continuation continues."""
    words = len(request.prefix.split())
    if request.prompt is not None:
        return words + len(request.prompt.split())
    return words + sum(len(str(m.get("content") or "").split()) for m in request.messages)


def _pieces(text: str, size: int = 4) -> list[str]:
    """Structured answers travel as tokens of `size` characters."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def _logprob(token: str, choice: int, position: int, top: int) -> dict[str, Any]:
    """A deterministic, well-formed logprob entry (the mock has no distribution)."""
    value = -round(0.05 * ((position + choice) % 7 + 1), 4)
    entry = {"token": token, "logprob": value, "bytes": list(token.encode())}
    alternatives = [{"token": f" {w}", "logprob": value - 1 - k, "bytes": list(f" {w}".encode())}
                    for k, w in enumerate(_WORDS[: max(top - 1, 0)])]
    return {**entry, "top_logprobs": ([dict(entry)] + alternatives)[:top]}


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
        self.tokens_out = 0  # tokens produced (delivered in deltas), all requests
        # (request_id, rank) of the last HISTORY requests, in arrival order.
        self.seen: deque[tuple[str, int]] = deque(maxlen=HISTORY)

    async def start(self) -> None:
        """What loading a model costs, every start and restart (`mock.startup_s`)."""
        if self.options.startup_s:
            await asyncio.sleep(self.options.startup_s)

    def _due(self, every: int, n: int) -> bool:
        return every > 0 and n % every == 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        opts = self.options
        self.requests += 1
        n = self.requests
        self.seen.append((request.request_id, request.rank))
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        fault = next((kind for kind, every in (("fail", opts.fail_every),
                                               ("crash", opts.crash_every),
                                               ("hang", opts.hang_every))
                      if self._due(every, n)), None)
        try:
            if fault is not None and not opts.fault_after_tokens:
                await self._strike(fault, n)
            if self._due(opts.slow_every, n):
                await asyncio.sleep(opts.slow_s)
            await asyncio.sleep(opts.ttft_s)
            sent = 0
            cut = opts.fault_after_tokens if fault is not None else None
            async for delta in self._deltas(request, n, cut):
                yield delta
                sent += delta.tokens
                if fault is not None and sent >= opts.fault_after_tokens:
                    await self._strike(fault, n)  # mid-stream (once: it never returns)
            self.completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            # The deadline or a caller that went away: count it so tests can verify
            # that cancellation really reached the engine.
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _strike(self, fault: str, n: int) -> None:
        """The scheduled fault of request #n: raise, exit the process, or hang."""
        if fault == "fail":
            await asyncio.sleep(0.05)
            self.failed += 1
            raise EngineError(f"{self.name}: {self.options.fail_message} (request #{n})")
        if fault == "crash":
            await asyncio.sleep(self.options.ttft_s)
            os._exit(17)  # a CUDA fault takes the whole worker process down
        await asyncio.Event().wait()  # hang: until cancelled

    def _tokens(self, request: GenerationRequest, n: int, choice: int) -> list[str]:
        """Every token this choice would produce if nothing cut it."""
        opts = self.options
        seed = (opts.seed if request.seed is None else request.seed) + choice
        constraint = json_constraint(request.sampling)
        if constraint is not None:  # structured output: a value valid against the schema
            value = (example_instance(constraint["json"]) if "json" in constraint else
                     {"answer": "".join(mock_text(self.name, request.key_text(), seed, 4))})
            return _pieces(json.dumps(value))
        if request.sampling.calls_tools:  # auto: Hermes-style text for the expert's parser
            tool = request.sampling.tools[0].function  # type: ignore[index]
            call = {"name": tool.name, "arguments": example_instance(tool.parameters)}
            return _pieces(f"<tool_call>{json.dumps(call)}</tool_call>")
        if request.prefix:  # a continuation: as many more words as the answer lacks
            have = len(request.prefix.split())
            return continuation(self.name, request.key_text(), request.prefix, seed,
                                opts.tokens - have)
        text = mock_text(self.name, request.key_text(), seed, opts.tokens)
        if self._due(opts.garbage_every, n):
            rng = random.Random(n)
            text = ["".join(chr(rng.randint(0x21, 0x2FF)) for _ in range(6)) for _ in text]
        if opts.inject:
            size = opts.inject_chunk or len(opts.inject)
            text += [opts.inject[i : i + size] for i in range(0, len(opts.inject), size)]
        return text

    def _choice(self, request: GenerationRequest, n: int, choice: int) -> tuple[list[str], str]:
        """The tokens this choice emits and why it ends: `max_tokens`, then `stop`."""
        tokens = self._tokens(request, n, choice)
        reason = "stop"
        room = request.max_tokens - len(request.prefix.split())  # the prefix counts
        if len(tokens) > room:
            tokens, reason = tokens[: max(room, 0)], "length"
        text = "".join(tokens)
        cuts = [text.find(s) for s in request.sampling.stop if s in text]
        if cuts:  # like vLLM: the text ends before the stop string, which is not sent
            end, kept, length = min(cuts), [], 0
            for token in tokens:
                if length >= end:
                    break
                kept.append(token[: end - length])
                length += len(token)
            tokens, reason = kept, "stop"
        return tokens, reason

    async def _deltas(self, request: GenerationRequest, n: int,
                      cut: int | None = None) -> AsyncIterator[Delta]:
        """Token i is due at start + i x latency; each delta takes every token due now,
        but never past token `cut` (a fault strikes there, at the same token every time).
        Choices (`sampling.n`) are generated one after another."""
        prompt_tokens = count_tokens(request)
        latency = self.options.token_latency_s
        loop = asyncio.get_running_loop()
        for choice in range(request.sampling.n):
            tokens, reason = self._choice(request, n, choice)
            start = loop.time()
            i = 0
            while i < len(tokens) or i == 0:
                wait = start + i * latency - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = loop.time()
                j = min(i + 1, len(tokens))
                while j < len(tokens) and start + j * latency <= now and j != cut:
                    j += 1
                last = j == len(tokens)
                self.tokens_out += j - i
                logprobs = ([_logprob(t, choice, k, request.sampling.top_logprobs)
                             for k, t in enumerate(tokens[i:j], i)]
                            if request.sampling.logprobs else None)
                first = i == 0 and choice == 0
                yield Delta("".join(tokens[i:j]), j - i, finish_reason=reason if last else None,
                            prompt_tokens=prompt_tokens if first else None,
                            prefix_tokens=len(request.prefix.split()) if first else None,
                            index=choice, logprobs=logprobs)
                if last:
                    break
                i = j

    async def stats(self) -> dict[str, Any]:
        return {
            "engine": "mock",
            "requests": self.requests,
            "active": self.active,
            "peak_active": self.peak_active,
            "cancelled": self.cancelled,
            "completed": self.completed,
            "failed": self.failed,
            "tokens_out": self.tokens_out,
        }

    def history(self) -> list[tuple[str, int]]:
        """(request_id, rank) of the last requests, in the order they arrived."""
        return list(self.seen)

    async def shutdown(self) -> None:
        return None
