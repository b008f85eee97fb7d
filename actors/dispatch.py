"""The executor's Ray boundary for one attempt: a slot, a replica, one ObjectRef.

`RayDispatcher` implements the task runner's `Dispatcher` protocol: `slot` waits for
the scheduler's grant and picks the replica; `invoke` calls `ExpertActor.run`, and
cancelling the await cancels the ref (`ray.cancel`), so a deadline or a caller that
went away reaches the engine. Ray's errors are translated by `actors.boundary`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import ray

from actors.boundary import translate
from orchestration.errors import ExpertUnavailableError
from orchestration.models import ExpertTask
from orchestration.slots import SlotScheduler
from orchestration.wire import Completion


@dataclass
class Replica:
    """One actor of an expert, as the executor sees it."""

    name: str
    handle: Any
    in_flight: int = 0
    idle_since: float = 0.0
    served: int = 0
    failures: int = 0  # consecutive failed attempts (reset by a success)


@dataclass
class RayLease:
    expert: str
    replica: str
    target: Replica
    grant: Any


class RayDispatcher:
    """Slots from the scheduler, replicas from the pools, calls through Ray."""

    def __init__(self, slots: SlotScheduler, pools: dict[str, dict[str, Replica]],
                 plan_of: Callable[[str], str], streams: Callable[[str], bool]) -> None:
        self.slots = slots
        self.pools = pools
        self._plan_of = plan_of  # task id -> plan id (the scheduler's per-plan bound)
        self._streams = streams  # task id -> does a caller read its text live?
        self.outstanding: dict[str, Any] = {}  # attempt key -> ObjectRef

    def pick(self, expert: str) -> Replica:
        """The replica with the fewest tasks in flight (ties: idle the longest)."""
        pool = self.pools.get(expert)
        if not pool:
            raise ExpertUnavailableError(f"{expert}: no replica to dispatch to")
        return min(pool.values(), key=lambda r: (r.in_flight, r.idle_since))

    @asynccontextmanager
    async def slot(self, expert: str, task: ExpertTask) -> AsyncIterator[RayLease]:
        grant = await self.slots.acquire(expert, self._plan_of(task.id), task.effective_priority)
        try:
            replica = self.pick(expert)
            replica.in_flight += 1
            try:
                yield RayLease(expert, replica.name, replica, grant)
            finally:
                replica.in_flight -= 1
                if not replica.in_flight:
                    replica.idle_since = asyncio.get_running_loop().time()
        finally:
            self.slots.release(grant)

    async def invoke(self, lease: RayLease, task: ExpertTask, key: str) -> Completion:
        replica = lease.target
        ref = replica.handle.run.remote(task, key, self._streams(task.id))
        self.outstanding[key] = ref
        try:
            completion = await ref
        except asyncio.CancelledError:
            # Deadline or request cancelled: the expert sees CancelledError and its
            # engine frees the request.
            ray.cancel(ref)
            raise
        except Exception as exc:  # Ray's errors become ours here, once
            replica.failures += 1
            raise translate(exc, expert=lease.expert) from None
        finally:
            self.outstanding.pop(key, None)
        replica.failures = 0
        replica.served += 1
        return completion
