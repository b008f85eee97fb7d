"""OpenAI compatibility: chat-completion requests in, Chorus requests out, and back.

`model: chorus` orchestrates the whole team; a model named after an expert asks that
expert alone. Pure translation, no I/O: the Serve ingress does the transport.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from orchestration.errors import BadRequestError, ChorusError, UnknownExpertError
from orchestration.models import OrchestrateRequest, Seed, TaskResult, parse_input

TEAM_MODEL = "chorus"


class ChatMessage(BaseModel):
    """One message of the conversation (text content only)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completion body that Chorus honours."""

    # Unknown OpenAI parameters (top_p, logprobs, ...) are ignored, as vLLM's server does.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    seed: Seed | None = None

    @classmethod
    def parse(cls, data: Any) -> ChatCompletionRequest:
        return parse_input(cls, data)


def to_orchestrate(chat: ChatCompletionRequest, experts: list[str], request_id: str,
                   priority: str = "normal") -> OrchestrateRequest:
    """The Chorus request a chat completion stands for."""
    if chat.model != TEAM_MODEL and chat.model not in experts:
        raise UnknownExpertError(
            f"model: unknown model {chat.model!r}; available: {', '.join([TEAM_MODEL, *experts])}",
            field="model",
        )
    system = "\n".join(m.text() for m in chat.messages if m.role in ("system", "developer"))
    turns = [m for m in chat.messages if m.role not in ("system", "developer")]
    if not turns or turns[-1].role != "user":
        raise BadRequestError("messages: the last message must come from the user",
                              field="messages")
    if len(turns) == 1:
        prompt = turns[0].text()
    else:  # earlier turns become context for the experts, newest last
        prompt = "\n\n".join(f"{m.role}: {m.text()}" for m in turns)
    if system:
        prompt = f"{system}\n\n{prompt}"
    data: dict[str, Any] = {"prompt": prompt, "id": request_id, "priority": priority,
                            "max_tokens": chat.max_completion_tokens or chat.max_tokens,
                            "temperature": chat.temperature, "seed": chat.seed}
    if chat.model != TEAM_MODEL:
        data.update(primary=chat.model, experts=[])
    try:
        return OrchestrateRequest.parse({k: v for k, v in data.items() if v is not None})
    except BadRequestError as exc:
        if exc.field == "prompt":
            raise BadRequestError(f"messages: {exc.message}", field="messages") from None
        raise


def usage(primary: TaskResult | None) -> dict[str, int]:
    """OpenAI's `usage` from the engine's own counts for the answer that was streamed."""
    prompt = (primary.prompt_tokens or 0) if primary else 0
    completion = primary.tokens if primary else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class CompletionIds:
    """The id, creation time and model shared by every chunk of one completion."""

    def __init__(self, model: str, request_id: str) -> None:
        self.id = f"chatcmpl-{request_id or uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def completion(self, content: str, usage_: dict[str, int],
                   finish_reason: str = "stop") -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": usage_,
        }

    def chunk(self, delta: dict[str, Any] | None = None, finish_reason: str | None = None,
              usage_: dict[str, int] | None = None) -> dict[str, Any]:
        choices = [] if delta is None else [
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                                "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return body


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
