"""The browser pages: a playground at `/` and an operations view at `/ops`.

Plain HTML, CSS and JavaScript shipped in this package (`static/`), no build step and
nothing fetched from elsewhere. The pages call the same HTTP API as any client. Under a
Serve route prefix the pages get a `<base href>` with the prefix, so every relative URL
they use (`static/…`, `v1/…`) stays inside the application. `serve_app.py` includes
the `pages` router.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

from orchestration.config import ChorusConfig
from orchestration.models import (
    ExecutionStrategy,
    InferenceOptions,
    OrchestrateRequest,
    RequestPriority,
)

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".js": "text/javascript", ".css": "text/css"}
pages = APIRouter()


@cache
def _template(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _page(request: Request, name: str) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    body = _template(name).replace("{{base}}", html.escape(f"{root}/", quote=True))
    return HTMLResponse(body, headers={"Cache-Control": "no-cache"})


@pages.get("/", include_in_schema=False)
async def playground(request: Request) -> HTMLResponse:
    return _page(request, "playground.html")


@pages.get("/ops", include_in_schema=False)
async def operations(request: Request) -> HTMLResponse:
    return _page(request, "ops.html")


@pages.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    # Only files that sit directly in static/ with a known type: no paths, no listing.
    # A 404 here gets the documented error shape from the app's HTTPException handler.
    path = STATIC / name
    if path.parent != STATIC or path.suffix not in _TYPES or not path.is_file():
        raise HTTPException(404)
    return FileResponse(path, media_type=_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache"})


def page_options(config: ChorusConfig, auth: bool) -> dict[str, Any]:
    """What the playground offers: the team, the request options and their bounds."""
    defaults = InferenceOptions()
    return {
        "experts": [
            {"name": e.name, "description": e.description, "keywords": list(e.keywords),
             "importance": e.importance}
            for e in config.experts
        ],
        "primary": config.router.primary,
        "max_parallel_experts": config.router.max_parallel_experts,
        "strategies": [s.value for s in ExecutionStrategy],
        "default_strategy": config.router.default_strategy.value,
        "priorities": [p.value for p in RequestPriority],
        "max_tokens": {"default": defaults.max_tokens,
                       "limit": config.server.max_tokens_limit},
        "temperature": {"default": defaults.temperature, "min": 0.0, "max": 2.0},
        "task_timeout_s": config.executor.task_timeout_s,
        "fusion": config.fusion.strategy,
        "auth": auth,
        # Optional request fields this server accepts (the page hides what it does not).
        "stream_experts": "stream_experts" in OrchestrateRequest.model_fields,
    }

