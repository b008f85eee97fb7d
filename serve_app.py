"""Ray Serve ingress: HTTP + SSE and OpenAI-compatible routes in front of a Chorus team.

`serve run serve_app:app` serves `$CHORUS_CONFIG` (default `config/mock.yaml`);
`serve run serve_app:build_app config=config/chaos.yaml` picks another config. Each
ingress replica is a stateless client of the team: the first one starts the team's
controller (`actors/controller.py`), which owns every actor of the team; the others,
and replicas of later deploys, attach to it and make it reconcile with their config.
Deleting the app removes the team. Every answer that is not a 200 has the documented
error shape (`{"error": {message, type, param, code}}`), unknown routes, wrong methods
and a draining server included.
"""

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from actors import gate, stopping
from actors.gate import DrainGate, app_deleted
from actors.hangups import EventStream, route_of, until_answered
from actors.http_errors import install_error_handlers
from actors.metrics import metrics
from actors.team import Team
from orchestration.call import Call
from orchestration.config import DEFAULT_CONFIG, ChorusConfig, load_config
from orchestration.errors import (
    BadRequestError,
    ForbiddenError,
    ShuttingDownError,
)
from orchestration.http_input import correlation_id, parse_body, too_large
from orchestration.models import OrchestrateRequest, new_id
from orchestration.openai_compat import (
    PRIORITY_HEADER,
    TEAM_MODEL,
    ChatCompletionRequest,
    CompletionRequest,
    check_model,
    error_body,
    request_priority,
    to_orchestrate,
)
from orchestration.openai_output import Shape
from orchestration.openai_output import stream as openai_stream
from orchestration.tenants import DEFAULT_TENANT, Keyring
from orchestration.web import page_options, pages

logger = logging.getLogger("ray.serve")
api = FastAPI(title="Chorus", summary="A team of LLM experts behind one endpoint.")
api.include_router(pages)  # the playground at `/`, the operations view at `/ops`
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ID_HEADER = "X-Chorus-Request-Id"  # the server-unique id; X-Request-ID is the caller's label
# Metric tag `route`: the route template for HTTP, `handle` for Python handle calls.
ORCHESTRATE, CHAT, COMPLETIONS = "/v1/orchestrate", "/v1/chat/completions", "/v1/completions"


install_error_handlers(api)  # every error in the documented shape (actors/http_errors.py)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _sse(event_type: str, data: dict[str, Any]) -> str:
    return f"event: {event_type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


api.add_middleware(DrainGate)  # before @serve.ingress: Serve freezes a copy of `api`


