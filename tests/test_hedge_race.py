"""Hedging as a stateful property: attempts get their first token, finish, fail, time
passes (a hedge goes out) or the caller leaves, in any order, at any step
(docs/hedging.md). No Ray: the real `TaskRunner`, replicas whose steps the test releases.

Whatever happens: two attempts never both send text at once, a held attempt sends
only after it won its race, the task ends once, and then nothing runs, no slot is
held, no race is left; hedges stay within their fraction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from orchestration.config import HedgeConfig, RetryConfig
from orchestration.errors import EngineError, ExpertUnavailableError, TaskCancelledError
from orchestration.models import ExpertTask, TaskStatus
from orchestration.task_runner import TaskRun, TaskRunner
from orchestration.wire import Completion, Dispatched
from tests.test_hedging_unit import Lease

REPLICAS = ("a#0", "a#1")
MAX_FRACTION = 0.5


@dataclass
class Attempt:
    key: str
    replica: str
    token: asyncio.Future[Exception | None]  # its first token (or its failure before it)
    end: asyncio.Future[Exception | None]  # its end (or its failure after its token)
    held: bool = False
    sent: bool = False  # it sent text (its token, after winning if held)
    live: bool = True


@dataclass
class Stepped:
    """Replicas of one slot each; every attempt waits for the test's go at each step."""

    runner: TaskRunner | None = None
    attempts: dict[str, Attempt] = field(default_factory=dict)
    slots: int = 0

    def _free(self, avoid: frozenset[str]) -> str | None:
        busy = {a.replica for a in self.attempts.values() if a.live}
        return next((r for r in REPLICAS if r not in avoid and r not in busy), None)

    @asynccontextmanager
    async def slot(self, expert: str, task: ExpertTask, avoid: frozenset[str] = frozenset(),
                   spare: bool = False) -> AsyncIterator[Lease]:
        if not spare:
            await asyncio.sleep(0)  # a grant may take a loop step
        label = self._free(avoid) or (None if spare else self._free(frozenset()))
        if label is None:
            raise ExpertUnavailableError(f"{expert}: no free replica")
        self.slots += 1
        try:
            yield Lease(expert, label)
        finally:
            self.slots -= 1

    def spare(self, expert: str, task: ExpertTask, avoid: frozenset[str]) -> bool:
        return self._free(avoid) is not None

    def others(self, expert: str, avoid: frozenset[str]) -> bool:
        return True

    def live(self, task: ExpertTask) -> bool:
        return False

    async def delivered(self, task: ExpertTask, attempt: int) -> str:
        raise AssertionError("not live")

    async def hold(self, lease: Lease, key: str) -> bool:
        await asyncio.sleep(0)  # an RPC: the token may come meanwhile
        attempt = self.attempts.get(key)
        if attempt is None or not attempt.live or attempt.token.done():
            return False
        attempt.held = True
        return True

    async def invoke(self, lease: Lease, task: ExpertTask, key: str,
                     gated: bool = False) -> Completion:
        assert self.runner is not None
        loop = asyncio.get_running_loop()
        attempt = self.attempts[key] = Attempt(key, lease.replica, loop.create_future(),
                                               loop.create_future(), held=gated)
        try:
            for step in (attempt.token, attempt.end):
                failure = await step
                if failure is not None:
                    raise failure
                if step is attempt.token:
                    if attempt.held and not self.runner.claim(key):
                        raise TaskCancelledError("lost to its hedge")
                    attempt.sent = True
            return Completion(text=f"from {key}", completion_tokens=1)
        finally:
            attempt.live = False


@settings(max_examples=150, stateful_step_count=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class HedgeMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.replicas = Stepped()
        self.records: list = []
        self.runner = TaskRunner(
            self.replicas, RetryConfig(attempts=2, initial_wait_s=0.0, jitter=0), {},
            lambda task, record: self.records.append(record),
            HedgeConfig(enabled=True, after_s=0.001, max_fraction=MAX_FRACTION))
        self.replicas.runner = self.runner
        self.job = self.loop.create_task(self.runner.run(TaskRun(
            ExpertTask(id="t", expert="a", prompt="q", role="primary", timeout_s=60))))
        self.ended = 0
        self.job.add_done_callback(lambda job: setattr(self, "ended", self.ended + 1))
        self._settle()

    def _settle(self) -> None:
        for _ in range(6):
            self.loop.run_until_complete(asyncio.sleep(0))

    def _live(self, i: int, step: str) -> Attempt | None:
        live = [a for a in self.replicas.attempts.values()
                if a.live and not getattr(a, step).done()]
        return live[i % len(live)] if live else None

    @rule(i=st.integers(0, 3), fail=st.booleans())
    def first_token(self, i: int, fail: bool) -> None:
        attempt = self._live(i, "token")
        if attempt is not None:
            attempt.token.set_result(EngineError("a: CUDA") if fail else None)
        self._settle()

    @rule(i=st.integers(0, 3), fail=st.booleans())
    def finish(self, i: int, fail: bool) -> None:
        attempt = self._live(i, "end")
        if attempt is not None and attempt.token.done():
            attempt.end.set_result(EngineError("a: CUDA") if fail else None)
        self._settle()

    @rule()
    def time_passes(self) -> None:  # past `after_s`: a held attempt may get its hedge
        self.loop.run_until_complete(asyncio.sleep(0.003))
        self._settle()

    @rule()
    def caller_leaves(self) -> None:
        self.job.cancel()
        self._settle()

    @invariant()
    def one_attempt_sends_at_a_time(self) -> None:
        sending = [a for a in self.replicas.attempts.values() if a.live and a.sent]
        assert len(sending) <= 1, [a.key for a in sending]

    @invariant()
    def a_held_attempt_sends_only_as_its_races_winner(self) -> None:
        for attempt in self.replicas.attempts.values():
            race = self.runner.races.get(attempt.key)
            if attempt.held and attempt.sent and attempt.live and race is not None:
                assert race.winner == attempt.key

    @invariant()
    def a_races_loser_is_cancelled_at_once(self) -> None:
        for race in set(self.runner.races.values()):
            if race.winner is not None:
                for key in (race.first, race.second):
                    loser = self.replicas.attempts.get(key or "")
                    assert key == race.winner or loser is None or not loser.live, key

    @invariant()
    def hedges_stay_within_their_fraction(self) -> None:
        assert self.runner.hedging.fraction("a") <= MAX_FRACTION
        hedged = [r for r in self.records if isinstance(r, Dispatched) and r.hedged]
        outcomes = self.runner.counters["hedges_won"] + self.runner.counters["hedges_lost"]
        assert outcomes <= len(hedged)

    @invariant()
    def an_ended_task_leaves_nothing_behind(self) -> None:
        if not self.job.done():
            return
        self._settle()
        assert self.ended == 1
        result = self.job.result()
        assert not any(a.live for a in self.replicas.attempts.values())
        assert self.replicas.slots == 0 and not self.runner.races
        assert len(result.hedges) <= sum(
            1 for r in self.records if isinstance(r, Dispatched) and r.hedged)
        if result.status is TaskStatus.SUCCESS:
            winner = self.replicas.attempts[result.result.removeprefix("from ")]
            assert winner.sent

    def teardown(self) -> None:
        self.job.cancel()
        self._settle()
        try:
            assert self.job.done() and self.ended == 1
            assert self.replicas.slots == 0 and not self.runner.races
        finally:
            self.loop.close()


TestHedgeRace = HedgeMachine.TestCase
