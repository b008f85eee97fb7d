"""Coalescing and the caller's assembly never reorder, lose or duplicate text (no Ray).

Property tests: random token sequences, random producer and consumer timing, random
failure points, retries and fallbacks that continue the answer, and records that
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
from orchestration.models import (
    ExecutionPlan,
    ExpertTask,
    PrimaryDelta,
    TaskEvent,
    TaskResult,
    TaskStatus,
)
from orchestration.wire import Closed, Dispatched, Finished, Handoff, Retrying

TOKENS = st.lists(st.text(min_size=0, max_size=4), min_size=0, max_size=30)


async def _produce(channels: Channels, channel: TextChannel, tokens: list[str],
                   delays: list[float], fail_at: int | None) -> str:
    written = []
    for i, token in enumerate(tokens):
        if fail_at is not None and i == fail_at:
            break  # the engine failed here
        if delays[i % len(delays)]:
            await asyncio.sleep(delays[i % len(delays)])
        channels.put(channel, token, 1)
        written.append(token)
    channels.finish(channel)
    return "".join(written)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams=st.lists(TOKENS, min_size=1, max_size=4),
       producer=st.lists(st.sampled_from([0.0, 0.0, 0.001]), min_size=1, max_size=5),
       consumer=st.lists(st.sampled_from([0.0, 0.0005, 0.002]), min_size=1, max_size=5),
       hold=st.sampled_from([0.0, 0.001]), fail=st.none() | st.integers(0, 30),
       early=st.integers(0, 4))
def test_a_session_sends_each_channel_whole_in_order_and_nothing_of_others(
        streams, producer, consumer, hold, fail, early) -> None:
    """Several attempts of one caller on one replica, written concurrently; another
    caller's attempt beside them; the session opens after `early` tokens were written."""

    async def scenario() -> None:
        channels = Channels(linger_s=5)
        mine = [channels.open(f"t{i}:1", "me") for i in range(len(streams))]
        other = channels.open("x:1", "someone else")
        channels.put(other, "not yours", 1)
        for channel, tokens in zip(mine, streams, strict=True):
            for token in tokens[:early]:  # text written before the session opened
                channels.put(channel, token, 1)
        got: dict[str, list[str]] = {c.key: [] for c in mine}
        batches = 0

        async def read() -> None:
            nonlocal batches
            async for batch in channels.session("me", hold):
                batches += 1
                for key, text, _tokens in batch:
                    got[key].append(text)
                if consumer[batches % len(consumer)]:
                    await asyncio.sleep(consumer[batches % len(consumer)])

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0)
        written = await asyncio.gather(*(
            _produce(channels, c, tokens[early:], producer, fail)
            for c, tokens in zip(mine, streams, strict=True)))
        wanted = {c.key: "".join(t[:early]) + rest
                  for c, t, rest in zip(mine, streams, written, strict=True)}
        for _ in range(2000):  # until the session handed over every piece (or give up)
            if all("".join(got[key]) == text for key, text in wanted.items()):
                break
            await asyncio.sleep(0.001)
        reader.cancel()
        for key, text in wanted.items():
            assert "".join(got[key]) == text
        total = sum(len(tokens) for tokens in streams)
        assert batches <= max(1, total)  # never more objects than writes
        assert len(channels) == 1  # only the other caller's channel waits for its session

    asyncio.run(scenario())


