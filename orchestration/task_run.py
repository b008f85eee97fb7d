"""One task's state while it runs (`TaskRun`), and the runner's view of experts (`Dispatcher`).

`TaskRun` holds everything about one task, as vLLM's `RequestState` does for a request:
its attempts (expert, replica, where each continued from), the answer so far, the
attempt whose answer counts, its hedges, its budget and its plan's cut. The runner
(`orchestration.task_runner`) is its only writer. No Ray.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from orchestration.errors import (
    BudgetError,
    ChorusError,
    DeadlineError,
    TaskCancelledError,
    TaskTimeoutError,
)
from orchestration.models import ExpertTask, TaskResult, TaskStatus
from orchestration.wire import Completion, attempt_key


class Lease(Protocol):
    """A granted slot on one replica of an expert."""

    expert: str
    replica: str  # its label, "general#0"
    actor: str  # its actor's name (where the caller reads a streamed attempt's text)
    outcome: str  # how the attempt ended, for the replica's health ("failed" on a deadline)


class Dispatcher(Protocol):
    """How the runner reaches experts."""

    def slot(self, expert: str, task: ExpertTask, avoid: frozenset[str] = frozenset(),
             spare: bool = False) -> AbstractAsyncContextManager[Lease]:
        """Wait for a dispatch slot on `expert`, on a replica not in `avoid` (labels);
        the slot is returned on exit. `spare` (a hedge): a slot now or an
        `ExpertUnavailableError`, never a wait."""

    def spare(self, expert: str, task: ExpertTask, avoid: frozenset[str]) -> bool:
        """Whether a hedge of `task` would get a slot now on a ready replica of `expert`
        not in `avoid`, with nobody waiting for the expert."""

    def others(self, expert: str, avoid: frozenset[str]) -> bool:
        """Whether `expert` has a replica to dispatch to that is not in `avoid`."""

    async def invoke(self, lease: Lease, task: ExpertTask, key: str,
                     gated: bool = False) -> Completion:
        """Run one attempt; cancelling this await must cancel the remote call. `gated`:
        held from its start (it claims its first token: `TaskRunner.claim`)."""

    async def hold(self, lease: Lease, key: str) -> bool:
        """Hold attempt `key` (it claims its first token before sending it); False when
        it has a token already (or is gone)."""

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
    current: int = 0  # the attempt whose answer counts (a hedge that won, or the last)
    hedges: list[str] = field(default_factory=list)  # each hedge's outcome: won, lost

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
            "hedges": list(self.hedges),
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
    if isinstance(error, BudgetError):
        return TaskStatus.BUDGET
    if isinstance(error, TaskTimeoutError | DeadlineError):
        return TaskStatus.TIMEOUT
    if isinstance(error, TaskCancelledError):
        return TaskStatus.CANCELLED
    return TaskStatus.ERROR
