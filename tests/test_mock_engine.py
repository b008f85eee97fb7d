"""The mock engine on its own (no Ray): determinism and the fault schedule."""

from __future__ import annotations

import asyncio

import pytest

from actors.engines.base import GenerationRequest
from actors.engines.mock import MockEngine
from orchestration.config import MockOptions
from orchestration.errors import EngineError
from tests.conftest import until


def _request(n: int = 0, prompt: str = "hi") -> GenerationRequest:
    return GenerationRequest(request_id=f"r{n}", prompt=prompt, max_tokens=8)


async def _text(engine: MockEngine, request: GenerationRequest) -> str:
    return "".join([d async for d in engine.stream(request)])


async def test_same_inputs_same_text_and_token_count() -> None:
    fast = MockOptions(ttft_s=0, token_latency_s=0, tokens=50)
    a, b = MockEngine("code", fast), MockEngine("code", fast)
    text = await _text(a, _request())
    assert text == await _text(b, _request()) and text.startswith("[code]")
    assert len(text.split()) == 8  # max_tokens caps the configured 50
    assert text != await _text(MockEngine("code", fast.model_copy(update={"seed": 1})), _request())


async def test_fault_schedule_by_request_count() -> None:
    engine = MockEngine("x", MockOptions(ttft_s=0, token_latency_s=0, fail_every=3,
                                         garbage_every=2))
    outcomes = []
    for n in range(1, 7):
        try:
            outcomes.append("garbage" if "[x]" not in await _text(engine, _request(n)) else "ok")
        except EngineError as exc:
            assert "CUDA kernel overload" in str(exc) and f"#{n}" in str(exc)
            outcomes.append("fail")
    assert outcomes == ["ok", "garbage", "fail", "garbage", "ok", "fail"]
    stats = await engine.stats()
    assert (stats["requests"], stats["failed"], stats["completed"], stats["active"]) == (6, 2, 4, 0)


async def test_hang_ends_only_when_cancelled_and_is_counted() -> None:
    engine = MockEngine("x", MockOptions(hang_every=1))
    job = asyncio.ensure_future(_text(engine, _request()))

    async def hanging() -> bool:
        return (await engine.stats())["active"] == 1

    await until(hanging, timeout=5, what="the request to start")
    assert not job.done()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    stats = await engine.stats()
    assert stats["cancelled"] == 1 and stats["active"] == 0


async def test_stats_keep_only_the_latest_requests_seen() -> None:
    from actors.engines.mock import SEEN_LIMIT

    engine = MockEngine("code", MockOptions(ttft_s=0, token_latency_s=0, tokens=1))
    for n in range(SEEN_LIMIT + 10):
        await _text(engine, _request(n))
    stats = await engine.stats()
    assert stats["requests"] == SEEN_LIMIT + 10  # counters still count everything
    assert [rid for rid, _ in stats["seen"]] == [f"r{n}" for n in range(10, SEEN_LIMIT + 10)]
