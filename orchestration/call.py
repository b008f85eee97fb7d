"""One request on the caller's side: everything about it in one object. No Ray.

Like vLLM's `RequestState`, a `Call` is created when the request arrives and holds all
the caller knows about it: the request, the one clock it is timed by (`arrived`), its
plan, the assembly of its records and text, its inbox of typed items (fed by
`actors/caller.py`), the moment its first primary token left (measured once, by the
pipeline), and its outcome (read by the ingress for metrics and telemetry).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from orchestration.assembly import Assembly
from orchestration.errors import ChorusError, TaskCancelledError
from orchestration.models import ExecutionPlan, OrchestrateRequest
from orchestration.tenants import DEFAULT_TENANT
from orchestration.wire import Record

PENDING, STREAMING, OK, DISCONNECTED = "pending", "streaming", "ok", "disconnected"


@dataclass(slots=True)
class Records:
    """Executor records of this call's plan, in order."""

    records: list[Record]


@dataclass(slots=True)
class Text:
    """Text of one attempt (`key`), as its replica sent it."""

    key: str
    text: str


@dataclass(slots=True)
class Lost:
    """The executor's session broke (it died): the call ends with this error."""

    error: ChorusError


@dataclass(slots=True)
class TextLost:
    """The text session of replica `actor` broke: its attempts' later text is not taken."""

    actor: str


Item = Records | Text | Lost | TextLost


@dataclass(eq=False)
class Call:
    """Everything about one request on the caller's side."""

    request: OrchestrateRequest | None  # None: a synthesis the pipeline asked for
    arrived: float = field(default_factory=time.monotonic)  # the one clock
    plan: ExecutionPlan | None = None
    assembly: Assembly | None = None
    inbox: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    first_token_at: float | None = None
    # pending -> streaming (first primary token) -> ok | an error code | disconnected
    outcome: str = PENDING
    closed: bool = False  # the plan ended (its `Closed` record came): nothing to cancel
    executor: Any = None  # the handle its plan was submitted to (the Ray layer's)
    tenant: str = DEFAULT_TENANT  # whose key called (orchestration/tenants.py)
    budget_s: float | None = None  # its latency budget from `arrived` (docs/budget.md)
    ratelimit: dict[str, str] = field(default_factory=dict)  # its x-ratelimit-* at admission
    # replica actor -> the text session its attempts there are read from (the Ray layer's)
    reading: dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        if self.plan is not None:
            return self.plan.request_id
        return (self.request.id if self.request is not None else None) or ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    def elapsed_s(self) -> float:
        return time.monotonic() - self.arrived

    def first_token(self) -> None:
        """The first primary text left for the caller: TTFT, measured once."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.outcome = STREAMING

    def ended(self, event: Any) -> None:
        """The terminal event (`done` or `error`) left: the outcome is known."""
        if event.type == "done":
            self.outcome = OK
        elif event.code == TaskCancelledError.code:
            # Ray cancelled the request's calls because its caller left: a hang-up.
            self.outcome = DISCONNECTED
        else:
            self.outcome = event.code

    def final_outcome(self) -> str:
        """What the request came to: a stream that never reached `done` or `error`
        ended with its caller."""
        return DISCONNECTED if self.outcome in (PENDING, STREAMING) else self.outcome
