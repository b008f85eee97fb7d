"""What an engine is asked for beyond the prompt: chat turns and sampling, no Ray, no I/O.

`Message` is one chat turn as the engines receive it (text content only); `Sampling`
holds the sampling parameters, structured output and tools a caller may set; `Sample`
is one extra choice (`n` > 1) that came back. `chat_turns` is the one rule that
combines an expert's `system_prompt` with the caller's conversation:

    the expert's system_prompt, then every system (or developer) message of the caller,
    in order, joined by a blank line, become ONE system turn at the start; the caller's
    other turns follow in their order. (Most chat templates accept a single leading
    system turn, and the expert's role must not be lost when a caller sends its own.)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    model_validator,
)

from orchestration.errors import FieldError

# The OpenAI limits: at most 4 stop sequences of ...; top_logprobs 0..20.
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 8  # `n`: each choice is one more generation on the primary's engine


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Message(_Model):
    """One turn of a conversation, as the engine's chat template receives it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    # An assistant turn that called tools (OpenAI shape), and a tool's answer to one.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def plain(self) -> dict[str, Any]:
        """The turn as a chat template reads it (fields that are set only)."""
        return self.model_dump(exclude_none=True)


class JsonSchemaFormat(_Model):
    name: str = "response"
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)
    description: str | None = None
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Model):
    """`text`, `json_object` (any JSON object) or `json_schema` (JSON valid against it)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"


class FunctionSpec(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})
    strict: StrictBool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: dict[Literal["name"], str]

    @property
    def name(self) -> str:
        return self.function["name"]


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class Sampling(_Model):
    """Sampling parameters, structured output and tools of one request (OpenAI's meaning)."""

    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] = (
        Field(default_factory=list))
    # Choices: the primary generates `n` samples (see docs/openai.md for the team).
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0
    # Token id -> bias, as in OpenAI (the ids are the engine's tokenizer's).
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # Who asked, for the engine's bookkeeping (vLLM: SamplingParams.extra_args).
    user: Annotated[str, Field(max_length=256)] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)],
                   Annotated[str, Field(max_length=512)]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Sampling:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.name not in names:
                raise FieldError("tool_choice", f"names {self.tool_choice.name!r}, which is "
                                 "not one of `tools`")
        elif self.tool_choice in ("required", "auto") and not self.tools:
            raise FieldError("tool_choice", f"{self.tool_choice!r} needs `tools`")
        if self.calls_tools and self.response_format and self.response_format.constrained:
            raise FieldError("response_format", "cannot be combined with tools")
        for key in self.logit_bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise FieldError("logit_bias", f"keys are token ids, not {key[:20]!r}")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the model may answer with tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def answers_alone(self) -> bool:
        """The answer must be a tool call or JSON: nothing may be appended to it."""
        return self.calls_tools or bool(self.response_format and self.response_format.constrained)

    def for_specialists(self) -> Sampling:
        """What a specialist of a team samples with: the caller's sampling, one choice of
        free text (no logprobs, tools or response format: its text is a contribution)."""
        return Sampling(top_p=self.top_p, presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty, stop=list(self.stop),
                        logit_bias=self.logit_bias, user=self.user, metadata=self.metadata)


class Sample(_Model):
    """One more choice of the primary (`n` > 1), with the engine's accounting."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


def chat_turns(system_prompt: str | None, messages: list[Message]) -> list[dict[str, Any]]:
    """The expert's conversation: one leading system turn (see module), then the others."""
    systems = [system_prompt] if system_prompt else []
    systems += [m.content for m in messages if m.role == "system" and m.content]
    turns = [{"role": "system", "content": "\n\n".join(systems)}] if systems else []
    return turns + [m.plain() for m in messages if m.role != "system"]


def last_user_text(messages: list[Message]) -> str:
    """The newest user turn: what the router reads to pick the experts."""
    return next((m.content for m in reversed(messages) if m.role == "user"), "")