@serve.deployment(
    name="ChorusIngress",
    # The ingress only relays: it reserves no CPU or GPU, so it never takes an expert's slot.
    ray_actor_options={"num_cpus": 0, "num_gpus": 0},
    max_ongoing_requests=1000,
    # A team that cannot start (placement, engine) fails the deploy once, not thrice.
    max_constructor_retry_count=1,
)
@serve.ingress(api)
class ChorusIngress:
    """HTTP face of one team: admission, auth, streaming, errors that name the field."""

    async def __init__(self, config_path: str | None = None, deployed_at: float = 0.0) -> None:
        self.config: ChorusConfig = load_config(config_path)
        self.keys = Keyring.build(self.config.tenants,
                                  os.environ.get("CHORUS_API_KEY") or self.config.server.api_key)
        self.tenants = {t.name: t for t in self.config.tenants}
        self.app_name = serve.get_replica_context().app_name or "chorus"
        self.team = await Team.start(self.config, name=f"chorus-{self.app_name}",
                                     app=self.app_name, deployed_at=deployed_at)
        gate.serving(self.team, self.config.server.retry_after_s)
        logger.info("Chorus team %s ready: %s", self.team.name,
                    ", ".join(label for group in self.team.replicas.values() for label in group))

    async def __del__(self) -> None:
        """Serve stops this replica (scale-down, redeploy, or the app is deleted): only
        a deleted app takes the team with it."""
        team = getattr(self, "team", None)
        if team is None:
            return
        if await app_deleted(self.app_name):
            logger.info("app %s deleted: removing its team", self.app_name)
            await team.remove()
        else:
            team.detach()

    # ------------------------------------------------------------------ admission

    def _authorize(self, request: Request) -> None:
        """With keys configured, the caller's key names its tenant, or 401."""
        request.state.tenant = self.keys.caller(request.headers)

    def _admit(self, request: Request) -> Call:
        """Auth, then a server-unique id and the request's one state (its `Call`); the
        caller's X-Request-ID is only a label."""
        request.state.retry_after = self.config.server.retry_after_s
        request.state.team = self.team  # for a hang-up seen by an exception handler
        call = request.state.call = Call(None)
        self._authorize(request)
        call.tenant = request.state.tenant or DEFAULT_TENANT
        request.state.correlation_id = correlation_id(
            request.headers.get("x-request-id"), self.config.server.max_correlation_id_chars)
        request.state.request_id = new_id("req")
        return call

    async def _body(self, request: Request) -> dict[str, Any]:
        limits = self.config.server
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_large(int(declared), limits.max_body_bytes)
        # Read in chunks and stop past the bound: a chunked upload declares no length.
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise too_large(len(raw), limits.max_body_bytes, declared=False)
        return parse_body(bytes(raw), limits.max_body_bytes, limits.max_json_depth)

    def _bounds(self, req: OrchestrateRequest) -> None:
        limits = self.config.server
        field = "messages" if req.messages else "prompt"
        size = sum(len(m.content) for m in req.messages) if req.messages else len(req.prompt)
        if size > limits.max_prompt_chars:
            raise BadRequestError(
                f"{field}: too long ({size} characters, at most {limits.max_prompt_chars})",
                field=field)
        if req.max_tokens is not None and req.max_tokens > limits.max_tokens_limit:
            raise BadRequestError(
                f"max_tokens: {req.max_tokens} is above the limit of {limits.max_tokens_limit}",
                field="max_tokens")

    async def _start(self, call: Call, req: OrchestrateRequest,
                     live: bool) -> tuple[Any, AsyncIterator[Any]]:
        """Accept the request or raise (4xx/429/503) before any byte of a 200 is sent."""
        self._bounds(req)
        tenant = self.tenants.get(call.tenant)
        if tenant is not None and not tenant.allows(req.priority):
            raise ForbiddenError(f"priority: tenant {call.tenant!r} may ask for "
                                 f"{tenant.priority_max!r} at most", field="priority")
        call.request = req
        events = self.team.stream(req, live=live, call=call)
        first = await events.__anext__()
        return first, events

    # ------------------------------------------------------------------ routes

    @api.post(ORCHESTRATE)
    async def orchestrate(self, request: Request) -> Any:
        call = self._admit(request)
        rid = request.state.request_id
        with until_answered(request):
            body = await self._body(request)
            stream = body.pop("stream", True)
            if not isinstance(stream, bool):
                raise BadRequestError("stream: must be true or false", field="stream")
            req = OrchestrateRequest.parse(
                {**body, "id": rid, "correlation_id": request.state.correlation_id})
            first, events = await self._start(call, req, live=stream)
        headers = {ID_HEADER: rid, **call.ratelimit}
        if stream:
            return EventStream(self._relay(call, first, events, ORCHESTRATE),
                               media_type="text/event-stream",
                               headers={**SSE_HEADERS, **headers})
        final = [event async for event in self._timed(call, first, events, ORCHESTRATE)][-1]
        if final.type == "error":
            return JSONResponse(error_body(final.status, final.code, final.message, final.param),
                                status_code=final.status, headers=headers)
        return JSONResponse({
            "id": rid, "correlation_id": req.correlation_id,
            "plan": first.plan.model_dump(mode="json"), "content": final.content,
            "primary": final.primary.model_dump(mode="json"),
            "experts": [r.model_dump(mode="json") for r in final.experts],
            "timings": final.timings,
        }, headers=headers)

    @api.post(CHAT)
    async def chat_completions(self, request: Request) -> Any:
        return await self._openai(request, ChatCompletionRequest, "chat")

    @api.post(COMPLETIONS)
    async def completions(self, request: Request) -> Any:
        return await self._openai(request, CompletionRequest, "text")

    async def _openai(self, request: Request, model: Any, kind: Literal["chat", "text"]) -> Any:
        """An OpenAI chat or legacy completion: translate, run, shape (docs/openai.md)."""
        call = self._admit(request)
        rid = request.state.request_id
        with until_answered(request):
            body = model.parse(await self._body(request))
            priority = request_priority(body.priority, request.headers.get(PRIORITY_HEADER))
            fusion = self.config.fusion.strategy
            req = to_orchestrate(body, self.team.config.expert_names, rid, priority, fusion)
            req = req.model_copy(update={"correlation_id": request.state.correlation_id})
            # Tool calls are read from the whole answer: nothing to stream before it ends.
            first, events = await self._start(
                call, req, live=body.stream and not req.sampling.calls_tools)
        shape, route = Shape(body.model, rid, kind), route_of(request)
        headers = {ID_HEADER: rid, **call.ratelimit}
        if body.stream:
            synthesizing = fusion == "synthesize" and bool(first.plan.experts)
            chunks = openai_stream(self._timed(call, first, events, route), shape, fusion,
                                   synthesizing, body.include_usage)
            return EventStream(chunks, media_type="text/event-stream",
                               headers={**SSE_HEADERS, **headers})
        final = [event async for event in self._timed(call, first, events, route)][-1]
        if final.type == "error":
            return JSONResponse(error_body(final.status, final.code, final.message, final.param),
                                status_code=final.status, headers=headers)
        return JSONResponse(shape.completion(final, fusion), headers=headers)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        created = int(time.time())
        names = [TEAM_MODEL, *self.team.config.expert_names]
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "chorus"} for n in names]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str, request: Request) -> dict[str, Any]:
        """One model (OpenAI's `models.retrieve`): the team or one of its experts."""
        self._authorize(request)
        check_model(model, self.team.config.expert_names)
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "chorus"}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: this process answers. (Whether requests can be served: /readyz.)"""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: a default request could be served right now; 503 names what is not
        (a team being stopped says `draining` here before its port closes)."""
        ready, body = await self.team.readiness()
        return JSONResponse(body, status_code=200 if ready else 503,
                            headers={} if ready else {"Retry-After": "5"})

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """The team's figures, counted once whatever the number of ingress replicas."""
        self._admit(request)
        body = await self.team.stats()
        body["ingress"] = {"node_id": _node_id(), "pid": os.getpid(),
                           "replicas": body.pop("ingresses", [])}
        return body

    @api.get("/v1/options")
    async def options(self) -> dict[str, Any]:
        """The team and the request options, for the playground's form."""
        return page_options(self.team.config, auth=self.keys.required)

    # ------------------------------------------------------------------ Python handle API

    async def stream_events(self, data: dict[str, Any],
                            live: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Same events as the SSE route, as dicts, for `Client.connect` (a handle call)."""
        if self.team.draining:
            raise ShuttingDownError("this Chorus server is shutting down; retry shortly")
        call = Call(None)
        req = OrchestrateRequest.parse({**data, "id": new_id("req")})
        first, events = await self._start(call, req, live=live)
        async for event in self._timed(call, first, events, "handle"):
            yield event.model_dump(mode="json")

    async def team_stats(self) -> dict[str, Any]:
        return await self.team.stats()

    # ------------------------------------------------------------------ streaming

    async def _timed(self, call: Call, first: Any, events: AsyncIterator[Any],
                     route: str) -> AsyncIterator[Any]:
        """Relay events, closing the team stream (cancelling its tasks) if we stop early;
        the request's outcome and TTFT are its `Call`'s, counted once at the end."""
        try:
            yield first
            async for event in events:
                if event.type == "error":  # Serve's access log has every request; this, why
                    logger.info("request %s (%s) ended: %s", first.request_id,
                                first.plan.primary.request_id, call.final_outcome())
                yield event
        finally:
            await events.aclose()  # caller gone: Team.stream cancels every task
            ended = call.final_outcome()
            metrics().requests.inc(tags={"route": route, "outcome": ended})
            metrics().latency.observe(call.elapsed_s(), tags={"route": route})
            if call.ttft_s is not None:
                metrics().ttft.observe(call.ttft_s, tags={"route": route})
            self.team.ended(call, ended)

    async def _relay(self, call: Call, first: Any, events: AsyncIterator[Any],
                     route: str) -> AsyncIterator[str]:
        async for event in self._timed(call, first, events, route):
            yield _sse(event.type, event.model_dump(mode="json"))


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
    stopping.built(config)
    if stopping.in_serve_run():
        stopping.drain_on_signals()
    return ChorusIngress.options(
        ray_actor_options=config.server.resources.ray_options(),
        # A stopping replica (scale-down, redeploy) serves its streams to the end first.
        graceful_shutdown_timeout_s=config.server.drain_s,
        **config.server.ingress.serve_options(),
    ).bind(path, time.time())


app = build_app({})
