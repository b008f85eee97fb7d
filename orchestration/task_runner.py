"""One task's life: attempts, retries, fallback and deadlines, with no Ray.

`TaskRunner.run(state)` drives a task to exactly one `TaskResult`:

    within the task's deadline (`timeout_s`: the whole answer, retries included):
    for the task's expert, then its fallback (if any):
        up to `retry.attempts` attempts, backing off (jittered) between them:
            wait for a slot -> dispatch -> await the Completion
        transient failure (engine error, expert down): hand off, next attempt
        stalled (no first token, or no new token, in time; the expert says): hand off,
            next attempt on another replica — none left: the fallback
    the deadline passes: ends `timeout` at once (no new attempt, no fallback)
    under a latency budget (`budget_until`): a retry or a fallback whose expert's recent
        p50 latency does not fit what is left is not started; the task ends `budget`
        (a primary falls back early when its fallback fits; docs/budget.md)
    bad input: ends at once (no retry, no fallback)
    cancellation (the request was cancelled, or Ray cancelled the expert's call):
        ends `cancelled` at once: never retried, never sent to a fallback; a task its
        plan cut (`TaskRun.cut`: the budget, a quorum) ends with that reason

Every attempt after the first *continues* the answer so far (`TaskRun.answer`, sent as
the task's `prefix`), whether it runs on the same replica, another, or the fallback
(docs/failover.md). The hand-off after a failure settles that answer: the text the
failed attempt generated when the expert said (`TransientError.generated`), else —
when a caller reads the task live — the text the caller has (`Dispatcher.delivered`).
An answer that cannot be continued (`cannot_continue`) starts over while nobody has
seen any of it, and otherwise ends the task with `AnswerInterruptedError`.

The runner reaches experts only through a `Dispatcher` (the executor's Ray boundary
implements it; tests pass a fake), and tells the caller what happens through
`notify` (the `Dispatched` / `Handoff` / `Retrying` records of `orchestration.wire`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from orchestration.config import RetryConfig
from orchestration.errors import (
    AnswerInterruptedError,
    BudgetError,
    ChorusError,
    DeadlineError,
    StalledError,
    TaskCancelledError,
    TaskTimeoutError,
    TransientError,
)
from orchestration.latency import RecentLatency
from orchestration.models import ExpertTask, TaskResult, TaskStatus
from orchestration.scheduling import build_retrying
from orchestration.tools import json_constraint
from orchestration.wire import Completion, Dispatched, Handoff, Record, Retrying, attempt_key


class Lease(Protocol):
    """A granted slot on one replica of an expert."""

    expert: str
    replica: str  # its label, "general#0"
    actor: str  # its actor's name (where the caller reads a streamed attempt's text)
    outcome: str  # how the attempt ended, for the replica's health ("failed" on a deadline)


class Dispatcher(Protocol):
    """How the runner reaches experts."""

    def slot(self, expert: str, task: ExpertTask,
             avoid: frozenset[str] = frozenset()) -> AbstractAsyncContextManager[Lease]:
        """Wait for a dispatch slot on `expert`, on a replica not in `avoid` (labels);
        the slot is returned on exit."""

    def others(self, expert: str, avoid: frozenset[str]) -> bool:
        """Whether `expert` has a replica to dispatch to that is not in `avoid`."""

    async def invoke(self, lease: Lease, task: ExpertTask, key: str) -> Completion:
        """Run one attempt; cancelling this await must cancel the remote call."""

    def live(self, task: ExpertTask) -> bool:
        """Whether a caller reads this task's text as it is generated."""

    async def delivered(self, task: ExpertTask, attempt: int) -> str:
        """The text of `task`'s answer its live caller has, once it stopped taking the
        text of `attempt` (after a `Handoff` without an answer)."""


