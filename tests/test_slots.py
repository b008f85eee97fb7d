"""The slot scheduler under cancellation at any moment (no Ray).

The stateful test drives acquire / cancel / release / close-plan / set-limit in
random orders, sometimes cancelling and releasing in the same loop step (the race
that leaked every slot of a served app), and checks the invariants after every step.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from orchestration.slots import Grant, SlotScheduler, WaiterState

EXPERTS = {"a": 2, "b": 1, "c": 3}


async def _tick(rounds: int = 3) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)  # one loop step: let woken tasks run (not a timed wait)


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


class SlotMachine(RuleBasedStateMachine):
    """Random interleavings of everything an executor does to the scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.slots = SlotScheduler(3, dict(EXPERTS))
        self.limits = dict(EXPERTS)
        self.open: set[str] = set()
        self.plans_made = 0
        self.pending: list[asyncio.Task[Grant]] = []
        self.held: list[Grant] = []

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

    @precondition(lambda self: len(self.open) < 4)
    @rule(limit=st.sampled_from([1, 2, 4]))
    def open_plan(self, limit: int) -> None:
        plan = f"p{self.plans_made}"  # plan ids are never reused, as in the executor
        self.plans_made += 1
        self.slots.open_plan(plan, limit)
        self.open.add(plan)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), expert=st.sampled_from(sorted(EXPERTS)),
          rank=st.integers(-20, 40))
    def acquire(self, data: st.DataObject, expert: str, rank: int) -> None:
        plan = data.draw(st.sampled_from(sorted(self.open)))
        self.pending.append(self.loop.create_task(self.slots.acquire(expert, plan, rank)))
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

    @rule()
    def settle(self) -> None:
        self._settle()

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
            assert not self.slots.has_room(grant.expert, grant.plan_id), grant

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
        self.loop.close()


SlotMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_slot_scheduler_under_random_cancellation = SlotMachine.TestCase
