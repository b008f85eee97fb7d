"""Hedging a slow first token in the task runner, without Ray: a fake plays the replicas.

Each fake attempt waits for its first token (a replica's scripted TTFT, or until a test
releases it), claims it from the runner when it is held (as `ExpertActor.run` does from
the executor), and only then "sends" text; the loser of a race is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from orchestration.config import HedgeConfig, RetryConfig
from orchestration.errors import EngineError, ExpertUnavailableError, TaskCancelledError
from orchestration.hedging import HedgePolicy, Race
from orchestration.latency import RecentLatency
from orchestration.models import ExpertTask, TaskStatus
from orchestration.task_runner import TaskRun, TaskRunner
from orchestration.wire import Completion, Dispatched

FAST = RetryConfig(attempts=2, initial_wait_s=0.001, jitter=0)


@dataclass
class Lease:
    expert: str
    replica: str
    actor: str = ""
    outcome: str = "cancelled"


@dataclass
class Replicas:
    """Replicas `a#0`, `a#1`, ... of expert `a`; `ttft[label]` is each one's first-token
    delay (None: it waits for `release(key)`); `fail[label]`: it fails before a token."""

    ttft: dict[str, float | None]
    fail: set[str] = field(default_factory=set)
    capacity: int = 1  # per replica
    runner: TaskRunner | None = None
    active: dict[str, int] = field(default_factory=dict)  # replica -> attempts running
    held: set[str] = field(default_factory=set)  # attempt keys that claim their token
    tokenless: set[str] = field(default_factory=set)
    sent: list[str] = field(default_factory=list)  # keys that sent text, in order
    cancelled: list[str] = field(default_factory=list)
    slots: int = 0
    spare_slots: int = 0
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def _free(self, avoid: frozenset[str]) -> str | None:
        free = [r for r in self.ttft if r not in avoid and self.active.get(r, 0) < self.capacity]
        return min(free, key=lambda r: self.active.get(r, 0), default=None)

    @asynccontextmanager
    async def slot(self, expert: str, task: ExpertTask, avoid: frozenset[str] = frozenset(),
                   spare: bool = False) -> AsyncIterator[Lease]:
        label = self._free(avoid)
        if label is None:
            raise ExpertUnavailableError(f"{expert}: no replica")
        self.slots += 1
        self.spare_slots += spare
        self.active[label] = self.active.get(label, 0) + 1
        try:
            yield Lease(expert, label)
        finally:
            self.active[label] -= 1
            self.slots -= 1
            self.spare_slots -= spare

    def spare(self, expert: str, task: ExpertTask, avoid: frozenset[str]) -> bool:
        return self._free(avoid) is not None

    def others(self, expert: str, avoid: frozenset[str]) -> bool:
        return any(r not in avoid for r in self.ttft)

    def live(self, task: ExpertTask) -> bool:
        return False

    async def delivered(self, task: ExpertTask, attempt: int) -> str:
        raise AssertionError("not live")

    async def hold(self, lease: Lease, key: str) -> bool:
        await asyncio.sleep(0)  # an RPC
        if key not in self.tokenless:
            return False
        self.held.add(key)
        return True

    def release(self, key: str) -> None:
        self.gates.setdefault(key, asyncio.Event()).set()

    async def invoke(self, lease: Lease, task: ExpertTask, key: str,
                     gated: bool = False) -> Completion:
        assert self.runner is not None
        self.tokenless.add(key)
        if gated:
            self.held.add(key)
        try:
            delay = self.ttft[lease.replica]
            if delay is None:
                await self.gates.setdefault(key, asyncio.Event()).wait()
            else:
                await asyncio.sleep(delay)
            if lease.replica in self.fail:
                raise EngineError(f"a: {lease.replica} failed")
            self.tokenless.discard(key)
            if key in self.held and not self.runner.claim(key):
                raise TaskCancelledError("lost to its hedge")
            self.sent.append(key)
            return Completion(text=f"from {lease.replica}", completion_tokens=3,
                              prompt_tokens=2, ttft_s=delay, replica=lease.replica)
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        finally:
            self.tokenless.discard(key)


def _runner(replicas: Replicas, records: list | None = None, after_s: float | str = 0.05,
            max_fraction: float = 1.0, outcomes: list | None = None) -> TaskRunner:
    runner = TaskRunner(
        replicas, FAST, {},
        (lambda task, record: records.append(record)) if records is not None
        else (lambda task, record: None),
        HedgeConfig(enabled=True, after_s=after_s, max_fraction=max_fraction),
        (lambda expert, outcome: outcomes.append(outcome)) if outcomes is not None
        else (lambda expert, outcome: None))
    replicas.runner = runner
    return runner


def _task(n: int = 0) -> ExpertTask:
    return ExpertTask(id=f"t{n}", expert="a", prompt="p", role="primary", timeout_s=10)


async def test_a_slow_first_token_is_hedged_and_the_hedge_wins() -> None:
    replicas, records, outcomes = Replicas({"a#0": 5.0, "a#1": 0.0}), [], []
    runner = _runner(replicas, records, outcomes=outcomes)
    result = await runner.run(TaskRun(_task()))
    assert result.ok and result.result == "from a#1"
    assert records == [Dispatched("t0", 1, "a", "a#0", "t0:1"),
                       Dispatched("t0", 2, "a", "a#1", "t0:2", hedged=True)]
    assert replicas.sent == ["t0:2"] and replicas.cancelled == ["t0:1"]
    assert (result.attempts, result.replicas, result.hedges) == (2, ["a#0", "a#1"], ["won"])
    assert outcomes == ["won"] and runner.counters["hedges_won"] == 1
    assert replicas.slots == 0 and not runner.races


async def test_the_held_attempt_that_claims_first_wins_and_the_hedge_is_cancelled() -> None:
    replicas, outcomes = Replicas({"a#0": None, "a#1": None}), []
    runner = _runner(replicas, outcomes=outcomes)
    job = asyncio.ensure_future(runner.run(TaskRun(_task())))
    while replicas.spare_slots == 0:  # the hedge is out
        await asyncio.sleep(0.001)
    replicas.release("t0:1")
    result = await job
    assert result.ok and result.result == "from a#0" and result.hedges == ["lost"]
    assert replicas.sent == ["t0:1"] and replicas.cancelled == ["t0:2"]
    assert outcomes == ["lost"] and replicas.slots == 0


async def test_a_fast_first_token_is_never_hedged() -> None:
    replicas, records = Replicas({"a#0": 0.0, "a#1": 0.0}), []
    runner = _runner(replicas, records, after_s=1.0)
    result = await runner.run(TaskRun(_task()))
    assert result.ok and result.attempts == 1 and result.hedges == []
    assert [r.hedged for r in records] == [False] and replicas.held == set()


async def test_no_hedge_without_a_spare_replica() -> None:
    replicas, records = Replicas({"a#0": 0.2}), []
    result = await _runner(replicas, records).run(TaskRun(_task()))
    assert result.ok and result.attempts == 1 and result.hedges == []
    assert len(records) == 1 and replicas.held == set()  # not even held


async def test_a_hedge_that_fails_leaves_the_held_attempt_to_answer() -> None:
    replicas = Replicas({"a#0": 0.3, "a#1": 0.0}, fail={"a#1"})
    runner = _runner(replicas)
    result = await runner.run(TaskRun(_task()))
    assert result.ok and result.result == "from a#0" and result.hedges == ["lost"]
    assert result.attempts == 2 and runner.counters["retried"] == 0
    assert replicas.sent == ["t0:1"]


async def test_a_held_attempt_that_fails_leaves_the_hedge_to_answer() -> None:
    replicas = Replicas({"a#0": None, "a#1": 0.3}, fail={"a#0"})
    runner = _runner(replicas)
    job = asyncio.ensure_future(runner.run(TaskRun(_task())))
    while replicas.spare_slots == 0:
        await asyncio.sleep(0.001)
    replicas.release("t0:1")  # a#0 fails before its token
    result = await job
    assert result.ok and result.result == "from a#1" and result.hedges == ["won"]
    assert replicas.sent == ["t0:2"] and runner.counters["retried"] == 0


async def test_cancelling_the_task_mid_race_cancels_both_attempts() -> None:
    replicas = Replicas({"a#0": None, "a#1": None})
    runner = _runner(replicas)
    job = asyncio.ensure_future(runner.run(TaskRun(_task())))
    while replicas.spare_slots == 0:
        await asyncio.sleep(0.001)
    job.cancel()
    result = await job
    assert result.status is TaskStatus.CANCELLED
    assert sorted(replicas.cancelled) == ["t0:1", "t0:2"] and replicas.sent == []
    assert replicas.slots == 0 and not runner.races


async def test_hedges_stay_within_max_fraction_of_recent_attempts() -> None:
    replicas, outcomes = Replicas({"a#0": 0.15, "a#1": 0.15}, capacity=4), []
    runner = _runner(replicas, after_s=0.01, max_fraction=0.25, outcomes=outcomes)
    results = [await runner.run(TaskRun(_task(n))) for n in range(12)]
    hedges = sum(len(r.hedges) for r in results)
    attempts = sum(r.attempts for r in results)
    assert all(r.ok for r in results) and hedges == len(outcomes) > 0
    assert hedges <= 0.25 * attempts
    assert runner.hedging.fraction("a") <= 0.25


def test_auto_waits_for_the_experts_p95_ttft_and_nothing_before_it_is_known() -> None:
    latency = RecentLatency()
    policy = HedgePolicy(HedgeConfig(enabled=True, after_s="auto"), latency)
    assert policy.after_s("a") is None
    for ttft in [0.1] * 19 + [2.0]:
        latency.add("a", 1.0, ttft)
    assert policy.after_s("a") == 0.1  # nearest rank: the 19th of 20
    assert HedgePolicy(HedgeConfig(after_s=0.5), latency).after_s("a") is None  # off


def test_the_fraction_counts_the_hedge_itself() -> None:
    policy = HedgePolicy(HedgeConfig(enabled=True, max_fraction=0.5, window=4), RecentLatency())
    assert not policy.allows("a")  # a hedge of nothing: 1 of 1
    policy.attempted("a", False)  # the attempt a hedge would copy
    assert policy.allows("a")  # 1 of 2
    for hedge in (True, False, True, False):  # the window keeps the last 4: T F T F
        policy.attempted("a", hedge)
    assert policy.fraction("a") == 0.5
    assert not policy.allows("a")  # 3 of 5 > 0.5


async def test_a_race_has_one_winner_whatever_the_order() -> None:
    race = Race("k:1")
    race.second = "k:2"
    assert race.claim("k:2") and not race.claim("k:1") and race.claim("k:2")
    assert await race.decided == "k:2"


@pytest.mark.parametrize("after_s", [0.05, "auto"])
def test_hedge_config_validates(after_s: float | str) -> None:
    assert HedgeConfig(enabled=True, after_s=after_s).after_s == after_s
    with pytest.raises(ValueError):
        HedgeConfig(max_fraction=0)