async def test_text_written_before_its_session_opens_lingers_then_goes() -> None:
    channels = Channels(linger_s=0.05)
    early = channels.open("k1:1", "me")
    channels.put(early, "hello ", 1)
    channels.put(early, "world", 1)
    channels.finish(early)  # ended before the caller opened its session
    session = channels.session("me", 0.0)
    assert await asyncio.wait_for(session.__anext__(), 1) == [("k1:1", "hello world", 2)]
    late = channels.open("k2:1", "me")
    channels.put(late, "again", 1)
    assert await asyncio.wait_for(session.__anext__(), 1) == [("k2:1", "again", 1)]
    channels.finish(late)
    assert len(channels) == 0  # handed to the open session: nothing kept
    await session.aclose()
    orphan = channels.open("k3:1", "me")
    channels.put(orphan, "nobody reads", 1)
    channels.finish(orphan)
    await asyncio.sleep(0.1)  # past the linger time: forgotten
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
ATTEMPTS = st.lists(st.tuples(st.sampled_from(["a", "b"]), WORDS, st.integers(0, 12),
                              st.booleans()), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(attempts=ATTEMPTS, seed=st.integers(0, 2**32 - 1))
def test_the_callers_text_is_always_a_prefix_of_the_answer_and_ends_equal_to_it(
        attempts, seed) -> None:
    """Attempts fail at random points (the last succeeds), on `a` or its fallback `b`;
    each failure's hand-off knows the answer so far (the expert said) or asks the
    caller. Each attempt continues the answer so far with its own words. Text arrives
    in random pieces, early (before its `Dispatched`) or late (after its hand-off, or
    the task's result). The caller's text is a prefix of the final answer at every
    step, and equal to it at the end; no attempt's text is sent twice."""
    rng = random.Random(seed)
    experts = sorted(expert for expert, *_ in attempts)  # `a` first, then the fallback
    pending: list[tuple[float, int, tuple]] = []
    seq = itertools.count()
    prefix = {1: ""}  # attempt -> the answer it continues
    final: list[str] = []
    deltas: list[PrimaryDelta] = []
    sent_after: list[str] = []  # the caller's text after every step

    def schedule(n: int, at: float) -> None:
        _, words, cut, known = attempts[n - 1]
        expert, last = experts[n - 1], n == len(attempts)
        generated = words if last else words[:cut]
        heapq.heappush(pending, (at, next(seq), ("dispatched", n, expert)))
        t = at - 3
        for piece in generated:
            t += rng.uniform(0, 8)
            heapq.heappush(pending, (t, next(seq), ("text", f"t1:{n}", piece)))
        if last:
            answer = prefix[n] + "".join(words)
            final.append(answer)
            heapq.heappush(pending, (at + rng.uniform(0, 20), next(seq), (
                "finished", _result(answer, experts))))
        else:
            handoff = prefix[n] + "".join(generated) if known else None
            heapq.heappush(pending, (at + rng.uniform(0, 20), next(seq), ("handoff", n, handoff)))

    assembly = Assembly(_plan())
    schedule(1, 0)
    while pending:
        now, _, item = heapq.heappop(pending)
        if item[0] == "dispatched":
            _, n, expert = item
            step = assembly.on_records([Dispatched("t1", n, expert, f"{expert}#0", f"t1:{n}",
                                                   f"actor-{expert}")])
            assert step.read == [f"actor-{expert}"]
            events = step.events
        elif item[0] == "text":
            events = assembly.on_text(item[1], item[2])
        elif item[0] == "handoff":
            _, n, known = item
            step = assembly.on_records([Handoff("t1", n, known),
                                        Retrying("t1", n, experts[n - 1], 0.2, "boom")])
            if known is None:  # the caller says what it has: the next attempt continues it
                assert [(task, attempt) for task, attempt, _ in step.replies] == [("t1", n)]
                prefix[n + 1] = step.replies[0][2]
            else:
                assert step.replies == []
                prefix[n + 1] = known
            events = step.events
            schedule(n + 1, now + 2)
        elif item[0] == "finished":
            events = assembly.on_records([Finished(item[1])]).events
            heapq.heappush(pending, (now + 30, next(seq), ("closed",)))
        else:
            events = assembly.on_records([Closed()]).events
        deltas += [e for e in events if isinstance(e, PrimaryDelta)]
        sent_after.append("".join(d.delta for d in deltas))

    (answer,) = final
    assert all(answer.startswith(sent) for sent in sent_after)
    assert sent_after[-1] == answer
    assert all(answer.startswith(p) for p in prefix.values())
    assert [d.attempt for d in deltas] == sorted(d.attempt for d in deltas)


@settings(max_examples=300, deadline=None)
@given(words=WORDS, hedge_wins=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_a_hedged_attempt_and_its_hedge_give_the_caller_one_answer(
        words, hedge_wins, seed) -> None:
    """Attempt 1 is held and hedged by attempt 2 (docs/hedging.md); only the winner
    sends text (the gate), in random pieces that may come before either `Dispatched`
    record or after the result. The caller's text is the winner's, a prefix of the
    answer at every step and equal to it at the end, each delta with the winner's
    attempt; the hedge's record says `hedged`."""
    rng = random.Random(seed)
    winner = 2 if hedge_wins else 1
    answer = "".join(words)
    # Each path keeps its order (one session each): the records (both `Dispatched`,
    # then the result) and the winner's text; the two interleave at random.
    kinds = ["record"] * 3 + ["text"] * len(words)
    rng.shuffle(kinds)
    records = iter([("dispatched", 1), ("dispatched", 2), ("finished",)])
    texts = iter(words)
    order = [next(records) if kind == "record" else ("text", next(texts)) for kind in kinds]
    assembly = Assembly(_plan())
    deltas: list[PrimaryDelta] = []
    events: list = []
    replicas = {1: "a#0", 2: "a#1"}
    for item in order:
        if item[0] == "dispatched":
            n = item[1]
            step = assembly.on_records([Dispatched("t1", n, "a", replicas[n], f"t1:{n}",
                                                   f"actor-{n}", hedged=n == 2)])
            assert step.read == [f"actor-{n}"]
            new = step.events
        elif item[0] == "text":
            new = assembly.on_text(f"t1:{winner}", item[1])
        else:
            result = _result(answer, ["a", "a"]).model_copy(
                update={"hedges": ["won" if hedge_wins else "lost"]})
            new = assembly.on_records([Finished(result)]).events
        events += new
        deltas += [e for e in new if isinstance(e, PrimaryDelta)]
        assert answer.startswith("".join(d.delta for d in deltas))
    assert "".join(d.delta for d in deltas) == answer
    assert {d.attempt for d in deltas} <= {winner}
    running = [e for e in events if isinstance(e, TaskEvent)]
    assert [(e.attempt, e.hedged) for e in running] == [(1, False), (2, True)]
