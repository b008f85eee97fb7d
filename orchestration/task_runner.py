"""One task's life: attempts, retries, fallback and deadlines, with no Ray.

`TaskRunner.run(state)` drives a task to exactly one `TaskResult`:

    for the task's expert, then its fallback (if any):
        up to `retry.attempts` attempts, backing off (jittered) between them:
            wait for a slot -> dispatch -> await the Completion within `timeout_s`
        transient failure (engine error, timeout, expert down): next attempt
    bad input: ends at once (no retry, no fallback)
    cancellation (the request was cancelled, or Ray cancelled the expert's call):
        ends `cancelled` at once: never retried, never sent to a fallback

The runner reaches experts only through a `Dispatcher` (the executor's Ray boundary
implements it; tests pass a fake), and tells the caller what happens through
`notify` (the `Dispatched` / `Retrying` records of `orchestration.wire`).
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
    ChorusError,
    TaskCancelledError,
    TaskTimeoutError,
    TransientError,
)
from orchestration.models import ExpertTask, TaskResult, TaskStatus
from orchestration.scheduling import build_retrying
from orchestration.wire import Completion, Dispatched, Record, Retrying, attempt_key


class Lease(Protocol):
    """A granted slot on one replica of an expert."""

    expert: str
    replica: str  # its label, "general#0"
    actor: str  # its actor's name (where the caller reads a streamed attempt's text)
    outcome: str  # how the attempt ended, for the replica's health ("failed" on a deadline)


class Dispatcher(Protocol):
    """How the runner reaches experts."""

    def slot(self, expert: str, task: ExpertTask) -> AbstractAsyncContextManager[Lease]:
        """Wait for a dispatch slot on `expert`; the slot is returned on exit."""

    async def invoke(self, lease: Lease, task: ExpertTask, key: str) -> Completion:
        """Run one attempt; cancelling this await must cancel the remote call."""


@dataclass
class TaskRun:
    """Everything known about one task while it runs: the runner's only state."""

    task: ExpertTask
    started: float = field(default_factory=time.monotonic)
    served_by: list[str] = field(default_factory=list)  # expert of each attempt
    replicas: list[str] = field(default_factory=list)  # replica of each attempt
    waits: list[float] = field(default_factory=list)  # backoff before each retry
    completion: Completion | None = None
    error: ChorusError | None = None

    @property
    def attempts(self) -> int:
        return len(self.served_by)

    def key(self) -> str:
        """Where this attempt's text is written: unique per attempt."""
        return attempt_key(self.task.id, self.attempts)

    def result(self) -> TaskResult:
        task, done = self.task, self.completion
        fields: dict = {
            "task_id": task.id, "expert": task.expert, "role": task.role,
            "attempts": self.attempts, "latency_s": time.monotonic() - self.started,
            "served_by": list(self.served_by), "replicas": list(self.replicas),
            "retry_waits": list(self.waits),
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


def status_of(error: ChorusError) -> TaskStatus:
    if isinstance(error, TaskTimeoutError):
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
                except TransientError as exc:
                    state.error = exc  # exhausted on this expert: next candidate
        except asyncio.CancelledError:
            # The request was cancelled (caller gone): end now, whatever was pending.
            state.error = TaskCancelledError(f"{task.expert}: request cancelled")
        except ChorusError as exc:
            state.error = exc  # bad input, Ray-cancelled call: neither retried nor passed on
        outcome = "succeeded" if state.completion else _COUNTER[status_of(state.error)]
        self.counters[outcome] += 1
        return state.result()

    async def _on(self, expert: str, state: TaskRun) -> Completion:
        """Attempts on one expert under the retry policy; raises its last error."""

        def waited(seconds: float) -> None:
            state.waits.append(seconds)
            self.counters["retried"] += 1
            reason = state.error.message if state.error else "transient failure"
            self.notify(state.task, Retrying(state.task.id, state.attempts, expert,
                                             seconds, reason))

        async for attempt in build_retrying(self.retry, waited):
            with attempt:
                try:
                    return await self._attempt(expert, state)
                except TransientError as exc:
                    state.error = exc
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _attempt(self, expert: str, state: TaskRun) -> Completion:
        task = state.task
        async with self.dispatcher.slot(expert, task) as lease:
            state.served_by.append(expert)
            state.replicas.append(lease.replica)
            key = state.key()
            attempt_task = task.model_copy(update={"attempt": state.attempts})
            self.counters["dispatched"] += 1
            self.notify(task, Dispatched(task.id, state.attempts, expert, lease.replica, key,
                                          lease.actor))
            try:
                async with asyncio.timeout(task.timeout_s):
                    return await self.dispatcher.invoke(lease, attempt_task, key)
            except TimeoutError:
                lease.outcome = "failed"  # a replica that misses deadlines is not healthy
                raise TaskTimeoutError(
                    f"{expert}: no complete answer within {task.timeout_s:g}s "
                    f"(attempt {state.attempts})") from None


_COUNTER = {TaskStatus.ERROR: "failed", TaskStatus.TIMEOUT: "timed_out",
            TaskStatus.CANCELLED: "cancelled"}
