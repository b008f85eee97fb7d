"""Ray Serve ingress: HTTP + SSE and OpenAI-compatible routes in front of a Chorus team.

`serve run serve_app:app` serves `$CHORUS_CONFIG` (default `config/mock.yaml`);
`serve run serve_app:build_app config=config/chaos.yaml` picks another config. The
ingress starts (or attaches to) the team's actors and removes them when deleted.
"""


import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application

from actors.metrics import metrics
from actors.team import Team, unwrap
from orchestration.config import DEFAULT_CONFIG, ChorusConfig, load_config
from orchestration.errors import (
    BadRequestError,
    ChorusError,
    InvalidJSONError,
    UnauthorizedError,
)
from orchestration.models import OrchestrateRequest, new_id
from orchestration.openai_compat import (
    TEAM_MODEL,
    ChatCompletionRequest,
    CompletionIds,
    error_body,
    error_from,
    to_orchestrate,
    usage,
)
from orchestration.telemetry import RequestWindow
from orchestration.web import add_pages, page_options

logger = logging.getLogger("ray.serve")
api = FastAPI(title="Chorus", summary="A team of LLM experts behind one endpoint.")
add_pages(api)  # the playground at `/`, the operations view at `/ops`
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Metric tag `route`: the URL path for HTTP, `handle` for Python deployment-handle calls.
ORCHESTRATE, CHAT = "/v1/orchestrate", "/v1/chat/completions"


def _request_id(request: Request) -> str:
    # The proxy assigns (or keeps the caller's) `X-Request-ID`: one id in logs and replies.
    return request.headers.get("x-request-id") or new_id("req")


