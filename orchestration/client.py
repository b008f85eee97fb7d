"""Python entry point: run or stream a prompt through a Chorus team.

`Client.local(config)` starts a team's actors in the current Ray instance (and removes
them on exit); `Client.connect(app_name)` talks to a running Serve application through
its deployment handle. Both offer the same `run` / `stream` API.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import TypeAdapter

from orchestration.config import ChorusConfig, load_config
from orchestration.errors import ChorusError
from orchestration.models import (
    DoneEvent,
    ErrorEvent,
    OrchestrateRequest,
    OrchestrationResult,
    PlanEvent,
    StreamEvent,
)

_EVENT = TypeAdapter(StreamEvent)


class OrchestrationError(ChorusError):
    """A request ended with an `error` event; `code` and `status` come from it."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "error",
                 status: int = 500) -> None:
        super().__init__(message, field=field)
        self.code = code
        self.status = status


class _Backend(Protocol):
    def stream(self, request: OrchestrateRequest, live: bool = True) -> AsyncIterator[Any]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


class _LocalBackend:
    """Owns a team started in this Ray instance."""

    def __init__(self, config: ChorusConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.team: Any = None

    async def open(self) -> None:
        import ray

        from actors.team import Team

        if not ray.is_initialized():
            ray.init(namespace=self.config.server.namespace, include_dashboard=False)
        self.team = await Team.start(self.config, self.name)

    def stream(self, request: OrchestrateRequest, live: bool = True) -> AsyncIterator[Any]:
        return self.team.stream(request, live=live)

    async def stats(self) -> dict[str, Any]:
        return await self.team.stats()

    async def close(self) -> None:
        if self.team is not None:
            await self.team.remove()
            self.team = None


class _ServeBackend:
    """Talks to a running Serve application through its deployment handle."""

    def __init__(self, app_name: str | None, address: str) -> None:
        self.app_name = app_name
        self.address = address
        self.handle: Any = None

    async def open(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False)
        if self.app_name is None:  # the only app running, else the conventional name
            apps = list(serve.status().applications)
            self.app_name = apps[0] if len(apps) == 1 else "chorus"
        self.handle = serve.get_app_handle(self.app_name)

    async def stream(self, request: OrchestrateRequest, live: bool = True) -> AsyncIterator[Any]:
        from actors.boundary import translate

        response = self.handle.options(stream=True).stream_events.remote(
            request.model_dump(mode="json", exclude={"id"}), live)
        try:
            async for data in response:
                yield _EVENT.validate_python(data)
        except Exception as exc:  # Ray's error for what the replica raised: ours instead
            raise translate(exc, actor="ingress") from None
        finally:
            response.cancel()  # no-op once finished; otherwise the replica stops the request

    async def stats(self) -> dict[str, Any]:
        return await self.handle.team_stats.remote()

    async def close(self) -> None:
        self.handle = None


class Client:
    """Run prompts through a team: `run` for the result, `stream` for the events."""

    def __init__(self, backend: _Backend, opener: Any = None) -> None:
        self._backend = backend
        self._opener = opener

    @classmethod
    def local(cls, config: str | Path | ChorusConfig | None = None, *, name: str | None = None) -> Client:
        """A client that starts its own team of actors in the current Ray instance."""
        cfg = config if isinstance(config, ChorusConfig) else load_config(config)
        backend = _LocalBackend(cfg, name or f"chorus-{uuid.uuid4().hex[:8]}")
        return cls(backend, opener=backend.open)

    @classmethod
    def connect(cls, app_name: str | None = None, *, address: str = "auto") -> Client:
        """A client of a running Serve application (`serve run serve_app:app`)."""
        backend = _ServeBackend(app_name, address)
        return cls(backend, opener=backend.open)

    @property
    def team(self) -> Any:
        """The underlying `actors.team.Team` of a local client (for stats and drills)."""
        return getattr(self._backend, "team", None)

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._opener is not None:
            opener, self._opener = self._opener, None
            await opener()

    async def close(self) -> None:
        await self._backend.close()

    async def stream(self, prompt: str, **options: Any) -> AsyncIterator[Any]:
        """Events: plan, primary deltas, expert results, fusion, then done or error."""
        async for event in self._events(prompt, True, options):
            yield event

    async def _events(self, prompt: str, live: bool, options: dict[str, Any]) -> AsyncIterator[Any]:
        await self.open()
        request = OrchestrateRequest.parse({"prompt": prompt, **options})
        async for event in self._backend.stream(request, live):
            yield event

    async def run(self, prompt: str, **options: Any) -> OrchestrationResult:
        """The whole answer; raises `OrchestrationError` if the request ended in error."""
        plan = None
        # No live text: the answer comes whole, so the stack skips the streaming path.
        async for event in self._events(prompt, False, options):
            if isinstance(event, PlanEvent):
                plan = event.plan
            elif isinstance(event, ErrorEvent):
                raise OrchestrationError(event.message, code=event.code, status=event.status)
            elif isinstance(event, DoneEvent):
                assert plan is not None and event.primary is not None
                return OrchestrationResult(
                    id=event.request_id, plan=plan, content=event.content or "",
                    primary=event.primary, experts=event.experts, timings=event.timings,
                )
        raise OrchestrationError("stream ended without a terminal event", code="lost")

    async def stats(self) -> dict[str, Any]:
        await self.open()
        return await self._backend.stats()

    # -------------------------------------------------------------- synchronous helpers

    def run_sync(self, prompt: str, **options: Any) -> OrchestrationResult:
        """`run` for code without an event loop."""
        return asyncio.run(self.run(prompt, **options))

    def stream_sync(self, prompt: str, **options: Any) -> list[Any]:
        """All events of `stream`, for code without an event loop."""

        async def collect() -> list[Any]:
            return [event async for event in self.stream(prompt, **options)]

        return asyncio.run(collect())

    def stats_sync(self) -> dict[str, Any]:
        return asyncio.run(self.stats())
