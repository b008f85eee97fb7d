"""The plan's cuts (the budget's end, a reached quorum) as a stateful property: tasks
answer, fail, are cut or cancelled in any order, at any step (docs/budget.md). No Ray:
the real `TaskRunner` and `RequestRun`, a dispatcher whose answers the test releases.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from orchestration.config import RetryConfig
from orchestration.errors import EngineError, QuorumReachedError
from orchestration.models import ExecutionPlan, ExpertTask, TaskStatus
from orchestration.runs import RequestRun
from orchestration.task_runner import TaskRunner
from orchestration.wire import Completion
from tests.test_task_runner import FakeLease

SPECIALISTS = 3


class Gated:
    """A dispatcher whose every attempt waits until the test answers it."""

    def __init__(self) -> None:
        self.answers: dict[str, asyncio.Future[str | Exception]] = {}
        self.slots = 0

    def live(self, task: ExpertTask) -> bool:
        return False

    async def delivered(self, task: ExpertTask, attempt: int) -> str:
        raise AssertionError("nobody reads live here")

    def others(self, expert: str, avoid: frozenset[str]) -> bool:
        return True

    @asynccontextmanager
    async def slot(self, expert: str, task: ExpertTask,
                   avoid: frozenset[str] = frozenset()) -> AsyncIterator[FakeLease]:
        await asyncio.sleep(0)  # a grant may take a loop step: a cut can land before it
        self.slots += 1
        try:
            yield FakeLease(expert, f"{expert}#0")
        finally:
            self.slots -= 1

    async def invoke(self, lease: FakeLease, task: ExpertTask, key: str) -> Completion:
        future = self.answers[task.id] = asyncio.get_running_loop().create_future()
        answer = await future
        if isinstance(answer, Exception):
            raise answer
        return Completion(text=answer, completion_tokens=1)


@settings(max_examples=200, stateful_step_count=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class CutMachine(RuleBasedStateMachine):
    @initialize(quorum=st.sampled_from([1, 2, None, SPECIALISTS + 1]),
                budget=st.booleans())
    def start(self, quorum: int | None, budget: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.gated = Gated()
        self.runner = TaskRunner(self.gated, RetryConfig(attempts=1), {})
        tasks = [ExpertTask(id="p", expert="primary", prompt="q", role="primary")]
        tasks += [ExpertTask(id=f"s{i}", expert=f"s{i}", prompt="q") for i in range(SPECIALISTS)]
        plan = ExecutionPlan(request_id="r", strategy="PARALLEL_FULL", primary=tasks[0],
                             experts=tasks[1:], quorum=quorum,
                             budget_s=60.0 if budget else None, cut_s=30.0 if budget else None)
        self.run = RequestRun(plan, None)
        self.cut_by_budget = False
        for task, state in self.run.start(self.loop.time()):
            job = self.loop.create_task(self.runner.run(state))
            job.add_done_callback(lambda job, t=task: self._finished(t, job))
            self.run.jobs.append(job)
        self._settle()

    def _finished(self, task: ExpertTask, job: asyncio.Task) -> None:
        """What the executor does with each result (actors/executor.py `_finished`)."""
        state = self.run.states[task.id]
        result = (self.runner.unrun(state, state.cut or EngineError("never ran"))
                  if job.cancelled() else job.result())
        assert task.id not in self.run.results, "a task ended twice"
        self.run.results[task.id] = result
        if len(self.run.results) < len(self.run.plan.tasks):
            self.run.cut_at_quorum()

    def _settle(self) -> None:
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule(task=st.sampled_from(["p", *(f"s{i}" for i in range(SPECIALISTS))]), ok=st.booleans(),
          settle=st.booleans())
    def answer(self, task: str, ok: bool, settle: bool) -> None:
        future = self.gated.answers.get(task)
        if future is not None and not future.done():
            future.set_result(f"{task} says" if ok else EngineError(f"{task}: CUDA"))
        if settle:
            self._settle()

    @rule()
    def budget_ends(self) -> None:
        if self.run.plan.cut_s is not None:
            self.cut_by_budget = True
            self.run.cut_at_budget()
        self._settle()

    @rule()
    def caller_leaves(self) -> None:
        self.run.cancel()
        self._settle()

    @invariant()
    def cuts_are_the_plans_and_never_the_primarys(self) -> None:
        results = self.run.results
        primary = results.get("p")
        assert primary is None or primary.status in (
            TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.CANCELLED)
        assert primary is None or primary.error_code != QuorumReachedError.code
        quorum = self.run.plan.quorum
        answered = sum(1 for t in self.run.plan.experts
                       if t.id in results and results[t.id].ok)
        for task in self.run.plan.experts:
            result = results.get(task.id)
            if result is None:
                continue
            if result.status is TaskStatus.BUDGET:
                assert self.cut_by_budget
            if result.error_code == QuorumReachedError.code:
                assert quorum is not None and primary is not None and answered >= quorum
        if quorum is not None and primary is not None and answered >= quorum:
            self._settle()  # the cuts land within a few loop steps
            assert len(results) == len(self.run.plan.tasks), "a quorum left one running"

    def teardown(self) -> None:
        self.run.cancel()
        self._settle()
        try:
            assert len(self.run.results) == len(self.run.plan.tasks)  # one result each
            assert self.gated.slots == 0  # every slot back
        finally:
            self.loop.close()


TestCuts = CutMachine.TestCase
