"""The executor's Ray boundary for one attempt: a slot, a replica, one ObjectRef.

`RayDispatcher` implements the task runner's `Dispatcher` protocol: `slot` waits for
the scheduler's grant and picks the replica (`orchestration.replicas`) — when every
replica of the expert is one whose process died, it first waits (up to the task's
timeout) for one to answer again; a hedge's `slot` takes a slot now or none. `invoke`
calls `ExpertActor.run`, and cancelling the await cancels the ref (`ray.cancel`), so a
deadline or a caller that went away reaches the engine; `hold` makes an attempt claim
its first token from the executor (`gate`) before it sends it (docs/hedging.md). Ray's errors are translated by
`actors.boundary`. `delivered` waits for a live caller's answer to a `Handoff` (what
it has of a broken-off answer), which the executor passes on (`on_delivered`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import ray

from actors.actor_table import ray_state
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
    actor: str
    target: Replica
    grant: Any
    # How the attempt ended, for the replica's health: set by `invoke`, or by the runner
    # on a deadline ("failed"); a lease that ends otherwise was cancelled.
    outcome: str = "cancelled"


class RayDispatcher:
    """Slots from the scheduler, replicas from the pools, calls through Ray."""

    def __init__(self, slots: SlotScheduler, pools: dict[str, ReplicaPool],
                 claim_of: Callable[[str], tuple[str, str]],
                 streams: Callable[[str], str | None], health_changed: Callable[[str], None],
                 granted: Callable[[ExpertTask, str, float], None]) -> None:
        self.slots = slots
        self.pools = pools
        self._health_changed = health_changed  # the expert's bound may have moved
        # task id -> (plan id, tenant): the scheduler's per-plan bound and fair share
        self._claim_of = claim_of
        self._granted = granted  # (task, expert, seconds waited): the tenant's queue time
        self._streams = streams  # task id -> the caller that reads its text live, or None
        self.outstanding: dict[str, Any] = {}  # attempt key -> ObjectRef
        self._revivals: dict[str, asyncio.Future[None]] = {}  # actor name -> its `ready`
        self._handoffs: dict[tuple[str, int], asyncio.Future[str]] = {}  # (task, attempt)
        # Where a held attempt claims its first token (the executor: `first_token`).
        self.gate: Any = None

    @asynccontextmanager
    async def slot(self, expert: str, task: ExpertTask, avoid: frozenset[str] = frozenset(),
                   spare: bool = False) -> AsyncIterator[RayLease]:
        plan_id, tenant = self._claim_of(task.id)
        if spare:  # a hedge: a slot now on a ready replica, or none (charged nothing)
            grant = self.slots.try_acquire(expert, plan_id, task.rank, tenant=tenant)
            if grant is None:
                raise ExpertUnavailableError(f"{expert}: no spare slot for a hedge")
        else:
            await self._until_back(expert, task.timeout_s)
            asked = time.monotonic()
            grant = await self.slots.acquire(expert, plan_id, task.rank, tenant=tenant,
                                             cost=prompt_cost(task))
            self._granted(task, expert, time.monotonic() - asked)
        try:
            pool = self.pools.get(expert)
            replica = pool.pick(time.monotonic(), avoid) if pool is not None else None
            if spare and replica is not None and replica.health(time.monotonic()) != "healthy":
                replica = None
            if pool is None or replica is None:
                raise ExpertUnavailableError(f"{expert}: no replica to dispatch to")
            pool.started(replica)
            lease = RayLease(expert, replica.label, replica.name, replica, grant)
            try:
                yield lease
            finally:
                before = replica.health(time.monotonic())
                pool.finished(replica, time.monotonic(), lease.outcome)
                if replica.health(time.monotonic()) != before:
                    self._health_changed(expert)
        finally:
            self.slots.release(grant)

    async def _until_back(self, expert: str, timeout_s: float) -> None:
        """With no healthy replica but some whose process died (Ray restarts them, or
        the supervisor re-creates them), wait until one answers again — at most
        `timeout_s` — so an attempt is not spent on a replica still restarting."""
        pool = self.pools.get(expert)
        if pool is None:
            return
        now = time.monotonic()
        serving = [r for r in pool.replicas.values() if not r.draining]
        if not serving or any(r.health(now) == "healthy" for r in serving):
            return
        waits = [self._revival(expert, r) for r in serving if r.suspect]
        if waits:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)

    def _revival(self, expert: str, replica: Replica) -> asyncio.Future[None]:
        """One `ready` call per replica incarnation, shared by every task waiting for it:
        Ray holds it until the restarted process answers (or fails it: dead for good)."""
        revival = self._revivals.get(replica.name)
        if revival is None:
            revival = self._revivals[replica.name] = asyncio.ensure_future(
                self._await_ready(expert, replica))
        return revival

    async def _await_ready(self, expert: str, replica: Replica) -> None:
        try:
            while replica.suspect:  # the supervisor may clear it first (it saw it back)
                try:
                    await replica.handle.ready.remote()
                    break
                except Exception as exc:  # sent while it restarted, or dead for good
                    gone = isinstance(translate(exc, expert=expert), ExpertUnavailableError)
                    if gone and (await asyncio.to_thread(ray_state, replica.handle))[0] != "DEAD":
                        await asyncio.sleep(0.1)
                        continue
                    return  # dead for good (or a bug): the attempt finds out
            if replica.suspect:
                replica.suspect, replica.failures = False, 0
                self._health_changed(expert)
        finally:
            self._revivals.pop(replica.name, None)

    def spare(self, expert: str, task: ExpertTask, avoid: frozenset[str]) -> bool:
        pool = self.pools.get(expert)
        if pool is None or not self.slots.has_room(expert, *self._claim_of(task.id)) \
                or self.slots.waiting_per_expert[expert]:
            return False
        now = time.monotonic()
        return any(r.health(now) == "healthy" and r.in_flight < r.capacity
                   and r.label not in avoid for r in pool.replicas.values())

    async def hold(self, lease: RayLease, key: str) -> bool:
        try:
            return bool(await lease.target.handle.hold.remote(key, self.gate))
        except Exception:  # the replica is gone: its attempt finds out
            return False

    async def invoke(self, lease: RayLease, task: ExpertTask, key: str,
                     gated: bool = False) -> Completion:
        ref = lease.target.handle.run.remote(task, key, self._streams(task.id),
                                             self.gate if gated else None)
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

    def others(self, expert: str, avoid: frozenset[str]) -> bool:
        pool = self.pools.get(expert)
        return pool is not None and any(
            label not in avoid and not replica.draining
            for label, replica in pool.replicas.items())

    def live(self, task: ExpertTask) -> bool:
        return self._streams(task.id) is not None

    async def delivered(self, task: ExpertTask, attempt: int) -> str:
        """The live caller's text of the answer (its reply to the `Handoff` record the
        runner just sent); the runner bounds the wait by the task's deadline."""
        slot = (task.id, attempt)
        future = self._handoffs[slot] = asyncio.get_running_loop().create_future()
        try:
            return await future
        finally:
            self._handoffs.pop(slot, None)

    def on_delivered(self, task_id: str, attempt: int, text: str) -> None:
        future = self._handoffs.get((task_id, attempt))
        if future is not None and not future.done():
            future.set_result(text)


def prompt_cost(task: ExpertTask) -> int:
    """The fair share's charge at a grant: the prompt's tokens, estimated (4 characters
    a token) before the engine counts them; the answer's are charged when it ends."""
    chars = len(task.prompt) + len(task.system_prompt or "")
    chars += sum(len(m.content) for m in task.messages or ())
    return 1 + chars // 4
