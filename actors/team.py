"""Team: a client of one running team, as the ingress (or a driver) holds it.

Its jobs:

1. attach: find (or create) the team's controller and apply this process's config;
2. follow the team's view (executor, router, replicas), long-polled from the controller,
   attaching again if the controller is gone;
3. run requests on the team (`stream`), through this process's `Caller`;
4. report this process's request telemetry, and detach from or remove the team.

The team's actors belong to its controller (`actors/controller.py`), never to this
process: an ingress replica that crashes, restarts or is replaced restarts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.actor import ActorHandle
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from actors.boundary import translate
from actors.caller import Caller, settled_plan
from actors.controller import TeamController, TeamView
from actors.gate import app_deleted
from orchestration.budget import planned, request_budget
from orchestration.call import PENDING, STREAMING, Call
from orchestration.config import ChorusConfig
from orchestration.errors import ChorusError
from orchestration.models import ErrorEvent, ExecutionPlan, ExecutorLoad, ExpertTask, PlanEvent
from orchestration.pipeline import finish_stream
from orchestration.routing import plan_request, plannable_by_caller

log = logging.getLogger("ray.serve")
REPORT_S = 0.5  # how often this process reports its ended requests to the controller


def controller_name(name: str) -> str:
    return f"{name}.controller"


class Team:
    """Handles to one running team, kept current, and the request path onto it."""

    def __init__(self, local: ChorusConfig, name: str, controller: ActorHandle,
                 view: TeamView, app: str | None, deployed_at: float) -> None:
        self.local = local  # this process's config: guard, fusion, stream, server
        self.name = name
        self.app = app
        self.deployed_at = deployed_at
        self.controller = controller
        self.view = view
        self.caller = Caller(f"{name}/{uuid.uuid4().hex[:8]}", local.stream, self._resolve)
        self.load_seen: tuple[ExecutorLoad, float] | None = None  # at the latest admission
        self.in_flight = 0  # this process's requests not answered to the end (the ingress)
        self._ended: list[tuple[float, float, float | None, str]] = []
        self._loops = [asyncio.ensure_future(self._follow()),
                       asyncio.ensure_future(self._report_every())]

    @classmethod
    async def start(cls, config: ChorusConfig, name: str = "chorus", *, app: str | None = None,
                    deployed_at: float = 0.0) -> Team:
        """Attach to the team (creating its controller and actors if none runs) and make
        it run `config`. A Serve app's team (`app`) is detached: it lives until the app
        is deleted. Raises what keeps the team from starting (PlacementError, ...)."""
        controller, view = await _attach(config, name, app, deployed_at)
        return cls(config, name, controller, view, app, deployed_at)

    # ------------------------------------------------------------------ the view

    @property
    def config(self) -> ChorusConfig:
        """The config the team runs (experts, router, executor): the newest deploy's."""
        return self.view.config

    @property
    def executor(self) -> ActorHandle:
        return self.view.executor

    @property
    def router(self) -> ActorHandle:
        return self.view.router

    @property
    def replicas(self) -> dict[str, dict[str, ActorHandle]]:
        return self.view.replicas

    @property
    def experts(self) -> dict[str, ActorHandle]:
        """The first replica of each expert (for drills and tests)."""
        return {name: next(iter(group.values())) for name, group in self.replicas.items()}

    @property
    def draining(self) -> bool:
        return self.view.draining

    def _resolve(self, name: str) -> ActorHandle | None:
        return self.view.handles.get(name)

    def _set_view(self, view: TeamView) -> None:
        self.view = view
        self.caller.keep_replicas(set(view.handles))

    async def _follow(self) -> None:
        """Keep the view current; if the controller is gone, attach to the next one."""
        while True:
            try:
                view = await self.controller.watch.remote(self.view.version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the controller died or was removed
                if self.app is not None and await app_deleted(self.app):
                    return  # removed with its app: nothing to attach to
                log.warning("team %s: its controller is gone (%s); attaching again",
                            self.name, translate(exc, actor="controller").message)
                try:
                    self.controller, view = await _attach(self.local, self.name, self.app,
                                                          self.deployed_at)
                except Exception as again:  # noqa: BLE001 - next round tries again
                    log.error("team %s: attaching failed: %s", self.name, again)
                    await asyncio.sleep(1.0)
                    continue
            self._set_view(view)

    async def refresh(self) -> None:
        """The newest view now (after a change this process asked for)."""
        self._set_view(await self.controller.watch.remote(-1, 0))

    # ------------------------------------------------------------------ requests

    async def stream(self, request: Any, live: bool = True,
                     call: Call | None = None) -> AsyncIterator[Any]:
        """One request end to end: plan, dispatch, guard, fusion; ends in done or error.

        Errors before the plan is admitted (bad input, full queue, actors down) are
        raised, so a server can still answer 4xx/429/503; after it, they become the
        terminal `error` event. `live=False` returns no text before the end (cheaper).
        """
        call = call or Call(request)
        view = self.view
        seen = self.load_seen
        age = time.monotonic() - seen[1] if seen is not None else None
        try:
            if plannable_by_caller(request, view.config, age):
                call.plan = plan_request(request, view.config, seen[0] if seen else None)
            else:
                call.plan = await view.router.plan.remote(request)
        except Exception as exc:  # bad input (UnknownExpertError), or the router down
            raise translate(exc, actor="router") from None
        call.budget_s = request_budget(request, self.local)
        call.plan = planned(call.plan.model_copy(update={"tenant": call.tenant}), request,
                            self.local, call.elapsed_s())
        if live:
            self.load_seen = (await self.caller.submit(call, view.executor), time.monotonic())
            events: AsyncIterator[Any] = self.caller.events(call)
        else:
            admitted, settled = await settled_plan(call.plan, view.executor)
            call.ratelimit = admitted.ratelimit
            load = ExecutorLoad(active=admitted.active, queued=admitted.queued)
            self.load_seen = (load, time.monotonic())
            events = _replay(settled)
        first = PlanEvent(request_id=call.plan.request_id, plan=call.plan)
        def synthesize(task: ExpertTask) -> AsyncIterator[Any]:  # part of this request
            plan = _one_task_plan(task, call.plan.tenant)
            return self._synthesize(plan) if live else self._synthesize_settled(plan)

        try:
            async for event in finish_stream(call, first, events, self.local, synthesize):
                if event.type in ("done", "error"):
                    call.ended(event)
                yield event
        except ChorusError as exc:  # the executor or a replica failed mid-request
            if call.outcome in (PENDING, STREAMING):  # no terminal event left yet
                error = ErrorEvent(request_id=call.request_id, code=exc.code,
                                   message=exc.message, status=exc.status)
                call.ended(error)
                yield error
        finally:
            await events.aclose()
            if live:
                self.caller.close(call)  # the caller went away: every task is cancelled

    async def _synthesize(self, plan: ExecutionPlan) -> AsyncIterator[Any]:
        call = Call(None, plan=plan, tenant=plan.tenant)
        await self.caller.submit(call, self.view.executor)
        events = self.caller.events(call)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
            self.caller.close(call)

    async def _synthesize_settled(self, plan: ExecutionPlan) -> AsyncIterator[Any]:
        _, events = await settled_plan(plan, self.view.executor)
        for event in events:
            yield event

    # ------------------------------------------------------------------ answers

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Can a default request be served right now? (`/readyz`)"""
        return await self.controller.readiness.remote()

    async def stats(self) -> dict[str, Any]:
        """The team's figures, counted once (this process's telemetry reported first)."""
        await self._report()
        return await self.controller.stats.remote()

    def ended(self, call: Call, outcome: str) -> None:
        """A request of this process ended: counted at the controller (`/v1/stats`)."""
        self._ended.append((time.time(), call.elapsed_s(), call.ttft_s, outcome))

    async def _report(self) -> None:
        ended, self._ended = self._ended, []
        where = {"caller": self.caller.id, "pid": os.getpid(), "in_flight": self.in_flight,
                 "node_id": ray.get_runtime_context().get_node_id()}
        try:
            await self.controller.report.remote(self.caller.id, ended, where)
        except Exception:  # noqa: BLE001 - the controller is being replaced: keep them
            self._ended = ended + self._ended

    async def _report_every(self) -> None:
        """Also a heartbeat: the controller lists the ingress replicas that report."""
        while True:
            await asyncio.sleep(REPORT_S)
            await self._report()

    # ------------------------------------------------------------------ the end

    async def drain(self) -> None:
        """Every client of the team refuses new work; their streams finish."""
        await self.controller.drain.remote()

    def detach(self) -> None:
        """This process stops using the team (an ingress replica going away)."""
        for loop in self._loops:
            loop.cancel()
        self.caller.shutdown()

    async def remove(self) -> None:
        """Remove the whole team: every actor, then its controller."""
        self.detach()
        with contextlib.suppress(Exception):
            await self.controller.shutdown.remote()
        ray.kill(self.controller, no_restart=True)

    def shutdown(self) -> None:
        """`remove` without waiting: killing the controller takes its actors with it."""
        self.detach()
        ray.kill(self.controller, no_restart=True)


async def _attach(config: ChorusConfig, name: str, app: str | None,
                  deployed_at: float) -> tuple[ActorHandle, TeamView]:
    """The team's controller (found, or created) once it runs `config`. A controller
    that is going away (its app was just deleted) is waited out and replaced."""
    options: dict[str, Any] = {
        "name": controller_name(name), "namespace": config.server.namespace,
        "get_if_exists": True, "max_restarts": 0, "max_concurrency": 1000,
        **config.executor.resources.ray_options(),
    }
    if app is not None:
        options["lifetime"] = "detached"
    retrying = AsyncRetrying(retry=retry_if_exception_type(ray.exceptions.RayActorError),
                             wait=wait_exponential(multiplier=0.2, max=2),
                             stop=stop_after_delay(30), reraise=True)
    async for attempt in retrying:
        with attempt:
            controller = TeamController.options(**options).remote(name, app)
            try:
                view = await controller.apply.remote(config, deployed_at)
            except ray.exceptions.RayTaskError as exc:
                error = translate(exc, actor="controller")
                with contextlib.suppress(Exception):
                    if not (await controller.ping.remote())["running"]:
                        ray.kill(controller, no_restart=True)  # no team: nothing kept
                raise error from None
    return controller, view


def _one_task_plan(task: ExpertTask, tenant: str) -> ExecutionPlan:
    """A synthesis: a follow-up of its request, for the same tenant (not counted again)."""
    return ExecutionPlan(request_id=f"{task.request_id or task.id}.{task.role}",
                         strategy="SERIAL", primary=task.model_copy(update={"stream": True}),
                         tenant=tenant, follow_up=True)


async def _replay(events: list[Any]) -> AsyncIterator[Any]:
    for event in events:
        yield event
