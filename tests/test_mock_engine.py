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
    return GenerationRequest(request_id=f"r{n}", messages=[{"role": "user", "content": prompt}],
                             max_tokens=8)


async def _text(engine: MockEngine, request: GenerationRequest) -> str:
    return "".join([d.text async for d in engine.stream(request)])


async def test_deltas_carry_token_counts_and_the_finish_reason() -> None:
    engine = MockEngine("x", MockOptions(ttft_s=0, token_latency_s=0.001, tokens=12))
    capped = [d async for d in engine.stream(_request())]  # max_tokens 8 < 12 tokens
    assert sum(d.tokens for d in capped) == 8 and capped[-1].finish_reason == "length"
    assert [d.finish_reason for d in capped[:-1]] == [None] * (len(capped) - 1)
    assert capped[0].prompt_tokens == 1  # "hi"
    whole = [d async for d in engine.stream(
        GenerationRequest(request_id="r", messages=[{"role": "user", "content": "hi there"}],
                          max_tokens=100))]
    assert sum(d.tokens for d in whole) == 12 and whole[-1].finish_reason == "stop"


async def test_a_slow_consumer_gets_fewer_bigger_deltas_with_the_same_text() -> None:
    engine = MockEngine("x", MockOptions(ttft_s=0, token_latency_s=0.01, tokens=8))
    fast = [d async for d in engine.stream(_request())]
    slow = []
    async for delta in engine.stream(_request()):
        slow.append(delta)
        await asyncio.sleep(0.05)  # a busy consumer: tokens come due meanwhile
    assert "".join(d.text for d in slow) == "".join(d.text for d in fast)
    assert sum(d.tokens for d in slow) == 8 and len(slow) < 8 and max(d.tokens for d in slow) > 1
    assert engine.tokens_out == 16


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


async def test_history_keeps_only_the_latest_requests() -> None:
    from actors.engines.mock import HISTORY

    engine = MockEngine("code", MockOptions(ttft_s=0, token_latency_s=0, tokens=1))
    for n in range(HISTORY + 10):
        await _text(engine, _request(n))
    assert (await engine.stats())["requests"] == HISTORY + 10  # counters count everything
    assert [rid for rid, _ in engine.history()] == [f"r{n}" for n in range(10, HISTORY + 10)]
    assert "seen" not in await engine.stats()  # /v1/stats stays the same size


async def test_a_prefix_is_continued_with_more_words_and_no_new_marker() -> None:
    engine = MockEngine("x", MockOptions(ttft_s=0, token_latency_s=0, tokens=10))
    whole = await _text(engine, _request())
    prefix = " ".join(whole.split(" ")[:3])  # its first 3 tokens
    request = _request().model_copy(update={"prefix": prefix, "max_tokens": 100})
    deltas = [d async for d in engine.stream(request)]
    more = "".join(d.text for d in deltas)
    assert more.startswith(" ") and "[x]" not in more and len(more.split()) == 7
    assert deltas[0].prefix_tokens == 3 and deltas[0].prompt_tokens == 1 + 3
    assert more == await _text(engine, request)  # deterministic
    capped = [d async for d in engine.stream(request.model_copy(update={"max_tokens": 5}))]
    assert sum(d.tokens for d in capped) == 2 and capped[-1].finish_reason == "length"


async def test_a_fault_can_strike_mid_stream() -> None:
    engine = MockEngine("x", MockOptions(ttft_s=0, token_latency_s=0, tokens=10,
                                         fail_every=1, fault_after_tokens=4))
    got: list[str] = []
    with pytest.raises(EngineError):
        async for delta in engine.stream(_request().model_copy(update={"max_tokens": 10})):
            got.append(delta.text)
    assert len("".join(got).split()) == 4 and engine.failed == 1  # at the 4th token, always
