"""Domain models: what a request, a plan, a task and their results look like.

Plain pydantic, no Ray: these objects cross actor boundaries (pickled) and the HTTP
boundary (JSON), so they are the one vocabulary every layer shares.
"""

from __future__ import annotations

import os
import random
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestration.errors import BadRequestError, FieldError, bad_request
from orchestration.generation import Message, Sample, Sampling, last_user_text
from orchestration.tenants import DEFAULT_TENANT


class ExecutionStrategy(StrEnum):
    """How many tasks of one plan may run at once (see `STRATEGY_CONCURRENCY`)."""

    SERIAL = "SERIAL"
    PARALLEL_LIMITED = "PARALLEL_LIMITED"
    PARALLEL_FULL = "PARALLEL_FULL"


class RequestPriority(StrEnum):
    """The caller's priority for a whole request; it shifts every task of the request."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class TaskStatus(StrEnum):
    """Terminal status of one task: every task ends with exactly one of these."""

    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    BUDGET = "budget"  # cut by the request's latency budget (docs/budget.md)


# The seeds' scale of task weights (p-queue priorities in TaskExecutor v3.0).
PRIMARY_WEIGHT = 10
HIGH_EXPERT_WEIGHT = 5
EXPERT_WEIGHT = 1


# Ids come from a generator seeded once per process from the OS: 48 random bits per id,
# server-unique in practice across replicas, without a system call per id.
_IDS = random.Random(int.from_bytes(os.urandom(16), "big"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{_IDS.getrandbits(48):012x}"


M = TypeVar("M", bound=BaseModel)


def parse_input(model: type[M], data: Any) -> M:
    """Validate caller input; a `BadRequestError` names the offending field."""
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object", field="<body>")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(exc) from None


# Callers' numbers are strict: "5" or true where a number goes is a 422 naming the
# field, never quietly converted (a float field still takes an integer).
TokenCount = Annotated[StrictInt, Field(ge=1)]
Temperature = Annotated[StrictFloat, Field(ge=0.0, le=2.0)]
# Seeds go to engines as 64-bit integers.
Seed = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InferenceOptions(_Model):
    """Sampling options applied to every task of a plan."""

    max_tokens: Annotated[int, Field(ge=1)] = 256
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    seed: int | None = None


class OrchestrateRequest(_Model):
    """What a caller asks for: a prompt (or a conversation) plus optional overrides."""

    # The text the router reads; with `messages`, the newest user turn (set from them).
    prompt: str
    # A conversation instead of a prompt: the experts see its turns (generation.chat_turns).
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    # The prompt is the model's whole input, sent without a chat template (/v1/completions).
    raw: StrictBool = False
    priority: RequestPriority = RequestPriority.NORMAL
    # Parallel experts to consult instead of the router's keyword choice.
    experts: list[str] | None = None
    # Expert that answers first and streams (default: the router's primary).
    primary: str | None = None
    strategy: ExecutionStrategy | None = None
    timeout_s: Annotated[StrictFloat, Field(gt=0, le=3600)] | None = None
    # The whole answer's latency budget (docs/budget.md): specialists still running at
    # its end are cut and the answer fused from what finished.
    budget_s: Annotated[StrictFloat, Field(gt=0, le=3600)] | None = None
    # Fuse as soon as this many specialists (and the primary) answered; cut the rest.
    min_experts: Annotated[StrictInt, Field(ge=1, le=64)] | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    # Sampling seed for every task; unset, each task gets a stable one of its own.
    seed: Seed | None = None
    # Also stream the specialists' texts (`expert_delta` events), not only the primary's.
    stream_experts: StrictBool = False
    # Sampling parameters, structured output and tools (OpenAI's meaning; docs/openai.md).
    sampling: Sampling = Field(default_factory=Sampling)
    # The caller's X-Request-ID, kept as a label for logs (never used as an identity).
    correlation_id: str | None = None
    id: str = Field(default_factory=lambda: new_id("req"))

    @classmethod
    def parse(cls, data: Any) -> OrchestrateRequest:
        return parse_input(cls, data)

    @model_validator(mode="before")
    @classmethod
    def _prompt_or_messages(cls, data: Any) -> Any:
        """`messages` set the prompt (their newest user turn); both only when they agree."""
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            return data
        try:
            derived = last_user_text([Message.model_validate(m) for m in data["messages"]])
        except ValidationError:
            return data  # the field validation names the bad message
        if not derived.strip():
            raise FieldError("messages", "no user turn with text")
        if data.get("prompt") not in (None, derived):
            raise FieldError("messages", "give either prompt or messages, not both")
        return {**data, "prompt": derived}

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("messages")
    @classmethod
    def _last_turn_from_user(cls, value: list[Message] | None) -> list[Message] | None:
        if value is not None and value[-1].role not in ("user", "tool"):
            raise ValueError("the last message must come from the user (or a tool)")
        return value


class ExecutorLoad(_Model):
    """What the router reads from the executor to choose a strategy."""

    active: int = 0
    queued: int = 0

    @property
    def total(self) -> int:
        return self.active + self.queued


class ExpertTask(_Model):
    """One unit of work for one expert."""

    id: str = Field(default_factory=lambda: new_id("task"))
    expert: str
    prompt: str
    system_prompt: str | None = None
    # The caller's conversation (None: `prompt` is the one user turn); see chat_turns.
    messages: list[Message] | None = None
    raw: bool = False  # `prompt` is sent as is, without the chat template
    sampling: Sampling = Field(default_factory=Sampling)
    role: Literal["primary", "expert", "synthesis"] = "expert"
    # The seeds' scale: primary 10, high-importance experts 5, others 1.
    weight: int = EXPERT_WEIGHT
    # The task's deadline: its whole answer, retries included.
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # Each attempt's limits: seconds to its first token, and between two tokens.
    ttft_timeout_s: Annotated[float, Field(gt=0)] | None = None
    stall_timeout_s: Annotated[float, Field(gt=0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 256
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    seed: int | None = None
    # Dispatch order across all plans: the weight shifted by the request's priority.
    rank: int = EXPERT_WEIGHT
    request_id: str | None = None
    # Set by the executor per dispatch; engines key their requests on (id, attempt).
    attempt: int = 1
    # Set by the executor per dispatch: the answer so far, which this attempt continues
    # as the start of the assistant's turn (empty: the attempt starts the answer).
    prefix: str = ""
    # Whether the caller reads this task's text as it is generated (the primary, a
    # synthesis, or every task with `stream_experts`); others return it in one piece.
    stream: bool = False


class ExecutionPlan(_Model):
    """The router's decision: who answers, in which order, how many at once."""

    id: str = Field(default_factory=lambda: new_id("plan"))
    request_id: str
    strategy: ExecutionStrategy
    priority: RequestPriority = RequestPriority.NORMAL
    primary: ExpertTask
    experts: list[ExpertTask] = Field(default_factory=list)
    options: InferenceOptions = Field(default_factory=InferenceOptions)
    reason: str = ""
    # Whose request it is (limits, fair share, usage: orchestration/ledger.py), and
    # whether it is part of one already admitted (a synthesis: not counted again).
    tenant: str = DEFAULT_TENANT
    follow_up: bool = False
    # The latency budget (docs/budget.md), as seconds from the plan's submission: the
    # whole answer's (`budget_s`: retries and fallbacks that cannot fit it never
    # start), and when the specialists still running are cut (`cut_s`: the budget less
    # the synthesis's share). `quorum`: how many specialists must have answered before
    # the rest are cut (None: all of them).
    budget_s: float | None = None
    cut_s: float | None = None
    quorum: int | None = None

    @property
    def tasks(self) -> list[ExpertTask]:
        return [self.primary, *self.experts]


