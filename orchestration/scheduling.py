"""Scheduling policy: weights and ranks, strategy concurrency and the retry policy.

Data in, decision out, no Ray. The slots themselves (who dispatches now, under the
three bounds) are `orchestration.slots.SlotScheduler`; `build_retrying` composes
tenacity policies from config.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from orchestration.config import ExecutorConfig, RetryConfig
from orchestration.errors import TransientError
from orchestration.models import (
    EXPERT_WEIGHT,
    HIGH_EXPERT_WEIGHT,
    PRIMARY_WEIGHT,
    ExecutionStrategy,
    RequestPriority,
)

# ------------------------------------------------------------------ dispatch order
#
# One name, one meaning: *priority* is only the caller's (high | normal | low); an
# expert's *importance* (high | normal) gives its tasks a *weight* on the seeds' scale;
# a task's *rank* (weight shifted by its request's priority) orders dispatch.


def task_weight(role: str, importance: str = "normal") -> int:
    """A task's weight on the seeds' scale: primary 10, high-importance experts 5, others 1."""
    if role in ("primary", "synthesis"):
        return PRIMARY_WEIGHT
    return HIGH_EXPERT_WEIGHT if importance == "high" else EXPERT_WEIGHT


def dispatch_rank(base: int, request: RequestPriority, config: ExecutorConfig) -> int:
    """A task's dispatch rank: its weight shifted by its request's priority (larger first)."""
    return base + config.rank_shift[request.value]


def strategy_concurrency(strategy: ExecutionStrategy, config: ExecutorConfig) -> int:
    return config.strategy_concurrency[strategy]


# ------------------------------------------------------------------ retry policy


class stop_if(stop_base):  # noqa: N801 - named like tenacity's own policies
    """Stop when `predicate(retry_state)` is true (tenacity composes it with `|`)."""

    def __init__(self, predicate: Callable[[RetryCallState], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate(retry_state)


class wait_jittered(wait_base):  # noqa: N801 - named like tenacity's own policies
    """Scale another wait by a random factor in [1 - spread, 1 + spread].

    Unlike `wait_random_exponential` (uniform between 0 and the exponential), the
    schedule keeps its centre: with spread 0.5 the seeds' 0.2 s / 0.4 s waits become
    0.1-0.3 s / 0.2-0.6 s, so the retries of many tasks that failed together (an
    expert restarting) spread out instead of arriving in synchronized waves.
    """

    def __init__(self, inner: wait_base, spread: float,
                 rng: Callable[[], float] = random.random) -> None:
        self.inner = inner
        self.spread = spread
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.inner(retry_state) * (1 + self.spread * (2 * self.rng() - 1))


def backoff(policy: RetryConfig) -> wait_base:
    """The policy's exponential wait with its jitter."""
    exponential = wait_exponential(
        multiplier=policy.initial_wait_s, exp_base=policy.multiplier, max=policy.max_wait_s
    )
    return wait_jittered(exponential, policy.jitter) if policy.jitter else exponential


def build_retrying(
    policy: RetryConfig, on_wait: Callable[[float], None] | None = None,
    stop_before: Callable[[float], bool] | None = None,
) -> AsyncRetrying:
    """The seeds' retry: N attempts, waits initial x multiplier^n (jittered), transient errors only.

    `on_wait` receives each backoff the policy chose, so callers can report (and tests
    can assert) the waits without reading a clock. `stop_before(wait_s)` true also stops
    (the latency budget has no room for another attempt after that wait).
    """
    stop = stop_after_attempt(policy.attempts)
    if stop_before is not None:
        stop = stop | stop_if(lambda state: stop_before(state.upcoming_sleep))

    def record(state: RetryCallState) -> None:
        if on_wait is not None and state.next_action is not None:
            on_wait(state.next_action.sleep)

    return AsyncRetrying(
        stop=stop,
        wait=backoff(policy),
        retry=retry_if_exception_type(TransientError),
        before_sleep=record,
        reraise=True,
    )
