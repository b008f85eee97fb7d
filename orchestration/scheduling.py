"""Scheduling policy: priority order, the three concurrency bounds, and the retry policy.

Data in, decision out, no Ray: `pick_grants` decides which waiting tasks may be
dispatched now; `SlotScheduler` is the small asyncio shell that parks tasks until
they are granted; `build_retrying` composes tenacity policies from config.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from orchestration.config import ExecutorConfig, RetryConfig
from orchestration.errors import TransientError
from orchestration.models import (
    EXPERT_PRIORITY,
    HIGH_EXPERT_PRIORITY,
    PRIMARY_PRIORITY,
    ExecutionStrategy,
    RequestPriority,
)

# ------------------------------------------------------------------ priority scale


def task_priority(role: str, expert_priority: str = "normal") -> int:
    """The seeds' scale: primary 10, HIGH experts 5, others 1."""
    if role in ("primary", "synthesis"):
        return PRIMARY_PRIORITY
    return HIGH_EXPERT_PRIORITY if expert_priority == "high" else EXPERT_PRIORITY


def effective_priority(base: int, request: RequestPriority, config: ExecutorConfig) -> int:
    """Shift a task's priority by its request's priority (high/normal/low)."""
    return base + config.priority_shift[request.value]


def strategy_concurrency(strategy: ExecutionStrategy, config: ExecutorConfig) -> int:
    return config.strategy_concurrency[strategy]


# ------------------------------------------------------------------ grant decision


@dataclass(order=True)
class Waiter:
    """A task waiting for a dispatch slot; sorts by priority (high first), then arrival."""

    sort_key: tuple[int, int]
    expert: str = field(compare=False)
    plan_id: str = field(compare=False)
    future: asyncio.Future[None] | None = field(compare=False, default=None, repr=False)


@dataclass
class Occupancy:
    """What is dispatched right now, per bound."""

    total: int = 0
    per_expert: Counter[str] = field(default_factory=Counter)
    per_plan: Counter[str] = field(default_factory=Counter)

    def add(self, expert: str, plan_id: str, n: int = 1) -> None:
        self.total += n
        self.per_expert[expert] += n
        self.per_plan[plan_id] += n


def pick_grants(
    waiting: Iterable[Waiter],
    occupancy: Occupancy,
    max_in_flight: int,
    expert_limit: Callable[[str], int],
    plan_limit: Callable[[str], int],
) -> list[Waiter]:
    """Waiters to dispatch now: in priority order, skipping any whose expert or plan is full.

    Skipping (rather than stopping at) a blocked waiter keeps a busy expert from
    idling the others; among waiters that can run, order is strictly by priority.
    """
    taken = Occupancy(occupancy.total, Counter(occupancy.per_expert), Counter(occupancy.per_plan))
    grants = []
    for waiter in waiting:
        if taken.total >= max_in_flight:
            break
        if taken.per_expert[waiter.expert] >= expert_limit(waiter.expert):
            continue
        if taken.per_plan[waiter.plan_id] >= plan_limit(waiter.plan_id):
            continue
        taken.add(waiter.expert, waiter.plan_id)
        grants.append(waiter)
    return grants


class SlotScheduler:
    """Parks tasks until `pick_grants` lets them dispatch; one instance spans all plans."""

    def __init__(self, max_in_flight: int, expert_limits: dict[str, int]) -> None:
        self.max_in_flight = max_in_flight
        self.expert_limits = dict(expert_limits)
        self.plan_limits: dict[str, int] = {}
        self.plan_groups: dict[str, str] = {}
        self.occupancy = Occupancy()
        self.peak_in_flight = 0
        # Highest in-flight count any one plan reached, per group (the plan's strategy).
        self.peak_by_group: Counter[str] = Counter()
        self._waiting: list[Waiter] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def open_plan(self, plan_id: str, concurrency: int, group: str = "") -> None:
        self.plan_limits[plan_id] = concurrency
        self.plan_groups[plan_id] = group

    def close_plan(self, plan_id: str) -> None:
        self.plan_limits.pop(plan_id, None)
        self.plan_groups.pop(plan_id, None)
        self.occupancy.per_plan.pop(plan_id, None)

    async def acquire(self, expert: str, plan_id: str, priority: int) -> None:
        """Wait until this task may dispatch; cancelling the caller withdraws it cleanly."""
        waiter = Waiter((-priority, next(self._seq)), expert, plan_id)
        waiter.future = asyncio.get_running_loop().create_future()
        bisect.insort(self._waiting, waiter)
        self._pump()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(expert, plan_id)  # granted just as we were cancelled
            else:
                self._waiting.remove(waiter)
            raise

    def release(self, expert: str, plan_id: str) -> None:
        self.occupancy.add(expert, plan_id, -1)
        self._pump()

    def _pump(self) -> None:
        grants = pick_grants(
            self._waiting,
            self.occupancy,
            self.max_in_flight,
            lambda name: self.expert_limits.get(name, 1),
            lambda plan: self.plan_limits.get(plan, 1),
        )
        for waiter in grants:
            self._waiting.remove(waiter)
            self.occupancy.add(waiter.expert, waiter.plan_id)
            assert waiter.future is not None
            waiter.future.set_result(None)
            group = self.plan_groups.get(waiter.plan_id, "")
            in_plan = self.occupancy.per_plan[waiter.plan_id]
            self.peak_by_group[group] = max(self.peak_by_group[group], in_plan)
        self.peak_in_flight = max(self.peak_in_flight, self.occupancy.total)


# ------------------------------------------------------------------ retry policy


def build_retrying(
    policy: RetryConfig, on_wait: Callable[[float], None] | None = None
) -> AsyncRetrying:
    """The seeds' retry: N attempts, waits initial x multiplier^n, transient errors only.

    `on_wait` receives each backoff the policy chose, so callers can report (and tests
    can assert) the waits without reading a clock.
    """

    def record(state: RetryCallState) -> None:
        if on_wait is not None and state.next_action is not None:
            on_wait(state.next_action.sleep)

    return AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential(
            multiplier=policy.initial_wait_s, exp_base=policy.multiplier, max=policy.max_wait_s
        ),
        retry=retry_if_exception_type(TransientError),
        before_sleep=record,
        reraise=True,
    )
