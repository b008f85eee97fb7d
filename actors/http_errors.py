"""Every error of the HTTP edge in one table: Chorus's errors, Starlette's 404/405, hang-ups
and bugs all answer in the documented shape (`{"error": {message, type, param, code}}`),
with the headers their status calls for: `Retry-After` on 429 and 503 (a tenant over its
limit also gets its `x-ratelimit-*`), `WWW-Authenticate` on 401.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import exceptions as rex
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from actors.boundary import translate
from actors.hangups import hung_up, route_of
from actors.metrics import metrics
from orchestration.errors import (
    ChorusError,
    MethodNotAllowedError,
    NotFoundError,
    RateLimitedError,
    TaskCancelledError,
)
from orchestration.openai_compat import error_from

logger = logging.getLogger("ray.serve")


def _error_response(request: Request, exc: ChorusError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimitedError):  # the tenant's window: when to come back
        headers = {**exc.headers, "Retry-After": str(exc.retry_after_s)}
    elif exc.status == 429:
        headers["Retry-After"] = str(getattr(request.state, "retry_after", 1))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc.status == 503:
        headers["Retry-After"] = str(getattr(request.state, "retry_after", 5))
    metrics().requests.inc(tags={"route": route_of(request), "outcome": exc.code})
    return JSONResponse(error_from(exc), status_code=exc.status, headers=headers)


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    # Starlette raises it only on `http.disconnect`: the socket closed while the body
    # was being read. The client's doing, not a server error.
    return hung_up(request, exc)


async def _ray_cancelled(request: Request, exc: rex.TaskCancelledError) -> Response:
    # Ray raises it raw at the edge only for calls made for this request that it cancelled
    # because Serve cancelled the request (the client went away): the body channel's
    # `receive_asgi_messages`, mostly. Our own cancellations (deadlines, a task no longer
    # wanted) are translated in actors/boundary.py and never arrive here raw. Registered
    # by class, not under `Exception`, so Starlette does not re-raise it into Serve's
    # "Request failed." traceback. (`RayTaskError(TaskCancelledError)` is one too.)
    return hung_up(request, exc)


async def _chorus_error(request: Request, exc: ChorusError) -> Response:
    if isinstance(exc, TaskCancelledError):
        # The same cancellation, translated at the boundary (e.g. the router's plan call
        # cancelled with the request): a hang-up, not an error outcome.
        return hung_up(request, exc)
    return _error_response(request, exc)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Starlette's own 404 (no such route) and 405 (wrong method), in our shape.
    if exc.status_code == 405:
        error: ChorusError = MethodNotAllowedError(
            f"{request.method} is not allowed on {request.url.path}", field="<method>")
    elif exc.status_code == 404:
        error = NotFoundError(f"no route {request.url.path}", field="<path>")
    else:
        error = ChorusError(str(exc.detail))
        error.status = exc.status_code
    return _error_response(request, error)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # A bug, or a Ray error that escaped the boundary: still the documented shape.
    # (Hang-ups, ClientDisconnect and Ray's TaskCancelledError, have their own handlers
    # above and never come here.)
    error = translate(exc, actor="ingress")
    logger.exception("unexpected error on %s", request.url.path)
    return _error_response(request, error)


def install_error_handlers(api: FastAPI) -> None:
    """Register the handlers on `api` (before `@serve.ingress` freezes a copy of it)."""
    api.add_exception_handler(ClientDisconnect, _client_disconnect)
    api.add_exception_handler(rex.TaskCancelledError, _ray_cancelled)
    api.add_exception_handler(ChorusError, _chorus_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
