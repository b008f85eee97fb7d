"""Dispatch slots: who may send a task to an expert now, under the bounds.

`SlotScheduler` parks tasks until a slot is free and grants them across every plan by
rank first (priority orders classes), then, within a rank, to the tenant that has had
the least weighted service (Virtual Token Counter fair share, `orchestration.fairness`),
then by arrival. It never exceeds `max_in_flight` in all, an expert's limit, a plan's
strategy concurrency, or a tenant's `max_in_flight` (a hard cap). With `fair_share` off
the tenant is ignored for order: rank, then arrival. No Ray, no clock.

A waiter's life is one of two paths, and nothing else:

    WAITING -> GRANTED -> RELEASED        (it ran; `release` returns the slot once)
    WAITING -> WITHDRAWN                  (cancelled or closed before its grant)

Grants happen synchronously inside `acquire`/`release`/`set_limit`/`set_tenants`, and a
waiter whose future is already done (its task was cancelled in the same loop step) is
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

from orchestration.fairness import DEFAULT_TENANT, TenantShares


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
    tenant: str = DEFAULT_TENANT
    cost: int = 1  # the caller's estimate of its service, charged to its tenant at the grant
    future: asyncio.Future[None] | None = field(default=None, repr=False)
    state: WaiterState = WaiterState.WAITING

    @property
    def key(self) -> tuple[int, int]:
        return (-self.rank, self.seq)  # higher rank first, then first come

    def __lt__(self, other: Grant) -> bool:  # heap order within one (expert, tenant)
        return self.key < other.key


class SlotScheduler:
    """Grants dispatch slots by rank, then fair share, across all plans; one spans them all.

    Waiters sit in one heap per (expert, tenant), ordered by rank then arrival: a tenant's
    counter moves with every grant, so it cannot be part of a heap key. A grant compares
    the heads of the heaps whose expert has room and whose tenant is under its cap, by
    (rank, the tenant's counter, arrival); there are few tenants, so that scan is short.
    A head whose plan is full is parked with its plan until that plan frees a slot.
    Withdrawn waiters are dropped lazily when they reach a head, so no grant scans or
    copies a queue, and empty heaps are dropped.
    """

    def __init__(self, max_in_flight: int, expert_limits: dict[str, int],
                 fair_share: bool = True) -> None:
        self.max_in_flight = max_in_flight
        self.expert_limits = dict(expert_limits)
        self.fair_share = fair_share
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
        self._tenants = TenantShares()
        self._heaps: dict[tuple[str, str], list[Grant]] = {}
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

    @property
    def per_tenant(self) -> Counter[str]:
        """Granted slots in flight per tenant (only tenants with some)."""
        return self._tenants.in_flight

    @property
    def waiting_per_tenant(self) -> Counter[str]:
        return self._tenants.waiting

    @property
    def service(self) -> dict[str, float]:
        """Each configured or active tenant's virtual counter (weighted service)."""
        return self._tenants.service

    def tenant_stats(self) -> dict[str, dict[str, float | int | None]]:
        """Per configured or active tenant: in_flight, waiting, service, weight, max_in_flight."""
        return self._tenants.stats()

    def has_room(self, expert: str, plan_id: str | None = None,
                 tenant: str | None = None) -> bool:
        """Would a new waiter for `expert` (in `plan_id`, of `tenant`) be granted at once,
        ignoring order?"""
        if self.total >= self.max_in_flight or not self._expert_has_room(expert):
            return False
        if tenant is not None and self._tenants.is_full(tenant):
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

    def set_tenants(self, tenants: dict[str, tuple[float, int | None]]) -> None:
        """Every tenant's (weight > 0, max_in_flight or None), replacing the last set (a
        redeploy); tenants not named get weight 1 and no cap. A raised cap grants at once;
        a lowered one keeps what is in flight and grants nothing more until under it."""
        self._tenants.configure(tenants)
        self._pump()

    def set_fair_share(self, on: bool) -> None:
        """Order within a rank by tenant counters (on) or by arrival alone (off). Counters
        are kept either way. Only order changes, so nothing becomes grantable: no pump."""
        self.fair_share = on

    def charge(self, tenant: str, tokens: float) -> None:
        """Add service measured after the fact (the engine's count once a task ended):
        `tokens / weight` to the tenant's counter; negative counts are ignored."""
        self._tenants.charge(tenant, tokens)

    # ------------------------------------------------------------------ acquire / release

    async def acquire(self, expert: str, plan_id: str, rank: int,
                      tenant: str = DEFAULT_TENANT, cost: int = 1) -> Grant:
        """Wait for a slot. Cancelling the caller withdraws it, or returns a late grant.

        `cost` (>= 1; less counts as 1, so no grant is free) is charged to `tenant` at the
        grant; `charge` adds the real count later.
        """
        grant = Grant(expert, plan_id, rank, next(self._seq), tenant, max(1, cost))
        grant.future = asyncio.get_running_loop().create_future()
        self._enqueue(grant)
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

    def try_acquire(self, expert: str, plan_id: str, rank: int,
                    tenant: str = DEFAULT_TENANT, cost: int = 0) -> Grant | None:
        """A slot now or none (a hedge): granted at once when `expert` has room under
        every bound and nobody waits for it — never queued, never ahead of a waiter.
        `cost` may be 0: a copy of work already charged."""
        if self.waiting_per_expert[expert] or not self.has_room(expert, plan_id, tenant):
            return None
        grant = Grant(expert, plan_id, rank, next(self._seq), tenant, max(0, cost))
        grant.future = asyncio.get_running_loop().create_future()
        self._enqueue(grant)
        self._grant(grant)
        self._pump()  # drops it from its heap; peak counts
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
        self._tenants.release(grant.tenant)  # below its cap again: its heads compete again
        self.releases += 1
        parked = self._parked.pop(grant.plan_id, None)
        if parked:  # the plan has room again: its parked waiters compete again
            for waiter in parked:
                heapq.heappush(self._heaps.setdefault((waiter.expert, waiter.tenant), []),
                               waiter)
        if grant.plan_id not in self.plan_limits and not self.per_plan[grant.plan_id]:
            self.per_plan.pop(grant.plan_id, None)
        self._pump()

    # ------------------------------------------------------------------ internals

    def live(self) -> list[Grant]:
        """Every claim that is waiting or granted (for stats and invariant checks)."""
        return [grant for grants in self._live.values() for grant in grants]

    def _expert_has_room(self, expert: str) -> bool:
        return self.per_expert[expert] < self.expert_limits.get(expert, 0)

    def _order(self, grant: Grant) -> tuple[int, float, int]:
        """Across tenants: rank, then (fair share) the least-served tenant, then arrival."""
        served = self._tenants.counter(grant.tenant) if self.fair_share else 0.0
        return (-grant.rank, served, grant.seq)

    def _enqueue(self, grant: Grant) -> None:
        self._tenants.arrive(grant.tenant)  # lifts a tenant that was idle: no banked credit
        self._waiting += 1
        self.waiting_per_expert[grant.expert] += 1
        self._live.setdefault(grant.plan_id, set()).add(grant)
        heapq.heappush(self._heaps.setdefault((grant.expert, grant.tenant), []), grant)

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
            self._tenants.withdraw(grant.tenant)
            self._forget(grant)
            if grant.future is not None and not grant.future.done():
                grant.future.cancel()

    def _best_head(self) -> Grant | None:
        """The first live waiter in `_order` among heads whose expert has room and whose
        tenant is under its cap (drops dead heads)."""
        best: Grant | None = None
        best_order: tuple[int, float, int] | None = None
        for (expert, tenant), heap in self._heaps.items():
            while heap and heap[0].state is not WaiterState.WAITING:
                heapq.heappop(heap)
            if not heap or not self._expert_has_room(expert) or self._tenants.is_full(tenant):
                continue
            order = self._order(heap[0])
            if best_order is None or order < best_order:
                best, best_order = heap[0], order
        return best

    def _grant(self, head: Grant) -> None:
        assert head.future is not None
        head.state = WaiterState.GRANTED
        self._waiting -= 1
        self.waiting_per_expert[head.expert] -= 1
        self._tenants.grant(head.tenant, head.cost)
        self.total += 1
        self.per_expert[head.expert] += 1
        self.per_plan[head.plan_id] += 1
        self.grants += 1
        head.future.set_result(None)
        group = self.plan_groups.get(head.plan_id, "")
        self.peak_by_group[group] = max(self.peak_by_group[group], self.per_plan[head.plan_id])

    def _pump(self) -> None:
        while self.total < self.max_in_flight:
            head = self._best_head()
            if head is None:
                break
            heapq.heappop(self._heaps[(head.expert, head.tenant)])
            assert head.future is not None
            if head.future.done():  # its task was cancelled in this very loop step
                self._withdraw(head)
                continue
            if self.per_plan[head.plan_id] >= self.plan_limits.get(head.plan_id, 1):
                self._parked.setdefault(head.plan_id, []).append(head)
                continue
            self._grant(head)
        self.peak_in_flight = max(self.peak_in_flight, self.total)
        for key in [k for k, heap in self._heaps.items() if not heap]:
            del self._heaps[key]  # no state kept for (expert, tenant)s nobody waits on