class TaskResult(_Model):
    """The single terminal outcome of one task, with how hard we tried."""

    task_id: str
    expert: str
    role: Literal["primary", "expert", "synthesis"] = "expert"
    status: TaskStatus
    result: str | None = None
    error: str | None = None
    # Stable code of the last error (`engine_error`, `timeout`, `expert_unavailable`, ...),
    # and the request field it is about (bad input the engine found, e.g. `response_format`).
    error_code: str | None = None
    error_field: str | None = None
    attempts: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    # Completion tokens of the answer, as the engine counted them.
    tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    # When asked: per-token logprobs (OpenAI's chat shape) and tool calls of the answer.
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # Choices 2..n of the answer (`sampling.n`), each with its own counts.
    samples: list[Sample] = Field(default_factory=list)
    # Experts that actually served the attempts (differs from `expert` after a fallback).
    served_by: list[str] = Field(default_factory=list)
    # The replica (actor) of each attempt, e.g. `general#0`.
    replicas: list[str] = Field(default_factory=list)
    # Backoff waits (seconds) the retry policy chose between attempts, in order.
    retry_waits: list[float] = Field(default_factory=list)
    # Per attempt: how many characters of the answer it continued from (0: it started
    # the answer; docs/failover.md).
    continued_from: list[int] = Field(default_factory=list)
    # Each hedge of a slow first token dispatched for it: "won" (the hedge answered
    # first) or "lost" (docs/hedging.md).
    hedges: list[Literal["won", "lost"]] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status is TaskStatus.SUCCESS


