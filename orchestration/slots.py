"""Dispatch slots: who may send a task to an expert now, under the three bounds.

`SlotScheduler` parks tasks until a slot is free and grants them strictly by
rank (then arrival) across every plan, never exceeding `max_in_flight` in all,
an expert's limit, or a plan's strategy concurrency. No Ray, no clock.

A waiter's life is one of two paths, and nothing else:

    WAITING -> GRANTED -> RELEASED        (it ran; `release` returns the slot once)
    WAITING -> WITHDRAWN                  (cancelled or closed before its grant)

Grants happen synchronously inside `acquire`/`release`/`set_limit`, and a waiter
whose future is already done (its task was cancelled in the same loop step) is
withdrawn instead of granted, so occupancy always equals the number of GRANTED
waiters. A caller cancelled after its grant but before it resumed releases the slot
itself (see `acquire`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class WaiterState(Enum):
    WAITING = "waiting"
    GRANTED = "granted"
    RELEASED = "released"
    WITHDRAWN = "withdrawn"


@dataclass(eq=False)
class Grant:
    """One task's claim on a slot; `SlotScheduler.release(grant)` gives it back."""

    expert: str
    plan_id: str
    rank: int  # larger first
    seq: int
    future: asyncio.Future[None] | None = field(default=None, repr=False)
    state: WaiterState = WaiterState.WAITING

    @property
    def key(self) -> tuple[int, int]:
        return (-self.rank, self.seq)  # higher rank first, then first come

    def __lt__(self, other: Grant) -> bool:  # heap order
        return self.key < other.key


