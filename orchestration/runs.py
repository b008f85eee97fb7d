"""The executor's bookkeeping of callers and plans: a `Session` per caller process (its
records, merged while it is slower than they come) and a `RequestRun` per admitted plan
(its task jobs and states, where its records go, its results, the cuts of its budget and
quorum). No Ray.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from orchestration.errors import BudgetError, ChorusError, QuorumReachedError
from orchestration.models import ExecutionPlan, ExpertTask, TaskResult
from orchestration.task_runner import TaskRun
from orchestration.wire import Record


class Session:
    """One caller's records, for every plan it submitted, until it reads them."""

    def __init__(self, caller: str) -> None:
        self.caller = caller
        self.outbox: list[tuple[str, Record]] = []  # (request id, record)
        self.runs: dict[str, RequestRun] = {}  # its plans still running
        self.changed = asyncio.Event()

    def put(self, request_id: str, record: Record) -> None:
        self.outbox.append((request_id, record))
        self.changed.set()

    async def batches(self) -> AsyncIterator[list[tuple[str, Record]]]:
        while True:
            await self.changed.wait()
            self.changed.clear()
            batch, self.outbox = self.outbox, []
            if batch:
                yield batch


class RequestRun:
    """One admitted plan: its task jobs, where its records go, its results."""

    def __init__(self, plan: ExecutionPlan, session: Session | None,
                 ratelimit: dict[str, str] | None = None) -> None:
        self.plan = plan
        self.session = session  # None: nobody reads records or text live (`run`)
        self.ratelimit = ratelimit or {}  # its tenant's x-ratelimit-* headers at admission
        self.jobs: list[asyncio.Task[TaskResult]] = []
        self.states: dict[str, TaskRun] = {}  # task id -> its runner state
        self.results: dict[str, TaskResult] = {}
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None  # the budget's cut, if it has one

    def start(self, now: float) -> list[tuple[ExpertTask, TaskRun]]:
        """Each task's runner state, from admission (`now`): under a budget, the primary
        must be done by the budget's end, a specialist by its cut."""
        plan = self.plan
        for task in plan.tasks:
            left = plan.budget_s if task.role != "expert" else plan.cut_s
            self.states[task.id] = TaskRun(task, started=now,
                                           budget_until=None if left is None else now + left)
        return [(task, self.states[task.id]) for task in plan.tasks]

    def cut(self, reason: Callable[[TaskRun], ChorusError]) -> int:
        """Cancel every specialist still running or queued, each ending with
        `reason(its state)` (the budget, a quorum); the primary is never cut."""
        cut = 0
        for job, task in zip(self.jobs, self.plan.tasks, strict=True):
            if task.role == "expert" and not job.done():
                state = self.states[task.id]
                state.cut = state.cut or reason(state)
                job.cancel()
                cut += 1
        return cut

    def cut_at_budget(self) -> int:
        """The budget's end for the specialists (`plan.cut_s` after admission)."""
        return self.cut(lambda state: BudgetError(
            f"{state.task.expert}: cut by the latency budget after "
            f"{time.monotonic() - state.started:.2f}s, all the time it had"))

    def cut_at_quorum(self) -> int:
        """Once the primary and `plan.quorum` specialists answered, the rest are cut."""
        quorum = self.plan.quorum
        if quorum is None or self.closed or self.plan.primary.id not in self.results:
            return 0
        answered = sum(1 for t in self.plan.experts
                       if (r := self.results.get(t.id)) is not None and r.ok)
        if answered < quorum:
            return 0
        return self.cut(lambda state: QuorumReachedError(
            f"{state.task.expert}: not needed: {answered} specialist(s) answered first "
            f"(min_experts {quorum})"))

    def put(self, record: Record) -> None:
        if self.session is not None:
            self.session.put(self.plan.request_id, record)

    def cancel(self) -> int:
        if self.timer is not None:
            self.timer.cancel()
        pending = [job for job in self.jobs if not job.done()]
        for job in pending:
            job.cancel()
        return len(pending)