# ---------------------------------------------------------------------------- events


class PlanEvent(_Model):
    type: Literal["plan"] = "plan"
    request_id: str
    plan: ExecutionPlan


class PrimaryDelta(_Model):
    """A piece of the primary expert's answer, as soon as it is generated."""

    type: Literal["primary"] = "primary"
    request_id: str
    expert: str
    delta: str
    attempt: int = 1


class TaskEvent(_Model):
    """A task was dispatched (`running`) or will be retried (`retrying`), with which attempt."""

    type: Literal["task"] = "task"
    request_id: str
    task_id: str
    expert: str
    role: Literal["primary", "expert", "synthesis"] = "expert"
    state: Literal["running", "retrying"]
    attempt: int
    replica: str | None = None
    reason: str | None = None
    hedged: bool = False  # a hedge of a slow first token (docs/hedging.md)


class ExpertDelta(_Model):
    """A piece of a specialist's answer (only with `stream_experts`)."""

    type: Literal["expert_delta"] = "expert_delta"
    request_id: str
    task_id: str
    expert: str
    delta: str
    attempt: int = 1


class ExpertEvent(_Model):
    type: Literal["expert"] = "expert"
    request_id: str
    result: TaskResult


class FusionEvent(_Model):
    type: Literal["fusion"] = "fusion"
    request_id: str
    strategy: str
    content: str
    failed: list[TaskResult] = Field(default_factory=list)


class FusionDelta(_Model):
    """A piece of a synthesized answer (fusion `synthesize`), streamed before `fusion`."""

    type: Literal["fusion_delta"] = "fusion_delta"
    request_id: str
    delta: str


class ErrorEvent(_Model):
    type: Literal["error"] = "error"
    request_id: str
    code: str
    message: str
    status: int = 500
    # The request field the error is about, when it is the caller's input.
    param: str | None = None


class DoneEvent(_Model):
    type: Literal["done"] = "done"
    request_id: str
    primary: TaskResult | None = None
    experts: list[TaskResult] = Field(default_factory=list)
    content: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)


StreamEvent = Annotated[
    PlanEvent
    | PrimaryDelta
    | TaskEvent
    | ExpertDelta
    | ExpertEvent
    | FusionDelta
    | FusionEvent
    | ErrorEvent
    | DoneEvent,
    Field(discriminator="type"),
]

TERMINAL_EVENTS = ("done", "error")


class OrchestrationResult(_Model):
    """Everything `Client.run` returns for one request."""

    id: str
    plan: ExecutionPlan
    content: str
    primary: TaskResult
    experts: list[TaskResult]
    timings: dict[str, float] = Field(default_factory=dict)
