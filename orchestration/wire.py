"""Records that travel between Chorus's own actors: small, plain, never validated again.

Pydantic stays at the edges (caller input, events that leave the service); between
the expert, the executor and the caller's team code these slotted dataclasses are
pickled as they are. How they flow (see docs/token-path.md):

    expert.run(task, key, caller) -> Completion     (one per attempt, to the executor)
    expert.session(caller)  -> [(key, text, tokens)] batches (text, straight to the caller)
    executor.submit(plan)   -> Admitted                      (or QueueFullError: a 429)
    executor.session(caller) -> [(request id, Dispatched | Handoff | Retrying | Finished | Closed)]
    executor.delivered(request id, task id, attempt, text)  (the caller's answer to a
                                                            Handoff without `answer`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestration.models import TaskResult


def attempt_key(task_id: str, attempt: int) -> str:
    """Where attempt `attempt` of a task writes its text: unique per attempt."""
    return f"{task_id}:{attempt}"


def task_of(key: str) -> str:
    return key.rpartition(":")[0]


def attempt_of(key: str) -> int:
    return int(key.rpartition(":")[2])


@dataclass(slots=True)
class Completion:
    """What one attempt produced: the whole text plus the engine's own accounting."""

    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    # Seconds from the engine call to its first delta (the expert's view of TTFT).
    ttft_s: float | None = None
    replica: str = ""
    # What the engine reports only when asked, as plain data: `logprobs` and
    # `tool_calls` of the answer, and `samples` (choices 2..n: dicts with the fields
    # of `generation.Sample`).
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Admitted:
    """First record of every executor stream: the plan is queued (no 429)."""

    active: int
    queued: int
    # The tenant's `x-ratelimit-*` headers as of this request (none: it has no limits).
    ratelimit: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Dispatched:
    """An attempt of a task was sent to a replica; its text (if streamed) is at `key`."""

    task_id: str
    attempt: int
    expert: str
    replica: str
    key: str
    actor: str = ""  # the replica's actor name: where the caller reads the text
    # A hedge of the current attempt (docs/hedging.md): its text counts only if it won.
    hedged: bool = False


@dataclass(slots=True, frozen=True)
class Handoff:
    """Attempt `attempt` of a streamed task failed; the next one continues its answer.

    The caller stops taking that attempt's text. `answer` is the whole answer so far
    when the executor knows it (the expert said what the attempt had generated): the
    caller sends what it lacks of it. None (the process died with it): the caller
    answers `executor.delivered` with the text it has, and the next attempt continues
    that (docs/failover.md).
    """

    task_id: str
    attempt: int
    answer: str | None = None


@dataclass(slots=True, frozen=True)
class Retrying:
    """An attempt failed with a transient error; the next starts after `wait_s`."""

    task_id: str
    attempt: int
    expert: str
    wait_s: float
    reason: str


@dataclass(slots=True, frozen=True)
class Finished:
    """A task's single terminal result."""

    result: TaskResult


@dataclass(slots=True, frozen=True)
class Closed:
    """Last record: every task of the plan has finished."""


Record = Admitted | Dispatched | Handoff | Retrying | Finished | Closed
