"""Callers who leave: one meaning, counted once, never logged as a server error.

A client may close its connection at any moment: while its body is read, while the
plan is made, or while the answer streams. Serve then cancels the handler, and what
reaches the edge is one of `asyncio.CancelledError` (the handler itself), Starlette's
`ClientDisconnect` (the body's read), Ray's `TaskCancelledError` (a call Serve cancelled
with the request, e.g. the body channel's `receive_asgi_messages`) or Chorus's own
`TaskCancelledError` (the same, translated by actors/boundary.py). Each is the outcome
`disconnected` (metric and telemetry), logged at INFO without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from ray import exceptions as rex

from actors.metrics import metrics

logger = logging.getLogger("ray.serve")  # into the replica's log, with Serve's own lines


def route_of(request: Request) -> str:
    # The matched route's template, never the raw URL: a stranger's URLs must not
    # become metric tags (one series per URL would grow without bound).
    route = request.scope.get("route")
    return getattr(route, "path", None) or "<unmatched>"


def hung_up(request: Request, why: BaseException) -> Response:
    """The caller went away before its response started: counted `disconnected` (as a
    hang-up after the first token is, in `_timed`), logged without a traceback."""
    if not getattr(request.state, "counted", False):  # once per request, whatever saw it
        request.state.counted = True
        metrics().requests.inc(tags={"route": route_of(request), "outcome": "disconnected"})
        call, team = getattr(request.state, "call", None), getattr(request.state, "team", None)
        if call is not None and team is not None:
            team.ended(call, "disconnected")
        logger.info("request %s on %s: the caller went away (%s)",
                    getattr(request.state, "request_id", "-"), request.url.path,
                    type(why).__name__)
    # Nobody reads it; 499 is what Serve's proxy logs for a client that closed.
    return Response(status_code=499)


@contextlib.contextmanager
def until_answered(request: Request) -> Iterator[None]:
    """Around a route's work before its response exists (body, plan); `_timed` counts
    from there on."""
    try:
        yield
        request.state.counted = True  # answered: from here on `_timed` counts it
    except asyncio.CancelledError:
        # Serve cancels the handler when the client disconnects. No exception handler
        # ever sees a CancelledError, so the hang-up is counted here; it goes on up so
        # that the work is cancelled as before.
        hung_up(request, asyncio.CancelledError())
        raise


class EventStream(StreamingResponse):
    """SSE to a caller who may leave while it streams."""

    async def listen_for_disconnect(self, receive: Any) -> None:
        # Serve's receive raises Ray's TaskCancelledError, not `http.disconnect`, when it
        # cancelled the request's body channel because the client went away. Returning is
        # that disconnect: the stream stops and `_timed` counts it, no ERROR.
        with contextlib.suppress(rex.TaskCancelledError):
            await super().listen_for_disconnect(receive)