@dataclass
class TaskRun:
    """Everything known about one task while it runs: the runner's only state."""

    task: ExpertTask
    started: float = field(default_factory=time.monotonic)
    stalled: set[str] = field(default_factory=set)  # replicas an attempt stalled on
    served_by: list[str] = field(default_factory=list)  # expert of each attempt
    replicas: list[str] = field(default_factory=list)  # replica of each attempt
    waits: list[float] = field(default_factory=list)  # backoff before each retry
    answer: str = ""  # the answer so far: the next attempt continues it
    continued_from: list[int] = field(default_factory=list)  # len(answer) at each attempt
    completion: Completion | None = None
    error: ChorusError | None = None
    # Under a latency budget: the moment (monotonic) by which the task must be done.
    budget_until: float | None = None
    cut: ChorusError | None = None  # why its plan cancelled it (budget, quorum), if it did

    @property
    def attempts(self) -> int:
        return len(self.served_by)

    def remaining_s(self) -> float:
        """Seconds left of the task's deadline (its whole answer, retries included)."""
        return self.started + self.task.timeout_s - time.monotonic()

    def key(self) -> str:
        """Where this attempt's text is written: unique per attempt."""
        return attempt_key(self.task.id, self.attempts)

    def result(self) -> TaskResult:
        task, done = self.task, self.completion
        fields: dict = {
            "task_id": task.id, "expert": task.expert, "role": task.role,
            "attempts": self.attempts, "latency_s": time.monotonic() - self.started,
            "served_by": list(self.served_by), "replicas": list(self.replicas),
            "retry_waits": list(self.waits), "continued_from": list(self.continued_from),
        }
        if done is not None:
            return TaskResult(
                status=TaskStatus.SUCCESS, result=done.text, ttft_s=done.ttft_s,
                tokens=done.completion_tokens, prompt_tokens=done.prompt_tokens,
                finish_reason=done.finish_reason, logprobs=done.extras.get("logprobs"),
                tool_calls=done.extras.get("tool_calls"),
                samples=done.extras.get("samples", []), **fields)
        error = self.error or ChorusError(f"{task.expert}: no attempt was made")
        return TaskResult(status=status_of(error), error=error.message,
                          error_code=error.code, error_field=error.field, **fields)


def cannot_continue(task: ExpertTask) -> str | None:
    """Why an answer of `task` cannot be continued from a prefix, or None (it can).

    A constrained answer (JSON schema, forced tool call) is generated under a grammar
    from its first token; tool calls are parsed from the whole text; choices 2..n and
    logprobs exist only in the attempt that produced them."""
    sampling = task.sampling
    if json_constraint(sampling) is not None:
        return "a structured answer (response_format or a forced tool call)"
    if sampling.tools:
        return "an answer that may call tools"
    if sampling.n > 1:
        return f"an answer of {sampling.n} choices"
    if sampling.logprobs:
        return "an answer with logprobs"
    return None


def status_of(error: ChorusError) -> TaskStatus:
    if isinstance(error, BudgetError):
        return TaskStatus.BUDGET
    if isinstance(error, TaskTimeoutError | DeadlineError):
        return TaskStatus.TIMEOUT
    if isinstance(error, TaskCancelledError):
        return TaskStatus.CANCELLED
    return TaskStatus.ERROR


