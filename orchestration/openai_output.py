"""Chorus events out, OpenAI answers in: completions, chunks and usage (no I/O, no Ray).

Choices: choice 0 is the request's answer (for `model: chorus`, the primary's answer
fused with the specialists'); choices 1..n-1 are the primary's other samples, fused with
the same specialists' answers. `usage` counts the primary's tokens, as its engine
counted them (every choice); `usage_by_expert` (extra field, `model: chorus`) lists every
task of the team with its own counts. Streamed: choice 0's text as it is generated,
then each other choice in one piece, then every choice's end (finish reason, tool
calls, logprobs), then `usage` with `stream_options.include_usage`. See docs/openai.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from orchestration.fusion import fuse
from orchestration.models import DoneEvent, TaskResult
from orchestration.openai_compat import TEAM_MODEL, error_body


@dataclass
class Choice:
    index: int
    content: str
    finish_reason: str
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


def choices(done: DoneEvent, strategy: str) -> list[Choice]:
    """Every choice of a finished request (see module)."""
    primary = done.primary
    assert primary is not None
    out = [_choice(0, done.content or "", primary.finish_reason, primary.logprobs,
                   primary.tool_calls)]
    fusion = "append" if strategy == "synthesize" else strategy
    for i, sample in enumerate(primary.samples, 1):
        alike = primary.model_copy(update={"result": sample.text})
        content = fuse(fusion, alike, done.experts).content  # type: ignore[arg-type]
        out.append(_choice(i, content, sample.finish_reason, sample.logprobs, sample.tool_calls))
    return out


def _choice(index: int, content: str, reason: str | None, logprobs: Any, calls: Any) -> Choice:
    return Choice(index, content, "tool_calls" if calls else (reason or "stop"), logprobs, calls)


def _counts(result: TaskResult, completion: int) -> dict[str, int]:
    prompt = result.prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def usage(done: DoneEvent) -> dict[str, int]:
    """The primary's tokens as its engine counted them, every choice included."""
    primary = done.primary
    if primary is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return _counts(primary, primary.tokens + sum(s.tokens for s in primary.samples))


def usage_by_expert(done: DoneEvent) -> list[dict[str, Any]]:
    """Each task of the team (primary first) with the tokens its engine counted."""
    tasks = [done.primary, *done.experts] if done.primary else list(done.experts)
    return [{"expert": (r.served_by or [r.expert])[-1], "role": r.role, "status": r.status.value,
             **_counts(r, r.tokens + sum(s.tokens for s in r.samples))} for r in tasks]


def legacy_logprobs(entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    """Chat-shape logprobs as the legacy completions API writes them."""
    if entries is None:
        return None
    offsets, at = [], offset
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


class Shape:
    """The id, creation time, model and kind (chat or legacy text) of one answer."""

    def __init__(self, model: str, request_id: str, kind: Literal["chat", "text"]) -> None:
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"
        self.created = int(time.time())
        self.model = model
        self.kind = kind

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": f"{kind}.chunk" if chunk and self.kind == "chat" else kind,
                "created": self.created, "model": self.model}

    def _logprobs(self, choice: Choice) -> dict[str, Any] | None:
        if self.kind == "text":
            return legacy_logprobs(choice.logprobs)
        return None if choice.logprobs is None else {"content": choice.logprobs, "refusal": None}

    def completion(self, done: DoneEvent, strategy: str) -> dict[str, Any]:
        """The whole answer (`stream: false`)."""
        body = self._head(chunk=False)
        body["choices"] = [self._whole(c) for c in choices(done, strategy)]
        body["usage"] = usage(done)
        if self.model == TEAM_MODEL:
            body["usage_by_expert"] = usage_by_expert(done)
        return body

    def _whole(self, choice: Choice) -> dict[str, Any]:
        out: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason,
                               "logprobs": self._logprobs(choice)}
        if self.kind == "text":
            return {**out, "text": choice.content}
        message: dict[str, Any] = {"role": "assistant", "content": choice.content or None,
                                   "refusal": None}
        if choice.tool_calls:
            message["tool_calls"] = choice.tool_calls
        elif message["content"] is None:
            message["content"] = ""
        return {**out, "message": message}

    def chunk(self, index: int, text: str | None = None, *, role: bool = False,
              calls: list[dict[str, Any]] | None = None, end: Choice | None = None) -> str:
        """One SSE line: a piece of text, tool calls, or a choice's end."""
        choice: dict[str, Any] = {"index": index, "finish_reason": end and end.finish_reason,
                                  "logprobs": end and self._logprobs(end)}
        if self.kind == "text":
            choice["text"] = text or ""
        else:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
            choice["delta"] = delta
        return _sse({**self._head(chunk=True), "choices": [choice]})

    def usage_chunk(self, done: DoneEvent) -> str:
        body = {**self._head(chunk=True), "choices": [], "usage": usage(done)}
        if self.model == TEAM_MODEL:
            body["usage_by_expert"] = usage_by_expert(done)
        return _sse(body)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream(events: AsyncIterator[Any], shape: Shape, strategy: str,
                 synthesizing: bool, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines of a streamed answer from the request's events (see module)."""
    text_events = "fusion_delta" if synthesizing else "primary"  # whose text is the answer
    sent = ""
    if shape.kind == "chat":
        yield shape.chunk(0, "", role=True)
    async for event in events:
        piece = ""
        if event.type == text_events:
            piece = event.delta
        elif event.type == "fusion":
            # `append` adds the experts' section after the primary's text.
            piece = event.content[len(sent):] if event.content.startswith(sent) else ""
        elif event.type == "error":
            yield _sse(error_body(event.status, event.code, event.message, event.param))
        elif event.type == "done":
            for line in _ends(event, shape, strategy):
                yield line
            if include_usage:
                yield shape.usage_chunk(event)
        if piece:
            sent += piece
            yield shape.chunk(0, piece)
    yield "data: [DONE]\n\n"


def _ends(done: DoneEvent, shape: Shape, strategy: str) -> list[str]:
    lines = []
    for choice in choices(done, strategy):
        if choice.index > 0:  # the other samples come whole, after the live one
            lines.append(shape.chunk(choice.index, choice.content or None,
                                     role=shape.kind == "chat"))
        if choice.tool_calls and shape.kind == "chat":
            lines.append(shape.chunk(choice.index, calls=choice.tool_calls))
        lines.append(shape.chunk(choice.index, end=choice))
    return lines
