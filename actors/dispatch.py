"""The executor's Ray boundary for one attempt: a slot, a replica, one ObjectRef.

`RayDispatcher` implements the task runner's `Dispatcher` protocol: `slot` waits for
the scheduler's grant and picks the replica (`orchestration.replicas`); `invoke` calls
`ExpertActor.run`, and cancelling the await cancels the ref (`ray.cancel`), so a
deadline or a caller that went away reaches the engine. Ray's errors are translated by
`actors.boundary`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import ray

from actors.boundary import translate
from orchestration.errors import ExpertUnavailableError, TaskCancelledError
from orchestration.models import ExpertTask
from orchestration.replicas import Replica, ReplicaPool
from orchestration.slots import SlotScheduler
from orchestration.wire import Completion


@dataclass
class RayLease:
    expert: str
    replica: str
    target: Replica
    grant: Any
    # How the attempt ended, for the replica's health: set by `invoke`, or by the runner
    # on a deadline ("failed"); a lease that ends otherwise was cancelled.
    outcome: str = "cancelled"


class RayDispatcher:
    """Slots from the scheduler, replicas from the pools, calls through Ray."""

    def __init__(self, slots: SlotScheduler, pools: dict[str, ReplicaPool],
                 plan_of: Callable[[str], str], streams: Callable[[str], bool],
                 health_changed: Callable[[str], None]) -> None:
        self.slots = slots
        self.pools = pools
        self._health_changed = health_changed  # the expert's bound may have moved
        self._plan_of = plan_of  # task id -> plan id (the scheduler's per-plan bound)
        self._streams = streams  # task id -> does a caller read its text live?
        self.outstanding: dict[str, Any] = {}  # attempt key -> ObjectRef

    @asynccontextmanager
    async def slot(self, expert: str, task: ExpertTask) -> AsyncIterator[RayLease]:
        grant = await self.slots.acquire(expert, self._plan_of(task.id), task.rank)
        try:
            pool = self.pools.get(expert)
            replica = pool.pick(time.monotonic()) if pool is not None else None
            if pool is None or replica is None:
                raise ExpertUnavailableError(f"{expert}: no replica to dispatch to")
            pool.started(replica)
            lease = RayLease(expert, replica.label, replica, grant)
            try:
                yield lease
            finally:
                before = replica.health(time.monotonic())
                pool.finished(replica, time.monotonic(), lease.outcome)
                if replica.health(time.monotonic()) != before:
                    self._health_changed(expert)
        finally:
            self.slots.release(grant)

    async def invoke(self, lease: RayLease, task: ExpertTask, key: str) -> Completion:
        ref = lease.target.handle.run.remote(task, key, self._streams(task.id))
        self.outstanding[key] = ref
        try:
            completion = await ref
        except asyncio.CancelledError:
            # Deadline or request cancelled: the expert sees CancelledError and its
            # engine frees the request.
            ray.cancel(ref)
            raise
        except Exception as exc:  # Ray's errors become ours here, once
            error = translate(exc, expert=lease.expert)
            lease.outcome = ("cancelled" if isinstance(error, TaskCancelledError) else
                             "gone" if isinstance(error, ExpertUnavailableError) else "failed")
            raise error from None
        finally:
            self.outstanding.pop(key, None)
        lease.outcome = "ok"
        return completion
