"""OpenAI requests in, Chorus requests out: chat completions and legacy completions.

`model: chorus` orchestrates the whole team; a model named after an expert asks that
expert alone. Every parameter of OpenAI's API is either honoured (it reaches the
engine, see docs/openai.md) or refused with `400 unsupported_parameter` naming it;
a value out of range is a `422` naming it. Nothing is dropped silently, unknown
fields included. Pure translation, no I/O: `orchestration/openai_output.py` shapes
the answers, the Serve ingress does the transport.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from orchestration.errors import (
    BadRequestError,
    ChorusError,
    UnknownExpertError,
    UnsupportedParameterError,
)
from orchestration.generation import MAX_CHOICES, Message
from orchestration.models import OrchestrateRequest, Seed, Temperature, TokenCount, parse_input

TEAM_MODEL = "chorus"
PRIORITY_HEADER = "x-chorus-priority"

# Parameters of OpenAI's API that Chorus refuses when set (null means "not set"): what
# they ask for has no engine behind it here. Values: why, for the error message.
REFUSED = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "functions": "deprecated by OpenAI; use tools",
    "function_call": "deprecated by OpenAI; use tool_choice",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "no reasoning model behind Chorus honours it",
    "verbosity": "no model behind Chorus honours it",
    "web_search_options": "web search is not supported",
    "prompt_cache_key": "prompt caching is not controllable per request",
    "prompt_cache_retention": "prompt caching is not controllable per request",
    "echo": "echoing the prompt is not supported",
    "suffix": "insertion (suffix) is not supported",
}
# Accepted only at their default: anything else would need a behaviour we lack.
DEFAULT_ONLY = {"store": (False,), "service_tier": ("auto", "default"),
                "modalities": (["text"],), "best_of": (1,), "echo": (False,)}
_PRIORITY_WORDS = ("high", "normal", "low")


class _Body(BaseModel):
    # Unknown fields are kept so that `refusals` can name them (a 400, not a silent drop).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def refusals(self, prefix: str = "") -> None:
        """Raise `400 unsupported_parameter` for the first parameter Chorus cannot honour."""
        for name, value in (self.model_extra or {}).items():
            if value is None:
                continue  # null: not set
            if name in DEFAULT_ONLY and value in DEFAULT_ONLY[name]:
                continue
            why = REFUSED.get(name, "not a parameter Chorus knows")
            raise UnsupportedParameterError(f"{prefix}{name}: {why}", field=f"{prefix}{name}")


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Body):
    """One message of the conversation (text content only)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None

    def to_message(self, index: int) -> Message:
        where = f"messages[{index}]."
        self.refusals(where)
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if part.type != "text":
                    raise UnsupportedParameterError(
                        f"{where}content[{j}].type: {part.type!r} parts are not supported "
                        "(text only)", field=f"{where}content[{j}].type")
                part.refusals(f"{where}content[{j}].")
            text = "".join(part.text or "" for part in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=text, name=self.name, tool_calls=self.tool_calls,
                       tool_call_id=self.tool_call_id)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # no obfuscation padding is ever sent


