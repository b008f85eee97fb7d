"""The executor's bookkeeping of callers and plans: a `Session` per caller process (its
records, merged while it is slower than they come) and a `RequestRun` per admitted plan
(its task jobs, where its records go, its results). No Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from orchestration.models import ExecutionPlan, TaskResult
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
        self.results: dict[str, TaskResult] = {}
        self.closed = False

    def put(self, record: Record) -> None:
        if self.session is not None:
            self.session.put(self.plan.request_id, record)

    def cancel(self) -> int:
        pending = [job for job in self.jobs if not job.done()]
        for job in pending:
            job.cancel()
        return len(pending)
