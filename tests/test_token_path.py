"""Coalescing and the caller's assembly never reorder, lose or duplicate text (no Ray).

Property tests: random token sequences, random producer and consumer timing, random
failure points, retries that resume and fallbacks that restart, and records that
overtake (or lag behind) the text they are about.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.assembly import Assembly
from orchestration.coalesce import Channels, TextChannel
from orchestration.models import ExecutionPlan, ExpertTask, PrimaryDelta, TaskResult, TaskStatus
from orchestration.wire import Closed, Dispatched, Finished, Retrying

TOKENS = st.lists(st.text(min_size=0, max_size=4), min_size=0, max_size=30)


async def _produce(channel: TextChannel, tokens: list[str], delays: list[float],
                   fail_at: int | None) -> str:
    written = []
    for i, token in enumerate(tokens):
        if fail_at is not None and i == fail_at:
            channel.close()  # the engine failed here
            return "".join(written)
        if delays[i % len(delays)]:
            await asyncio.sleep(delays[i % len(delays)])
        channel.put(token, 1)
        written.append(token)
    channel.close()
    return "".join(written)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=TOKENS,
       producer=st.lists(st.sampled_from([0.0, 0.0, 0.001]), min_size=1, max_size=5),
       consumer=st.lists(st.sampled_from([0.0, 0.0005, 0.002]), min_size=1, max_size=5),
       hold=st.sampled_from([0.0, 0.001]), fail=st.none() | st.integers(0, 30),
       offset_frac=st.floats(0, 1), readers=st.integers(1, 3))
def test_batches_concatenate_to_the_written_text(tokens, producer, consumer, hold, fail,
                                                 offset_frac, readers) -> None:
    async def scenario() -> None:
        channel = TextChannel()
        full = "".join(tokens[: fail if fail is not None else len(tokens)])
        offset = int(len(full) * offset_frac)

        async def read(n: int) -> tuple[str, int]:
            out, batches = [], 0
            async for text, _tokens in channel.batches(offset if n == 0 else 0, hold):
                out.append(text)
                batches += 1
                if consumer[batches % len(consumer)]:
                    await asyncio.sleep(consumer[batches % len(consumer)])
            return "".join(out), batches

        results = asyncio.gather(*(read(n) for n in range(readers)))
        written = await _produce(channel, tokens, producer, fail)
        got = await results
        assert written == full
        assert got[0][0] == full[offset:]
        assert all(text == full for text, _ in got[1:])
        assert all(batches <= max(1, len([t for t in tokens if t])) for _, batches in got)

    asyncio.run(scenario())


async def test_a_reader_may_come_before_the_writer_and_an_orphan_ends() -> None:
    channels = Channels(linger_s=0.05, orphan_s=0.05)
    early = channels.read("k1")
    writer = channels.open("k1")
    writer.put("hello ", 1)
    writer.put("world", 1)
    channels.finish("k1")
    assert "".join([t async for t, _ in early]) == "hello world"
    late = channels.read("k1")  # within the linger time: still readable
    assert "".join([t async for t, _ in late]) == "hello world"
    orphan = [t async for t, _ in channels.read("never-written")]
    assert orphan == []
    await asyncio.sleep(0.1)  # past linger and orphan times: both channels forgotten
    assert len(channels) == 0


# ------------------------------------------------------------------ the caller's assembly


def _plan(stream: bool = True) -> ExecutionPlan:
    primary = ExpertTask(id="t1", expert="a", prompt="p", role="primary", stream=stream)
    return ExecutionPlan(request_id="r1", strategy="SERIAL", primary=primary)


def _result(text: str | None, served_by: list[str], ok: bool = True) -> TaskResult:
    return TaskResult(task_id="t1", expert="a", role="primary",
                      status=TaskStatus.SUCCESS if ok else TaskStatus.ERROR, result=text,
                      served_by=served_by, attempts=len(served_by))


WORDS = st.lists(st.sampled_from(["a", "bc", " d", "éf", "🙂", ""]), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(text_a=WORDS, text_b=WORDS, failures=st.lists(st.integers(0, 12), max_size=3),
       a_succeeds=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_deltas_resume_after_retries_restart_after_fallback_and_end_whole(
        text_a, text_b, failures, a_succeeds, seed) -> None:
    """Attempts on expert `a` fail after random prefixes; `a` finally succeeds, or the
    fallback `b` answers. Text arrives in random chunks, late or early, relative to
    the records."""
    rng = random.Random(seed)
    answer = {"a": "".join(text_a), "b": "".join(text_b)}
    attempts = [("a", min(cut, len(answer["a"]))) for cut in failures]
    attempts.append(("a", len(answer["a"])) if a_succeeds else ("b", len(answer["b"])))
    final_expert = attempts[-1][0]

    assembly = Assembly(_plan())
    clock, seq = itertools.count(0, 10), itertools.count()
    pending: list[tuple[float, int, tuple]] = []
    for n, (expert, cut) in enumerate(attempts, start=1):
        at = next(clock)
        heapq.heappush(pending, (at, next(seq), ("dispatched", n, expert, cut)))
        if n < len(attempts):
            heapq.heappush(pending, (at + 5, next(seq), ("retrying", n, expert)))
    served = [e for e, _ in attempts]
    heapq.heappush(pending, (next(clock) - 5, next(seq), (
        "finished", _result(answer[final_expert], served))))
    heapq.heappush(pending, (next(clock), next(seq), ("closed",)))

    deltas: list[PrimaryDelta] = []
    while pending:
        at, _, item = heapq.heappop(pending)
        if item[0] == "dispatched":
            _, n, expert, cut = item
            step = assembly.on_records([Dispatched("t1", n, expert, f"{expert}#0", f"t1:{n}")])
            (order,) = step.read
            text, pos, t = answer[expert][order.offset:cut], 0, at
            while pos < len(text):  # the reader's batches: random sizes, random latency
                size = rng.randint(1, 4)
                t += rng.uniform(0, 8)
                heapq.heappush(pending, (t, next(seq), ("text", order.key, text[pos:pos + size])))
                pos += size
            events = step.events
        elif item[0] == "text":
            events = assembly.on_text("t1", item[1], item[2])
        elif item[0] == "retrying":
            events = assembly.on_records([Retrying("t1", item[1], item[2], 0.2, "boom")]).events
        elif item[0] == "finished":
            events = assembly.on_records([Finished(item[1])]).events
        else:
            events = assembly.on_records([Closed()]).events
        deltas += [e for e in events if isinstance(e, PrimaryDelta)]

    assert [d.attempt for d in deltas] == sorted(d.attempt for d in deltas)
    final = "".join(d.delta for d in deltas if d.expert == final_expert)
    assert final == answer[final_expert]
    if final_expert == "b":  # what `a` had streamed before the fallback: a prefix, once
        assert answer["a"].startswith("".join(d.delta for d in deltas if d.expert == "a"))