class _Common(_Body):
    """What chat and legacy completions share."""

    model: StrictStr
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    seed: Seed | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    user: StrictStr | None = None
    # Chorus's request priority (high|normal|low), or vLLM's integer form (lower first).
    priority: StrictStr | StrictInt | None = None
    # Chorus's latency budget and quorum (`extra_body`; docs/budget.md).
    budget_s: Annotated[StrictFloat, Field(gt=0, le=3600)] | None = None
    min_experts: Annotated[StrictInt, Field(ge=1, le=64)] | None = None

    def sampling_fields(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        fields = {"top_p": self.top_p, "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty, "stop": stop, "n": self.n,
                  "logit_bias": self.logit_bias, "user": self.user}
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    """OpenAI's chat-completion body: every field honoured or refused (docs/openai.md)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    metadata: dict[str, Any] | None = None
    safety_identifier: StrictStr | None = None

    @classmethod
    def parse(cls, data: Any) -> ChatCompletionRequest:
        return parse_input(cls, data)

    @property
    def max_answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling_fields(self) -> dict[str, Any]:
        fields = {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs,
                  "response_format": self.response_format, "tools": self.tools,
                  "tool_choice": self.tool_choice,
                  "parallel_tool_calls": self.parallel_tool_calls, "metadata": self.metadata}
        if self.user is None and self.safety_identifier is not None:
            fields["user"] = self.safety_identifier
        return {**super().sampling_fields(), **{k: v for k, v in fields.items() if v is not None}}


class CompletionRequest(_Common):
    """OpenAI's legacy completion body (`/v1/completions`): one prompt, sent as is."""

    prompt: StrictStr | list[StrictStr]
    max_tokens: TokenCount = 16  # OpenAI's default for this route
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None

    @classmethod
    def parse(cls, data: Any) -> CompletionRequest:
        return parse_input(cls, data)

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise UnsupportedParameterError(
                f"prompt: a batch of {len(self.prompt)} prompts is not supported (send one)",
                field="prompt")
        return self.prompt[0]

    def sampling_fields(self) -> dict[str, Any]:
        fields = super().sampling_fields()
        if self.logprobs is not None:
            fields.update(logprobs=True, top_logprobs=self.logprobs)
        return fields


_INTEGER = re.compile(r"-?[0-9]{1,18}")  # vLLM's integer priority; no "²", no 5000 digits


def request_priority(body: str | int | None, header: str | None) -> str:
    """`high|normal|low`, from the body's `priority` or else the header; vLLM's integer
    form maps by sign (negative: high, 0: normal, positive: low: lower runs first)."""
    for value, field in ((body, "priority"), (header, PRIORITY_HEADER)):
        if value is None or value == "":
            continue
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if isinstance(value, int):
            return "high" if value < 0 else "normal" if value == 0 else "low"
        if value in _PRIORITY_WORDS:
            return value
        raise BadRequestError(f"{field}: must be high, normal, low or an integer (vLLM's "
                              f"form: lower runs first), not {value!r}", field=field)
    return "normal"


def check_model(model: str, experts: list[str]) -> None:
    """The model names the team or one of its experts; otherwise 404 naming `model`."""
    if model != TEAM_MODEL and model not in experts:
        raise UnknownExpertError(
            f"model: unknown model {model!r}; available: {', '.join([TEAM_MODEL, *experts])}",
            field="model")


def to_orchestrate(body: ChatCompletionRequest | CompletionRequest, experts: list[str],
                   request_id: str, priority: str = "normal",
                   fusion: str = "append") -> OrchestrateRequest:
    """The Chorus request a chat (or legacy) completion stands for; refusals first."""
    body.refusals()
    if body.stream_options is not None:
        body.stream_options.refusals("stream_options.")
    check_model(body.model, experts)
    if (body.n or 1) > 1 and body.model == TEAM_MODEL and fusion == "synthesize":
        raise UnsupportedParameterError(
            "n: more than one choice is not supported for model 'chorus' when the team "
            "synthesizes its answer (fusion.strategy synthesize)", field="n")
    data: dict[str, Any] = {"id": request_id, "priority": priority,
                            "temperature": body.temperature, "seed": body.seed,
                            "budget_s": body.budget_s, "min_experts": body.min_experts}
    if isinstance(body, ChatCompletionRequest):
        messages = [m.to_message(i) for i, m in enumerate(body.messages)]
        data.update(messages=[m.model_dump(exclude_none=True) for m in messages],
                    max_tokens=body.max_answer_tokens)
    else:
        data.update(prompt=body.text(), raw=True, max_tokens=body.max_tokens)
    if body.model != TEAM_MODEL:
        data.update(primary=body.model, experts=[])
    data["sampling"] = body.sampling_fields()
    try:
        return OrchestrateRequest.parse({k: v for k, v in data.items() if v is not None})
    except BadRequestError as exc:
        chat = isinstance(body, ChatCompletionRequest)
        raise _renamed(exc, "messages" if chat else "prompt") from None


def _renamed(exc: BadRequestError, prompt_field: str) -> BadRequestError:
    """Name the caller's field: `sampling.stop` is `stop`; a chat's `prompt` is `messages`."""
    field = (exc.field or "").removeprefix("sampling.")
    if field in ("prompt", "<root>"):
        field = prompt_field
    message = exc.message.replace("sampling.", "")
    if not message.startswith(f"{field}:"):
        message = f"{field}: {message.split(': ', 1)[-1]}"
    return type(exc)(message, field=field)


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 405: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable", 504: "timeout_error"}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, used by every Chorus route."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_from(exc: ChorusError) -> dict[str, Any]:
    return error_body(exc.status, exc.code, exc.message, exc.field)
