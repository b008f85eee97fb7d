"""The slot scheduler under cancellation at any moment, and its per-tenant fair share (no Ray).

The stateful test drives acquire / cancel / release / close-plan / set-limit / charge /
redeploy in random orders, for several tenants, sometimes cancelling and releasing in
the same loop step (the race that leaked every slot of a served app). It checks the
invariants after every step, and the fair-order rule, the tenants' caps and a
no-starvation bound at every single grant.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from orchestration.slots import Grant, SlotScheduler, WaiterState

EXPERTS = {"a": 2, "b": 1, "c": 3}
# (weight, max_in_flight); "guest" is never configured: weight 1, no cap, and its
# counter is dropped whenever it goes idle.
TENANTS: dict[str, tuple[float, int | None]] = {"t0": (1.0, None), "t1": (2.0, 2),
                                                "t2": (1.0, 1)}
TENANT_NAMES = [*TENANTS, "guest"]
CAPS = [None, 0, 1, 2, 3]


async def _tick(rounds: int = 3) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)  # one loop step: let woken tasks run (not a timed wait)


async def test_a_hedges_slot_is_now_or_never_and_never_ahead_of_a_waiter() -> None:
    """`try_acquire` (a hedge, docs/hedging.md): granted at once while the expert has
    room and nobody waits for it; never queued; charged nothing to its tenant."""
    slots = SlotScheduler(max_in_flight=8, expert_limits={"a": 2})
    slots.open_plan("p", 4)
    first = await slots.acquire("a", "p", 1, tenant="t", cost=5)
    served = slots.service["t"]
    hedge = slots.try_acquire("a", "p", 1, tenant="t")
    assert hedge is not None and hedge.state is WaiterState.GRANTED
    assert (slots.total, slots.per_expert["a"], slots.service["t"]) == (2, 2, served)
    assert slots.try_acquire("a", "p", 1, tenant="t") is None  # the expert is full
    waiter = asyncio.ensure_future(slots.acquire("a", "p", 1, tenant="t"))
    await _tick()
    slots.release(hedge)  # the waiter gets it, not a new hedge
    await _tick()
    assert waiter.done() and slots.try_acquire("a", "p", 1) is None
    slots.release(first)
    again = slots.try_acquire("a", "p", 1)
    assert slots.waiting == 0 and again is not None
    slots.release(again)
    slots.close_plan("p")
    slots.open_plan("serial", 1)
    only = await slots.acquire("a", "serial", 1)
    assert slots.try_acquire("a", "serial", 1) is None  # the plan's own bound holds too
    slots.release(only)
    slots.release(waiter.result())


async def test_waiter_cancelled_in_the_same_step_as_a_release() -> None:
    """The reproduction from issue 8: the cancelled waiter is never granted; nothing leaks."""
    slots = SlotScheduler(1, {"x": 1})
    slots.open_plan("p", 4)
    held = await slots.acquire("x", "p", 1)
    waiter = asyncio.ensure_future(slots.acquire("x", "p", 1))
    await _tick()
    assert slots.waiting == 1
    waiter.cancel()
    slots.release(held)  # same step: the waiter's future is already cancelled
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (slots.total, slots.waiting, slots.live()) == (0, 0, [])
    again = await asyncio.wait_for(slots.acquire("x", "p", 1), 1)
    assert slots.total == 1
    slots.release(again)
    slots.release(again)  # idempotent
    assert slots.total == 0


async def test_waiter_granted_then_cancelled_before_it_resumes_returns_its_slot() -> None:
    slots = SlotScheduler(1, {"x": 1})
    slots.open_plan("p", 4)
    held = await slots.acquire("x", "p", 1)
    waiter = asyncio.ensure_future(slots.acquire("x", "p", 1))
    await _tick()
    slots.release(held)  # grants the waiter ...
    waiter.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (slots.total, slots.waiting, slots.live()) == (0, 0, [])


async def test_grants_follow_rank_then_arrival_skipping_full_experts_and_plans() -> None:
    slots = SlotScheduler(2, {"x": 1, "y": 2})
    for plan, limit in (("p", 1), ("q", 4)):
        slots.open_plan(plan, limit)
    blockers = [await slots.acquire("x", "q", 99), await slots.acquire("y", "q", 99)]
    order: list[str] = []

    async def claim(name: str, expert: str, plan: str, rank: int) -> Grant:
        grant = await slots.acquire(expert, plan, rank)
        order.append(name)
        return grant

    specs = [("low", "y", "q", 1), ("high-x", "x", "q", 9), ("mid", "y", "q", 5),
             ("p-first", "y", "p", 7), ("p-second", "y", "p", 8), ("mid2", "y", "q", 5)]
    tasks = [asyncio.ensure_future(claim(*spec)) for spec in specs]
    await _tick()
    assert order == [] and slots.waiting == 6
    slots.release(blockers[1])  # one y slot: the best y waiter whose plan has room
    await _tick()
    assert order == ["p-second"]
    slots.release(blockers[0])  # x frees: high-x; p is full, so p-first stays parked
    await _tick()
    assert order == ["p-second", "high-x"]
    for name in ["p-second", "high-x"]:
        slots.release(tasks[[s[0] for s in specs].index(name)].result())
        await _tick()
    assert order == ["p-second", "high-x", "p-first", "mid"]
    for task in tasks:
        task.cancel()
    await _tick()
    for task in tasks:
        if not task.cancelled():
            slots.release(task.result())
    assert (slots.total, slots.waiting) == (0, 0)


# ---------------------------------------------------------------------------- tenants


class Claims:
    """Claims on one scheduler (one plan), recording which tenant was granted when."""

    def __init__(self, slots: SlotScheduler, plan: str = "p") -> None:
        self.slots = slots
        self.plan = plan
        slots.open_plan(plan, 1000)
        self.order: list[str] = []
        self.held: list[Grant] = []
        self.tasks: list[asyncio.Future[None]] = []

    def add(self, tenant: str, n: int = 1, rank: int = 0, cost: int = 1) -> None:
        for _ in range(n):  # created in order, so they queue (get their seq) in order
            self.tasks.append(asyncio.ensure_future(self._claim(tenant, rank, cost)))

    async def _claim(self, tenant: str, rank: int, cost: int) -> None:
        grant = await self.slots.acquire("x", self.plan, rank, tenant=tenant, cost=cost)
        self.order.append(tenant)
        self.held.append(grant)

    async def serve(self, rounds: int) -> None:
        """Finish the oldest running task `rounds` times, as a busy limit-1 expert does."""
        for _ in range(rounds):
            self.slots.release(self.held.pop(0))
            await _tick()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await _tick()
        for grant in self.held:
            self.slots.release(grant)
        assert (self.slots.total, self.slots.waiting, self.slots.live()) == (0, 0, [])
        assert not self.slots.per_tenant and not self.slots.waiting_per_tenant


@pytest.mark.parametrize("fair_share", [True, False])
async def test_a_late_tenant_is_interleaved_with_a_flood_not_queued_behind_it(
        fair_share: bool) -> None:
    slots = SlotScheduler(4, {"x": 1}, fair_share=fair_share)
    claims = Claims(slots)
    claims.add("A", 51)
    await _tick()
    assert (slots.per_tenant["A"], slots.waiting_per_tenant["A"]) == (1, 50)
    claims.add("B", 3)  # same rank, after all of A's
    await _tick()
    assert slots.service["B"] == slots.service["A"] == 1  # lifted to A's on arrival
    await claims.serve(53)
    turns = [i for i, tenant in enumerate(claims.order) if tenant == "B"]
    if fair_share:  # A's head wins the ties (it came first), then they alternate
        assert turns == [2, 4, 6]
    else:  # first come, first served: after every one of A's 51
        assert turns == [51, 52, 53]
    await claims.close()


async def test_weights_split_a_contended_expert_two_to_one() -> None:
    slots = SlotScheduler(4, {"x": 0})
    slots.set_tenants({"A": (2, None), "B": (1, None)})
    claims = Claims(slots)
    claims.add("A", 40)
    claims.add("B", 40)
    await _tick()
    slots.set_limit("x", 1)  # both tenants flooding before the first grant
    await _tick()
    await claims.serve(29)
    first = claims.order[:30]
    assert abs(first.count("A") - 20) <= 1 and abs(first.count("B") - 10) <= 1
    assert slots.service["A"] == slots.service["B"] == 10  # 20 / 2 and 10 / 1
    await claims.close()


async def test_a_charge_moves_a_tenant_back_and_a_negative_one_is_ignored() -> None:
    slots = SlotScheduler(4, {"x": 0})
    claims = Claims(slots)
    claims.add("A", 3)
    claims.add("B", 3)
    await _tick()
    slots.charge("A", 100)  # e.g. its last answer was long
    slots.charge("A", -50)
    slots.charge("A", 0)
    assert slots.service == {"A": 100, "B": 0}
    slots.set_limit("x", 1)
    await _tick()
    await claims.serve(5)
    assert claims.order == ["B", "B", "B", "A", "A", "A"]  # A came first and lost the ties
    await claims.close()


async def test_a_higher_rank_beats_a_tenant_with_less_service() -> None:
    slots = SlotScheduler(4, {"x": 0})
    claims = Claims(slots)
    claims.add("B", 2, rank=0)
    claims.add("A", 2, rank=5)
    await _tick()
    slots.charge("A", 100)
    slots.set_limit("x", 1)
    await _tick()
    await claims.serve(3)
    assert claims.order == ["A", "A", "B", "B"]  # priority first, fair share within it
    await claims.close()


async def test_a_tenant_at_its_cap_is_skipped_and_resumes_when_a_slot_or_the_cap_frees() -> None:
    slots = SlotScheduler(4, {"x": 3})
    slots.set_tenants({"A": (1, 1)})
    claims = Claims(slots)
    claims.add("A", 2)
    await _tick()
    assert claims.order == ["A"] and slots.waiting_per_tenant["A"] == 1
    assert slots.has_room("x", "p") and slots.has_room("x", "p", "B")
    assert not slots.has_room("x", "p", "A")  # the expert has room, the tenant has none
    claims.add("B")
    await _tick()
    assert claims.order == ["A", "B"]  # A's waiter came first, and is skipped
    await claims.serve(1)  # A's first returns its slot: A's waiter competes again
    assert claims.order == ["A", "B", "A"]
    claims.add("A")
    await _tick()
    assert slots.waiting_per_tenant["A"] == 1 and slots.per_tenant["A"] == 1
    slots.set_tenants({"A": (1, 2)})  # a redeploy raises the cap: granted at once
    assert (slots.per_tenant["A"], slots.waiting_per_tenant["A"]) == (2, 0)
    await _tick()
    assert claims.order == ["A", "B", "A", "A"]
    assert slots.tenant_stats() == {
        "A": {"in_flight": 2, "waiting": 0, "service": 3.0, "weight": 1.0, "max_in_flight": 2},
        "B": {"in_flight": 1, "waiting": 0, "service": 2.0, "weight": 1.0,
              "max_in_flight": None}}
    await claims.close()


async def test_a_tenant_returning_from_idle_is_lifted_and_gets_no_burst() -> None:
    slots = SlotScheduler(4, {"x": 1})
    claims = Claims(slots)
    claims.add("A", 130)
    await _tick()
    await claims.serve(100)  # A alone: 101 grants so far, and it is still active
    claims.add("B", 10)
    await _tick()
    assert slots.service["B"] == slots.service["A"] == 101  # not 0: no banked credit
    await claims.serve(20)
    lead = 0
    for tenant in claims.order[101:]:
        lead += 1 if tenant == "B" else -1
        assert lead <= 1  # never more than one grant ahead of A
    assert claims.order[101:121].count("B") == 10
    await claims.close()


async def test_a_tenant_arriving_when_nobody_is_active_starts_from_the_last_counter() -> None:
    """VTC's empty-queue case: with nobody active there is no one to be lifted to, so the
    newcomer starts from the counter of the last tenant to go idle. Otherwise B, idle
    while A was served alone, would be 20 grants ahead once A came back."""
    slots = SlotScheduler(4, {"x": 1})
    slots.set_tenants({"A": (1, None), "B": (1, None)})
    slots.open_plan("p", 1)
    for _ in range(20):  # A alone, one at a time; then nobody is active at all
        slots.release(await slots.acquire("x", "p", 0, tenant="A"))
    assert slots.service == {"A": 20} and not slots.per_tenant
    claims = Claims(slots, "q")
    claims.add("B")
    await _tick()
    assert slots.service["B"] == 21  # started from A's 20, then its grant
    claims.add("A", 5)
    claims.add("B", 5)
    await _tick()
    await claims.serve(6)
    assert claims.order[1:] == ["A", "B", "A", "B", "A", "B"]
    await claims.close()


async def test_state_is_kept_only_for_configured_or_active_tenants() -> None:
    slots = SlotScheduler(2, {"x": 2})
    slots.set_tenants({"A": (1, None)})
    with pytest.raises(ValueError):
        slots.set_tenants({"A": (0, None)})
    guest = await slots.acquire("x", "p", 0, tenant="guest", cost=0)
    assert guest.cost == 1 and slots.service["guest"] == 1  # no grant is free
    assert set(slots.tenant_stats()) == {"A", "guest"}
    slots.release(guest)
    slots.charge("guest", 5)  # after it went idle: nothing to add to
    assert "guest" not in slots.service and set(slots.tenant_stats()) == {"A"}
    assert not slots.per_tenant and not slots.waiting_per_tenant and not slots._heaps
    slots.charge("A", 3)  # configured: kept while idle
    slots.set_tenants({})  # ... until it is configured no more
    assert slots.service == {} and slots.tenant_stats() == {}


# ---------------------------------------------------------------------------- the machine


class WatchedSlots(SlotScheduler):
    """A scheduler that shows its watcher every arrival and every grant as it happens."""

    def __init__(self, watcher: SlotMachine, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.watcher = watcher

    def _enqueue(self, grant: Grant) -> None:
        expected = self.watcher.lift_expected(grant.tenant)
        super()._enqueue(grant)
        self.watcher.arrived(grant, expected)

    def _grant(self, head: Grant) -> None:
        self.watcher.granting(head)
        super()._grant(head)
        self.watcher.granted(head)


@dataclass
class Wait:
    """What the no-starvation bound needs to know about one waiter (see `_check_bound`)."""

    lead: float  # its tenant's counter minus the least active counter, when it arrived
    own: float = 0.0  # its tenant's weighted service since then (grants and charges)
    grants: int = 0  # ... how many grants that was
    charges: int = 0  # ... and how many charges
    passed: Counter[str] = field(default_factory=Counter)  # other tenant -> passes


class SlotMachine(RuleBasedStateMachine):
    """Random interleavings of everything an executor does to the scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.slots = WatchedSlots(self, 3, dict(EXPERTS))
        self.slots.set_tenants(dict(TENANTS))
        self.limits = dict(EXPERTS)
        self.caps: dict[str, int | None] = {name: cap for name, (_, cap) in TENANTS.items()}
        self.over_cap: Counter[str] = Counter()  # in flight above a cap lowered under it
        self.model: dict[str, float] = {}  # the counters as the test computes them
        self.waits: dict[Grant, Wait] = {}
        self.max_cost = 1
        self.max_charge = 0
        self.open: set[str] = set()
        self.plans_made = 0
        self.pending: list[asyncio.Task[Grant]] = []
        self.held: list[Grant] = []

    # ------------------------------------------------------------ the watcher's side

    @staticmethod
    def weight(tenant: str) -> float:
        return TENANTS.get(tenant, (1.0, None))[0]

    def _active(self) -> set[str]:
        return {g.tenant for g in self.slots.live()}

    def _order(self, grant: Grant) -> tuple[int, float, int]:
        served = self.model[grant.tenant] if self.slots.fair_share else 0.0
        return (-grant.rank, served, grant.seq)

    def lift_expected(self, tenant: str) -> float | None:
        """The counter `tenant` must have once this waiter is queued (None: the floor)."""
        active = self._active()
        for name in active:  # an active tenant always has a counter, the model's
            assert self.slots.service.get(name) == self.model.get(name) is not None, name
        if tenant not in self.slots.service:  # never had one, or dropped while idle
            assert tenant not in active
            self.model.pop(tenant, None)
        if tenant in active:
            return self.model[tenant]  # already active: no lift
        own = self.model.get(tenant, 0.0)
        return max(own, min(self.model[name] for name in active)) if active else None

    def arrived(self, grant: Grant, expected: float | None) -> None:
        counter = self.slots.service.get(grant.tenant)
        assert counter is not None, f"active tenant {grant.tenant!r} has no counter"
        if expected is None:  # nobody else active: lifted to the last idle one, if more
            assert counter >= self.model.get(grant.tenant, 0.0)
        else:
            assert counter == expected, (grant.tenant, counter, expected)
        self.model[grant.tenant] = counter
        least = min(self.model[name] for name in self._active())
        self.waits[grant] = Wait(lead=counter - least)

    def granting(self, head: Grant) -> None:
        """Checked before each grant: the hard cap, the fair order, the starvation bound."""
        slots, tenant = self.slots, head.tenant
        cap = self.caps.get(tenant)
        assert cap is None or slots.per_tenant[tenant] < cap, (tenant, cap)
        mine = self._order(head)
        for other in slots.live():
            if other is head or other.state is not WaiterState.WAITING or other.future.done():
                continue
            if not slots.has_room(other.expert, other.plan_id, other.tenant):
                continue  # not eligible: its expert or plan is full, or its tenant capped
            # Fair order: no eligible waiter had a higher rank, or the same rank and a
            # smaller counter (or the same counter and an earlier arrival).
            assert not self._order(other) < mine, (other, head, self.model)
            if other.expert == head.expert and other.tenant != tenant \
                    and head.rank <= other.rank:
                wait = self.waits[other]
                wait.passed[tenant] += 1
                self._check_bound(other, wait)

    def granted(self, head: Grant) -> None:
        amount = head.cost / self.weight(head.tenant)
        self.model[head.tenant] += amount
        assert self.slots.service[head.tenant] == self.model[head.tenant]
        self.waits.pop(head, None)
        self._served(head.tenant, amount, grant=True)

    def _served(self, tenant: str, amount: float, grant: bool) -> None:
        for waiter, wait in self.waits.items():
            if waiter.tenant == tenant and waiter.state is WaiterState.WAITING:
                wait.own += amount
                wait.grants += grant
                wait.charges += not grant

    def _check_bound(self, waiter: Grant, wait: Wait) -> None:
        """No starvation: how often other tenants may pass a waiter w on its expert.

        Let w (tenant T, expert x, rank r) wait, and count a pass by another tenant U: a
        grant g to U on x with rank(g) <= r while w was still a live waiter, T under its
        cap and w's plan with room. Then w was eligible (x had room: g took it), so by
        the fair-order rule (`granting` checks it at every grant) g came first in
        (-rank, counter, arrival): rank(g) == r and c_U <= c_T at that moment.

        - c_U >= m0, the least counter among active tenants when w arrived: counters never
          decrease, and while T is active (all through w's wait) that least counter
          cannot fall, since a tenant becoming active is lifted to at least the least of
          the others (`lift_expected` checks the lift exactly).
        - each grant adds cost / w_U >= 1 / w_U to c_U (a cost is at least 1).
        - c_T = c_T0 + S_T: T, active all along, is never lifted; S_T is T's own
          weighted service since w arrived, its grants anywhere (each <= max_cost / w_T)
          and its charges (each <= max_charge / w_T).

        So the k-th pass needs m0 + (k - 1) / w_U <= c_T0 + S_T, that is

            passes_U(w) <= w_U * (L0 + S_T) + 1,   L0 = c_T0 - m0 (T's lead at arrival)
                        <= w_U * (L0 + (G_T * max_cost + C_T * max_charge) / w_T) + 1

        with G_T, C_T T's grants and charges during the wait. L0 is 0 when T was idle
        (it was lifted to m0); otherwise it is service T already had beyond the least
        active tenant. Only T's own consumption enters: nothing in the bound grows with
        how many requests U, or anyone else, queued. First come first served breaks it
        with any flood: w behind N earlier waiters of U at its rank is passed N times
        with L0 = S_T = 0, a bound of 1.
        """
        w_t = self.weight(waiter.tenant)
        worst = (wait.grants * self.max_cost + wait.charges * self.max_charge) / w_t
        assert wait.own <= worst + 1e-9
        for tenant, passes in wait.passed.items():
            bound = self.weight(tenant) * (wait.lead + wait.own) + 1
            assert passes <= bound + 1e-9, (waiter, tenant, passes, bound, wait)

    # ------------------------------------------------------------ driving it

    def _settle(self) -> None:
        self.loop.run_until_complete(_tick())
        still = []
        for task in self.pending:
            if not task.done():
                still.append(task)
            elif not task.cancelled():
                self.held.append(task.result())
        self.pending = still
        # Settled: every granted claim belongs to a caller whose acquire returned; a
        # waiter cancelled before (or just after) its grant holds nothing.
        granted = [g for g in self.slots.live() if g.state is WaiterState.GRANTED]
        assert sorted(map(id, granted)) == sorted(map(id, self.held))

    def _acquire(self, expert: str, plan: str, rank: int, tenant: str, cost: int) -> None:
        self.max_cost = max(self.max_cost, cost)
        self.pending.append(self.loop.create_task(
            self.slots.acquire(expert, plan, rank, tenant=tenant, cost=cost)))

    @initialize(limits=st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=2))
    def first_plans(self, limits: list[int]) -> None:
        for limit in limits:  # steps go to contention, not to waiting for a plan
            self.open_plan(limit)

    @precondition(lambda self: len(self.open) < 4)
    @rule(limit=st.sampled_from([1, 2, 4]))
    def open_plan(self, limit: int) -> None:
        plan = f"p{self.plans_made}"  # plan ids are never reused, as in the executor
        self.plans_made += 1
        self.slots.open_plan(plan, limit)
        self.open.add(plan)

    # Few ranks, so equal ranks (where fair share decides) are common.
    @precondition(lambda self: self.open)
    @rule(data=st.data(), expert=st.sampled_from(sorted(EXPERTS)), rank=st.integers(0, 2),
          tenant=st.sampled_from(TENANT_NAMES), cost=st.integers(1, 5))
    def acquire(self, data: st.DataObject, expert: str, rank: int, tenant: str,
                cost: int) -> None:
        self._acquire(expert, data.draw(st.sampled_from(sorted(self.open))), rank, tenant,
                      cost)
        self._settle()

    @precondition(lambda self: self.open)
    @rule(data=st.data(), expert=st.sampled_from(sorted(EXPERTS)), rank=st.integers(0, 2),
          tenant=st.sampled_from(TENANT_NAMES), cost=st.integers(1, 5),
          n=st.integers(2, 6))
    def flood(self, data: st.DataObject, expert: str, rank: int, tenant: str, cost: int,
              n: int) -> None:
        """One tenant queues several at once: what fair share must not let starve others."""
        plan = data.draw(st.sampled_from(sorted(self.open)))
        for _ in range(n):
            self._acquire(expert, plan, rank, tenant, cost)
        self._settle()

    @precondition(lambda self: self.slots.waiting)
    @rule(data=st.data(), tenant=st.sampled_from(TENANT_NAMES), cost=st.integers(1, 5))
    def join_a_queue(self, data: st.DataObject, tenant: str, cost: int) -> None:
        """Someone queues right behind a waiter (same expert, rank and plan), perhaps
        behind a flood: the case fair share is for."""
        waiting = sorted((g for g in self.slots.live() if g.state is WaiterState.WAITING),
                         key=lambda g: g.seq)
        ahead = data.draw(st.sampled_from(waiting))
        self._acquire(ahead.expert, ahead.plan_id, ahead.rank, tenant, cost)
        self._settle()

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), settle=st.booleans())
    def cancel(self, data: st.DataObject, settle: bool) -> None:
        data.draw(st.sampled_from(self.pending)).cancel()
        if settle:
            self._settle()

    @precondition(lambda self: self.held)
    @rule(data=st.data(), settle=st.booleans())
    def release(self, data: st.DataObject, settle: bool) -> None:
        grant = data.draw(st.sampled_from(self.held))
        self.held.remove(grant)
        self.slots.release(grant)
        if settle:
            self._settle()

    @precondition(lambda self: self.held)
    @rule(expert=st.sampled_from(sorted(EXPERTS)))
    def finish(self, expert: str) -> None:
        """Every task on one expert ends in the same step: a burst of grants, where first
        come first served would let a flood pass a waiter several times at once."""
        for grant in [g for g in self.held if g.expert == expert]:
            self.held.remove(grant)
            self.slots.release(grant)
        self._settle()

    @precondition(lambda self: self.held and self.pending)
    @rule(data=st.data())
    def cancel_and_release_in_one_step(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.pending)).cancel()
        grant = data.draw(st.sampled_from(self.held))
        self.held.remove(grant)
        self.slots.release(grant)
        self._settle()

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def close_plan(self, data: st.DataObject) -> None:
        plan = data.draw(st.sampled_from(sorted(self.open)))
        self.open.discard(plan)
        self.slots.close_plan(plan)
        self._settle()

    @rule(expert=st.sampled_from(sorted(EXPERTS)), limit=st.integers(0, 4))
    def set_limit(self, expert: str, limit: int) -> None:
        self.limits[expert] = limit
        self.slots.set_limit(expert, limit)
        self._settle()

    @rule(tenant=st.sampled_from(TENANT_NAMES), tokens=st.integers(-3, 20))
    def charge(self, tenant: str, tokens: int) -> None:
        """The engine's count once a task ended (any tenant, idle or not; < 0 ignored)."""
        kept = tenant in TENANTS or tenant in self._active()
        self.slots.charge(tenant, tokens)
        if tokens > 0 and kept:
            self.max_charge = max(self.max_charge, tokens)
            amount = tokens / self.weight(tenant)
            self.model[tenant] = self.model.get(tenant, 0.0) + amount
            self._served(tenant, amount, grant=False)
        assert self.slots.service.get(tenant) == self.model.get(tenant)

    @rule(t1=st.sampled_from(CAPS), t2=st.sampled_from(CAPS))
    def redeploy(self, t1: int | None, t2: int | None) -> None:
        """New caps (weights stay): a raised one grants at once, a lowered one drains."""
        self.caps.update(t1=t1, t2=t2)
        for tenant, cap in self.caps.items():
            self.over_cap[tenant] = 0 if cap is None else \
                max(0, self.slots.per_tenant[tenant] - cap)
        self.slots.set_tenants({name: (weight, self.caps[name])
                                for name, (weight, _) in TENANTS.items()})
        self._settle()

    @rule()
    def settle(self) -> None:
        self._settle()

    # ------------------------------------------------------------ invariants

    @invariant()
    def occupancy_matches_grants(self) -> None:
        live = self.slots.live()
        granted = [g for g in live if g.state is WaiterState.GRANTED]
        waiting = [g for g in live if g.state is WaiterState.WAITING]
        assert self.slots.total == len(granted) >= 0
        assert self.slots.waiting == len(waiting)
        # Between steps a granted caller may not have resumed yet (and may be about to
        # be cancelled, then it returns the slot): `_settle` checks the exact match.
        unsettled = [t for t in self.pending if not t.done()]
        assert len(self.held) <= len(granted) <= len(self.held) + len(unsettled)
        for expert in EXPERTS:
            n = sum(1 for g in granted if g.expert == expert)
            assert self.slots.per_expert[expert] == n >= 0
            queued = sum(1 for g in waiting if g.expert == expert)
            assert self.slots.waiting_per_expert[expert] == queued
        for plan in {g.plan_id for g in live}:
            assert self.slots.per_plan[plan] == sum(1 for g in granted if g.plan_id == plan)

    @invariant()
    def tenants_match_grants_and_caps(self) -> None:
        live = self.slots.live()
        for tenant in TENANT_NAMES:
            granted = sum(1 for g in live if g.tenant == tenant
                          and g.state is WaiterState.GRANTED)
            waiting = sum(1 for g in live if g.tenant == tenant
                          and g.state is WaiterState.WAITING)
            assert self.slots.per_tenant[tenant] == granted
            assert self.slots.waiting_per_tenant[tenant] == waiting
            cap = self.caps.get(tenant)
            if cap is not None:  # at most the cap, or what was in flight when it was lowered
                assert granted <= cap + self.over_cap[tenant]
                self.over_cap[tenant] = min(self.over_cap[tenant], max(0, granted - cap))
        assert sum(self.slots.per_tenant.values()) == self.slots.total
        # Only configured or active tenants hold state; no zero entries pile up.
        assert all(self.slots.per_tenant.values())
        assert all(self.slots.waiting_per_tenant.values())
        assert set(self.slots.service) <= set(TENANTS) | self._active()

    @invariant()
    def counters_match_the_model(self) -> None:
        for tenant in list(self.model):
            if tenant not in self.slots.service:  # dropped: only an idle unconfigured one
                assert tenant not in TENANTS and tenant not in self._active()
                del self.model[tenant]
        assert self.slots.service == self.model

    @invariant()
    def no_waiter_is_starved(self) -> None:
        for waiter in [w for w in self.waits if w.state is not WaiterState.WAITING]:
            del self.waits[waiter]  # the test's own bookkeeping stays small too
        for waiter, wait in self.waits.items():
            self._check_bound(waiter, wait)

    @invariant()
    def bounds_hold(self) -> None:
        assert 0 <= self.slots.total <= self.slots.max_in_flight
        assert self.slots.peak_in_flight <= self.slots.max_in_flight
        for plan in self.open:
            assert self.slots.per_plan[plan] <= self.slots.plan_limits[plan]

    @invariant()
    def no_grantable_waiter_is_left_waiting(self) -> None:
        for grant in self.slots.live():
            if grant.state is not WaiterState.WAITING or grant.future.done():
                continue
            assert not self.slots.has_room(grant.expert, grant.plan_id, grant.tenant), grant

    def teardown(self) -> None:
        for task in self.pending:
            task.cancel()
        self._settle()
        for grant in self.held:
            self.slots.release(grant)
        self.held.clear()
        self._settle()
        for grant in self.held:  # granted while draining
            self.slots.release(grant)
        for plan in list(self.open):
            self.slots.close_plan(plan)
        assert (self.slots.total, self.slots.waiting, self.slots.live()) == (0, 0, [])
        assert not self.slots._heaps and not self.slots._parked
        assert not self.slots.per_tenant and not self.slots.waiting_per_tenant
        assert set(self.slots.service) <= set(TENANTS)  # the guest's counter went
        self.loop.close()


SlotMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_slot_scheduler_under_random_cancellation = SlotMachine.TestCase