class TaskRunner:
    """Runs tasks to one result each, under one retry policy and fallback map."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        retry: RetryConfig,
        fallbacks: dict[str, str | None],
        notify: Callable[[ExpertTask, Record], None] = lambda task, record: None,
    ) -> None:
        self.dispatcher = dispatcher
        self.retry = retry
        self.fallbacks = fallbacks
        self.notify = notify
        self.counters: Counter[str] = Counter()
        self.continued: Counter[str] = Counter()  # expert -> attempts that continued
        self.latency = RecentLatency()  # per expert: its recent successful attempts

    async def run(self, state: TaskRun) -> TaskResult:
        """Always returns (never raises): cancellation becomes a `cancelled` result."""
        task = state.task
        candidates = [task.expert]
        if (fallback := self.fallbacks.get(task.expert)) is not None:
            candidates.append(fallback)
        try:
            for expert in candidates:
                try:
                    state.completion = await self._on(expert, state)
                    break
                except (TransientError, _NoOtherReplica, BudgetError) as exc:
                    # (a retry that cannot fit the budget: its fallback may still fit)
                    state.error = exc.error if isinstance(exc, _NoOtherReplica) else exc
        except asyncio.CancelledError:
            # The request was cancelled (caller gone), or its plan cut this task: end
            # now, whatever was pending.
            state.error = state.cut or TaskCancelledError(f"{task.expert}: request cancelled")
        except ChorusError as exc:
            state.error = exc  # bad input, Ray-cancelled call: neither retried nor passed on
        outcome = "succeeded" if state.completion else _COUNTER[status_of(state.error)]
        self.counters[outcome] += 1
        return state.result()

    def unrun(self, state: TaskRun, error: ChorusError) -> TaskResult:
        """The result, ending with `error`, of a task whose job never ran `run` to its
        end (cancelled before its first step, or a bug); counted like every other."""
        state.error = error
        self.counters[_COUNTER[status_of(state.error)]] += 1
        return state.result()

    async def _on(self, expert: str, state: TaskRun) -> Completion:
        """Attempts on one expert under the retry policy; raises its last error."""

        def waited(seconds: float) -> None:
            state.waits.append(seconds)
            self.counters["retried"] += 1
            reason = state.error.message if state.error else "transient failure"
            self.notify(state.task, Retrying(state.task.id, state.attempts, expert,
                                             seconds, reason))

        refused: list[BudgetError] = []

        def no_room(wait_s: float) -> bool:  # tenacity's stop: the budget left no room
            if (why := self._no_room(expert, state, wait_s)) is not None:
                refused.append(why)
            return why is not None

        try:
            async for attempt in build_retrying(self.retry, waited, no_room):
                with attempt:
                    try:
                        return await self._attempt(expert, state)
                    except TransientError as exc:
                        state.error = exc
                        await self._hand_off(expert, state, exc)
                        if isinstance(exc, StalledError):  # never the same replica again
                            state.stalled.add(state.replicas[-1])
                            if not self.dispatcher.others(expert, frozenset(state.stalled)):
                                raise _NoOtherReplica(exc) from None
                        raise
        except TransientError:
            if refused:
                raise refused[0] from None
            raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _no_room(self, expert: str, state: TaskRun, wait_s: float = 0.0) -> BudgetError | None:
        """Why another attempt on `expert` (after `wait_s`) cannot finish within the
        budget, by the expert's recent p50 latency; None when it can (or no budget)."""
        if state.budget_until is None:
            return None
        left = state.budget_until - time.monotonic() - wait_s
        p50 = self.latency.latency(expert)
        if left > 0 and (p50 is None or p50 <= left):
            return None
        needs = f", its recent p50 latency is {p50:.2f}s" if p50 is not None else ""
        last = f"; the last attempt: {state.error.message}" if state.error else ""
        return BudgetError(f"{expert}: no attempt started: {max(left, 0):.2f}s of the "
                           f"latency budget left{needs}{last}")

    async def _attempt(self, expert: str, state: TaskRun) -> Completion:
        task, left = state.task, state.remaining_s()
        if state.attempts and (why := self._no_room(expert, state)) is not None:
            raise why  # a retry or a fallback that cannot finish in the budget
        if left <= 0:  # nothing is started after the deadline
            raise DeadlineError(f"{expert}: no complete answer within the deadline of "
                                f"{task.timeout_s:g}s ({state.attempts} attempt(s) made)")
        try:
            async with asyncio.timeout(left):
                return await self._dispatch(expert, state)
        except TimeoutError:
            raise DeadlineError(f"{expert}: no complete answer within the deadline of "
                                f"{task.timeout_s:g}s (attempt {state.attempts})") from None

    async def _dispatch(self, expert: str, state: TaskRun) -> Completion:
        task = state.task
        async with self.dispatcher.slot(expert, task, frozenset(state.stalled)) as lease:
            state.served_by.append(expert)
            state.replicas.append(lease.replica)
            key = state.key()
            attempt_task = task.model_copy(update={"attempt": state.attempts,
                                                   "prefix": state.answer})
            state.continued_from.append(len(state.answer))
            if state.answer:
                self.continued[expert] += 1
            self.counters["dispatched"] += 1
            self.notify(task, Dispatched(task.id, state.attempts, expert, lease.replica, key,
                                          lease.actor))
            began = time.monotonic()
            try:
                completion = await self.dispatcher.invoke(lease, attempt_task, key)
                self.latency.add(expert, time.monotonic() - began, completion.ttft_s)
                return completion
            except StalledError:
                lease.outcome = "failed"  # a replica that stalls is not healthy
                raise

    async def _delivered(self, expert: str, state: TaskRun) -> str:
        """The live caller's text, waited for within the task's deadline."""
        try:
            async with asyncio.timeout(max(state.remaining_s(), 0)):
                return await self.dispatcher.delivered(state.task, state.attempts)
        except TimeoutError:
            raise DeadlineError(
                f"{expert}: the answer broke off and its caller did not say what it had "
                f"received within the deadline of {state.task.timeout_s:g}s "
                f"(attempt {state.attempts})") from None

    async def _hand_off(self, expert: str, state: TaskRun, exc: TransientError) -> None:
        """Settle the answer the next attempt continues (see the module's docstring)."""
        task, why = state.task, cannot_continue(state.task)
        known = None if why or exc.generated is None else state.answer + exc.generated
        if self.dispatcher.live(task):
            self.notify(task, Handoff(task.id, state.attempts, known))
            answer = known if known is not None else await self._delivered(expert, state)
            if why and answer:
                raise AnswerInterruptedError(
                    f"{expert}: the answer broke off after {len(answer)} characters had "
                    f"reached the caller, and {why} cannot be continued "
                    f"(attempt {state.attempts}: {exc.message})")
        else:  # nobody has seen any of it: continue what is known, or start over
            answer = "" if why else known if known is not None else state.answer
        state.answer = answer


class _NoOtherReplica(Exception):
    """An attempt stalled and its expert has no other replica: try the fallback."""

    def __init__(self, error: StalledError) -> None:
        super().__init__(error.message)
        self.error = StalledError(f"{error.message}; no other replica of it to continue on")


_COUNTER = {TaskStatus.ERROR: "failed", TaskStatus.TIMEOUT: "timed_out",
            TaskStatus.CANCELLED: "cancelled", TaskStatus.BUDGET: "budget"}