class SlotScheduler:
    """Grants dispatch slots by rank across all plans; one instance spans them all.

    Waiters sit in one heap per expert. A grant takes the best head among experts
    with room; a head whose plan is full is parked with its plan until that plan
    frees a slot. Withdrawn waiters are dropped lazily when they reach a head, so
    no grant scans or copies the queue.
    """

    def __init__(self, max_in_flight: int, expert_limits: dict[str, int]) -> None:
        self.max_in_flight = max_in_flight
        self.expert_limits = dict(expert_limits)
        self.plan_limits: dict[str, int] = {}
        self.plan_groups: dict[str, str] = {}
        self.total = 0
        self.per_expert: Counter[str] = Counter()
        self.per_plan: Counter[str] = Counter()
        self.waiting_per_expert: Counter[str] = Counter()
        self.peak_in_flight = 0
        # Highest in-flight count any one plan reached, per group (the plan's strategy).
        self.peak_by_group: Counter[str] = Counter()
        self.grants = 0  # lifetime grants: progress, for the readiness probe
        self.releases = 0
        self._heaps: dict[str, list[Grant]] = {}
        self._parked: dict[str, list[Grant]] = {}
        # Every waiting or granted claim, per plan: what `close_plan` withdraws and
        # what the invariants are checked against.
        self._live: dict[str, set[Grant]] = {}
        self._waiting = 0
        self._seq = itertools.count()

    # ------------------------------------------------------------------ queries

    @property
    def waiting(self) -> int:
        return self._waiting

    def has_room(self, expert: str, plan_id: str | None = None) -> bool:
        """Would a new waiter for `expert` (in `plan_id`) be granted at once, ignoring order?"""
        if self.total >= self.max_in_flight:
            return False
        if self.per_expert[expert] >= self.expert_limits.get(expert, 0):
            return False
        return plan_id is None or self.per_plan[plan_id] < self.plan_limits.get(plan_id, 1)

    # ------------------------------------------------------------------ plans and limits

    def open_plan(self, plan_id: str, concurrency: int, group: str = "") -> None:
        self.plan_limits[plan_id] = concurrency
        self.plan_groups[plan_id] = group

    def close_plan(self, plan_id: str) -> None:
        """Forget a finished plan; any waiter it still had is withdrawn (granted ones stay)."""
        self._parked.pop(plan_id, None)
        for grant in list(self._live.get(plan_id, ())):
            self._withdraw(grant)
        self.plan_limits.pop(plan_id, None)
        self.plan_groups.pop(plan_id, None)
        if not self.per_plan.get(plan_id):
            self.per_plan.pop(plan_id, None)
        self._pump()

    def set_max_in_flight(self, limit: int) -> None:
        """A new global bound (a redeploy); grants at once if it grew."""
        self.max_in_flight = limit
        self._pump()

    def set_limit(self, expert: str, limit: int) -> None:
        """Change an expert's bound (e.g. replicas became ready); grants at once if it grew."""
        self.expert_limits[expert] = limit
        self._pump()

    # ------------------------------------------------------------------ acquire / release

    async def acquire(self, expert: str, plan_id: str, rank: int) -> Grant:
        """Wait for a slot. Cancelling the caller withdraws it, or returns a late grant."""
        grant = Grant(expert, plan_id, rank, next(self._seq))
        grant.future = asyncio.get_running_loop().create_future()
        self._waiting += 1
        self.waiting_per_expert[expert] += 1
        self._live.setdefault(plan_id, set()).add(grant)
        heapq.heappush(self._heaps.setdefault(expert, []), grant)
        self._pump()
        try:
            await grant.future
        except asyncio.CancelledError:
            # Granted in the same loop step as our cancellation: the slot is ours to
            # return. Still waiting: withdraw (it stays in its heap until it surfaces).
            if grant.state is WaiterState.GRANTED:
                self.release(grant)
            else:
                self._withdraw(grant)
                self._pump()  # drops it from its heap if it is a head
            raise
        return grant

    def release(self, grant: Grant) -> None:
        """Return a granted slot; a second release of the same grant is a no-op."""
        if grant.state is not WaiterState.GRANTED:
            return
        grant.state = WaiterState.RELEASED
        self._forget(grant)
        self.total -= 1
        self.per_expert[grant.expert] -= 1
        self.per_plan[grant.plan_id] -= 1
        self.releases += 1
        parked = self._parked.pop(grant.plan_id, None)
        if parked:  # the plan has room again: its parked waiters compete again
            for waiter in parked:
                heapq.heappush(self._heaps.setdefault(waiter.expert, []), waiter)
        if grant.plan_id not in self.plan_limits and not self.per_plan[grant.plan_id]:
            self.per_plan.pop(grant.plan_id, None)
        self._pump()

    # ------------------------------------------------------------------ internals

    def live(self) -> list[Grant]:
        """Every claim that is waiting or granted (for stats and invariant checks)."""
        return [grant for grants in self._live.values() for grant in grants]

    def _forget(self, grant: Grant) -> None:
        grants = self._live.get(grant.plan_id)
        if grants is not None:
            grants.discard(grant)
            if not grants:
                del self._live[grant.plan_id]

    def _withdraw(self, grant: Grant) -> None:
        if grant.state is WaiterState.WAITING:
            grant.state = WaiterState.WITHDRAWN
            self._waiting -= 1
            self.waiting_per_expert[grant.expert] -= 1
            self._forget(grant)
            if grant.future is not None and not grant.future.done():
                grant.future.cancel()

    def _best_head(self) -> Grant | None:
        """The highest-ranked live waiter among experts with room (drops dead heads)."""
        best: Grant | None = None
        for expert, heap in self._heaps.items():
            while heap and heap[0].state is not WaiterState.WAITING:
                heapq.heappop(heap)
            if not heap or self.per_expert[expert] >= self.expert_limits.get(expert, 0):
                continue
            if best is None or heap[0].key < best.key:
                best = heap[0]
        return best

    def _pump(self) -> None:
        while self.total < self.max_in_flight:
            head = self._best_head()
            if head is None:
                break
            heapq.heappop(self._heaps[head.expert])
            assert head.future is not None
            if head.future.done():  # its task was cancelled in this very loop step
                self._withdraw(head)
                continue
            if self.per_plan[head.plan_id] >= self.plan_limits.get(head.plan_id, 1):
                self._parked.setdefault(head.plan_id, []).append(head)
                continue
            head.state = WaiterState.GRANTED
            self._waiting -= 1
            self.waiting_per_expert[head.expert] -= 1
            self.total += 1
            self.per_expert[head.expert] += 1
            self.per_plan[head.plan_id] += 1
            self.grants += 1
            head.future.set_result(None)
            group = self.plan_groups.get(head.plan_id, "")
            self.peak_by_group[group] = max(self.peak_by_group[group], self.per_plan[head.plan_id])
        self.peak_in_flight = max(self.peak_in_flight, self.total)
        for expert in [e for e, heap in self._heaps.items() if not heap]:
            del self._heaps[expert]  # no state kept for experts nobody waits on