def _error_response(status: int, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> JSONResponse:
    # Serve's proxy puts the request id in `X-Request-ID` on every response, errors included.
    return JSONResponse(body, status_code=status, headers=headers)


@api.exception_handler(ChorusError)
async def _chorus_error(request: Request, exc: ChorusError) -> JSONResponse:
    headers = {}
    if exc.status == 429:
        headers["Retry-After"] = str(getattr(request.state, "retry_after", 1))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    # The matched route's template, not the URL: the same tag under any route prefix.
    route = getattr(request.scope.get("route"), "path", request.url.path)
    metrics().requests.inc(tags={"route": route, "outcome": exc.code})
    return _error_response(exc.status, error_from(exc), headers)


@api.exception_handler(RayActorError)
async def _actor_gone(request: Request, exc: RayActorError) -> JSONResponse:
    body = error_body(503, "unavailable", "a Chorus actor is down or restarting; retry shortly")
    return _error_response(503, body, {"Retry-After": "5"})


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _sse(event_type: str, data: dict[str, Any]) -> str:
    return f"event: {event_type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@serve.deployment(
    name="ChorusIngress",
    # The ingress only relays: it reserves no CPU or GPU, so it never takes an expert's slot.
    ray_actor_options={"num_cpus": 0, "num_gpus": 0},
    max_ongoing_requests=1000,
)
@serve.ingress(api)
class ChorusIngress:
    """HTTP face of one team: admission, auth, streaming, errors that name the field."""

    async def __init__(self, config_path: str | None = None) -> None:
        self.config: ChorusConfig = load_config(config_path)
        self.api_key = os.environ.get("CHORUS_API_KEY") or self.config.server.api_key
        app = serve.get_replica_context().app_name or "chorus"
        self.team = await Team.start(self.config, name=f"chorus-{app}")
        self.telemetry = RequestWindow()  # requests/s and percentiles for `/v1/stats`
        logger.info("Chorus team %s ready: %s", self.team.name, ", ".join(self.team.experts))

    def __del__(self) -> None:
        team = getattr(self, "team", None)
        if team is not None:
            team.shutdown()

    # ------------------------------------------------------------------ admission

    def _admit(self, request: Request) -> str:
        rid = request.state.request_id = _request_id(request)
        request.state.retry_after = self.config.server.retry_after_s
        if self.api_key:
            sent = request.headers.get("authorization", "")
            token = sent[7:] if sent.lower().startswith("bearer ") else request.headers.get(
                "x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                what = "wrong API key" if token else "missing API key (Authorization: Bearer …)"
                raise UnauthorizedError(what, field="authorization")
        return rid

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidJSONError(f"<body>: invalid JSON: {exc}", field="<body>") from None
        if not isinstance(body, dict):
            raise InvalidJSONError("<body>: must be a JSON object", field="<body>")
        return body

    def _bounds(self, req: OrchestrateRequest) -> None:
        limits = self.config.server
        if len(req.prompt) > limits.max_prompt_chars:
            raise BadRequestError(
                f"prompt: too long ({len(req.prompt)} characters, at most {limits.max_prompt_chars})",
                field="prompt")
        if req.max_tokens is not None and req.max_tokens > limits.max_tokens_limit:
            raise BadRequestError(
                f"max_tokens: {req.max_tokens} is above the limit of {limits.max_tokens_limit}",
                field="max_tokens")

    async def _start(self, req: OrchestrateRequest) -> tuple[Any, AsyncIterator[Any]]:
        """Accept the request or raise (4xx/429/503) before any byte of a 200 is sent."""
        self._bounds(req)
        events = self.team.stream(req)
        first = await events.__anext__()
        return first, events

    # ------------------------------------------------------------------ routes

    @api.post(ORCHESTRATE)
    async def orchestrate(self, request: Request) -> Any:
        rid = self._admit(request)
        body = await self._body(request)
        stream = body.pop("stream", True)
        if not isinstance(stream, bool):
            raise BadRequestError("stream: must be true or false", field="stream")
        req = OrchestrateRequest.parse({**body, "id": rid})
        first, events = await self._start(req)
        if stream:
            return StreamingResponse(self._relay(first, events, ORCHESTRATE),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        final = [event async for event in self._timed(first, events, ORCHESTRATE)][-1]
        if final.type == "error":
            return JSONResponse(error_body(final.status, final.code, final.message),
                                status_code=final.status)
        return JSONResponse({
            "id": rid, "plan": first.plan.model_dump(mode="json"), "content": final.content,
            "primary": final.primary.model_dump(mode="json"),
            "experts": [r.model_dump(mode="json") for r in final.experts],
            "timings": final.timings,
        })

    @api.post(CHAT)
    async def chat_completions(self, request: Request) -> Any:
        rid = self._admit(request)
        chat = ChatCompletionRequest.parse(await self._body(request))
        req = to_orchestrate(chat, self.team.config.expert_names, rid)
        first, events = await self._start(req)
        ids = CompletionIds(chat.model, rid)
        if chat.stream:
            include = bool(chat.stream_options and chat.stream_options.include_usage)
            chunks = self._chat_chunks(first, events, ids, req.prompt, include)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        final = [event async for event in self._timed(first, events, CHAT)][-1]
        if final.type == "error":
            return JSONResponse(error_body(final.status, final.code, final.message),
                                status_code=final.status)
        tokens = final.primary.tokens or len((final.content or "").split())
        return JSONResponse(ids.completion(final.content, usage(req.prompt, tokens)))

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        created = int(time.time())
        names = [TEAM_MODEL, *self.team.config.expert_names]
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "chorus"} for n in names]}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        stats = await self.team.stats(timeout_s=5.0)
        experts = {n: s.get("error", "ok") for n, s in stats["experts"].items()}
        healthy = any(v == "ok" for v in experts.values())
        return JSONResponse({"status": "ok" if healthy else "unhealthy", "experts": experts},
                            status_code=200 if healthy else 503)

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        self._admit(request)
        return {**await self.team.stats(), "ingress": {"node_id": _node_id()},
                "requests": self.telemetry.snapshot()}

    @api.get("/v1/options")
    async def options(self) -> dict[str, Any]:
        """The team and the request options, for the playground's form."""
        return page_options(self.team.config, auth=bool(self.api_key))

    # ------------------------------------------------------------------ Python handle API

    async def stream_events(self, data: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Same events as the SSE route, as dicts, for `Client.connect` (a handle call)."""
        req = OrchestrateRequest.parse(data)
        try:
            first, events = await self._start(req)
        except Exception as exc:
            raise unwrap(exc) from None
        async for event in self._timed(first, events, "handle"):
            yield event.model_dump(mode="json")

    async def team_stats(self) -> dict[str, Any]:
        return await self.team.stats()

    # ------------------------------------------------------------------ streaming

    async def _timed(self, first: Any, events: AsyncIterator[Any], route: str) -> AsyncIterator[Any]:
        """Relay events, closing the team stream (cancelling its tasks) if we stop early."""
        started = time.monotonic()
        outcome, ttft = "disconnected", None
        try:
            yield first
            async for event in events:
                if event.type == "primary" and outcome == "disconnected":
                    ttft = time.monotonic() - started
                    metrics().ttft.observe(ttft, tags={"route": route})
                    outcome = "streaming"
                if event.type in ("done", "error"):
                    outcome = "ok" if event.type == "done" else event.code
                    logger.info("request %s ended: %s", first.request_id, outcome)
                yield event
        finally:
            await events.aclose()  # caller gone: Team.stream cancels every task
            metrics().requests.inc(tags={"route": route, "outcome": outcome})
            latency = time.monotonic() - started
            metrics().latency.observe(latency, tags={"route": route})
            self.telemetry.record(latency, ttft, "disconnected" if outcome == "streaming" else outcome)

    async def _relay(self, first: Any, events: AsyncIterator[Any], route: str) -> AsyncIterator[str]:
        async for event in self._timed(first, events, route):
            yield _sse(event.type, event.model_dump(mode="json"))

    async def _chat_chunks(self, first: Any, events: AsyncIterator[Any], ids: CompletionIds,
                           prompt: str, include_usage: bool) -> AsyncIterator[str]:
        # With synthesis the answer is the synthesizer's: stream that, not the primary's.
        synthesizing = self.config.fusion.strategy == "synthesize" and bool(first.plan.experts)
        text_events = "fusion_delta" if synthesizing else "primary"
        sent, tokens = "", 0
        yield f"data: {json.dumps(ids.chunk({'role': 'assistant', 'content': ''}))}\n\n"
        async for event in self._timed(first, events, CHAT):
            piece = ""
            if event.type == text_events:
                piece, tokens = event.delta, tokens + 1
            elif event.type == "fusion":
                # `append` adds the experts' section after the primary's text.
                piece = event.content[len(sent):] if event.content.startswith(sent) else ""
            elif event.type == "error":
                yield f"data: {json.dumps(error_body(event.status, event.code, event.message))}\n\n"
            elif event.type == "done":
                yield f"data: {json.dumps(ids.chunk({}, finish_reason='stop'))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(ids.chunk(None, usage_=usage(prompt, tokens)))}\n\n"
            if piece:
                sent += piece
                yield f"data: {json.dumps(ids.chunk({'content': piece}))}\n\n"
        yield "data: [DONE]\n\n"


def _resolve(path: str) -> str:
    # Resolve on the driver: replicas may not share the caller's working directory.
    candidate = Path(path)
    if not candidate.is_absolute():
        here = Path.cwd() / candidate
        candidate = here if here.exists() else Path(__file__).resolve().parent / candidate
    return str(candidate)


def build_app(args: dict[str, str]) -> Application:
    """Application builder: `serve run serve_app:build_app config=config/chaos.yaml`."""
    path = _resolve(args.get("config") or os.environ.get("CHORUS_CONFIG") or DEFAULT_CONFIG)
    config = load_config(path)  # a malformed config fails here, naming the field
    return ChorusIngress.options(ray_actor_options=config.server.resources.ray_options()).bind(path)


app = build_app({})
