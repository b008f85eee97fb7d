"""The ingress replica's door: requests in flight, refusals while draining, app deletion.

`DrainGate` is pure ASGI middleware around the FastAPI app. It counts this replica's
requests in flight (a drain waits for them to end) and, once the team drains, answers
every new request except the probes with 503 + Retry-After in the documented error
shape, so a stopping server never answers Serve's plain-text 404. It lives in an
importable module because Serve ships a frozen copy of the app to each replica: this
module's `current` is the one state the gate and the replica's ingress share.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse

from actors.metrics import metrics
from orchestration.errors import ShuttingDownError
from orchestration.openai_compat import error_from

# Routes a draining replica still answers: probes, so load balancers see it go.
PROBES = ("/healthz", "/readyz")
current: dict[str, Any] = {}  # "team": this replica's Team, "retry_after": seconds


def serving(team: Any, retry_after_s: int) -> None:
    """This process's ingress replica is up, on `team`."""
    current.update(team=team, retry_after=retry_after_s)


class DrainGate:
    """Counts requests in flight (probes aside); refuses new ones (503) while draining."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        team = current.get("team")
        if scope["type"] != "http" or team is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"][len(scope.get("root_path", "")):] or "/"
        if team.draining and path not in PROBES:
            error = ShuttingDownError(
                "this Chorus server is shutting down; retry on another one shortly")
            metrics().requests.inc(tags={"route": "<draining>", "outcome": "draining"})
            await JSONResponse(error_from(error), status_code=503,
                               headers={"Retry-After": str(current["retry_after"])}
                               )(scope, receive, send)
            return
        if path in PROBES:  # not work a drain waits for
            await self.app(scope, receive, send)
            return
        team.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            team.in_flight -= 1


async def app_deleted(app: str) -> bool:
    """Is Serve deleting this app (or has it, or Serve itself)? Else a replica just
    stops: a scale-down, or a redeploy replacing it."""
    from ray import serve

    try:
        status = await asyncio.to_thread(serve.status)
    except Exception:  # noqa: BLE001 - no Serve instance left to ask: it is gone
        return True
    entry = status.applications.get(app)
    return entry is None or entry.status.value == "DELETING"
