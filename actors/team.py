"""Team: starts, attaches to and removes one Chorus team's actors, and runs requests on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from actors.executor import ExecutorActor
from actors.expert import ExpertActor
from actors.router import RouterActor
from orchestration.config import ChorusConfig, ExpertConfig
from orchestration.errors import (
    ChorusError,
    NoHealthyExpertError,
    PlacementError,
    RouterModelError,
)
from orchestration.models import ErrorEvent, ExpertTask, OrchestrateRequest
from orchestration.pipeline import finish_stream


def unwrap(exc: BaseException) -> BaseException:
    """The ChorusError a Ray task raised, rather than Ray's wrapper around it."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, ChorusError):
        return exc.cause
    return exc


def _after_acceptance(request_id: str, error: BaseException) -> ErrorEvent:
    """The terminal event for a failure after the request was accepted."""
    if isinstance(error, ChorusError):
        return ErrorEvent(request_id=request_id, code=error.code, message=error.message,
                          status=error.status)
    if isinstance(error, RayActorError):  # it restarts (max_restarts): the caller may retry
        return ErrorEvent(request_id=request_id, code="unavailable", status=503,
                          message="the Chorus executor died mid-request and is restarting; "
                                  "retry shortly")
    return ErrorEvent(request_id=request_id, code="internal_error", status=500,
                      message=f"{type(error).__name__}: {error}")


def _expert_options(expert: ExpertConfig, name: str, namespace: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        # Ray restarts a crashed expert; our executor retries its tasks (so no Ray retries).
        "max_restarts": expert.max_restarts,
        "max_task_retries": 0,
        # Room above the engine's own bound for stats()/ready() calls.
        "max_concurrency": expert.max_concurrency + 8,
        **expert.actor_options(),
    }
    if expert.env:
        options["runtime_env"] = {"env_vars": dict(expert.env)}
    return options


def _missing_resources(expert: ExpertConfig) -> str:
    """Say which resource the cluster lacks for this expert, node by node."""
    options = expert.actor_options()
    wanted = {"GPU": options.get("num_gpus", 0), "CPU": options.get("num_cpus", 0),
              **expert.resources.resources}
    if expert.resources.accelerator_type:
        wanted[f"accelerator_type:{expert.resources.accelerator_type}"] = 0.001
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()
    parts = []
    for key, need in wanted.items():
        largest = max((node.get(key, 0) for node in nodes), default=0)
        if need and (need > largest or need > free.get(key, 0)):
            parts.append(f"{key}={need:g} (largest node has {largest:g}; cluster total "
                         f"{total.get(key, 0):g}, free {free.get(key, 0):g})")
    return ", ".join(parts) or "resources that stayed busy (see `ray status`)"


class Team:
    """Handles to one running team: experts, executor and router, named in a namespace."""

    def __init__(self, config: ChorusConfig, name: str = "chorus") -> None:
        self.config = config
        self.name = name
        self.namespace = config.server.namespace
        self.experts: dict[str, ActorHandle] = {}
        self.executor: ActorHandle | None = None
        self.router: ActorHandle | None = None

    def actor_name(self, role: str) -> str:
        return f"{self.name}.{role}"

    @classmethod
    async def start(cls, config: ChorusConfig, name: str = "chorus") -> Team:
        """Create (or attach to) the team's actors and wait until every expert is ready."""
        team = cls(config, name)
        for expert in config.experts:
            options = _expert_options(expert, team.actor_name(f"expert.{expert.name}"), team.namespace)
            team.experts[expert.name] = ExpertActor.options(**options).remote(expert)
        # A crashed control actor comes back for the next requests (its in-flight streams
        # end with an `error` event); its state is per-request, so nothing else is lost.
        common = {"namespace": team.namespace, "get_if_exists": True, "max_restarts": 3}
        team.executor = ExecutorActor.options(
            name=team.actor_name("executor"),
            max_concurrency=config.executor.max_concurrent_plans,
            **config.executor.resources.ray_options(),
            **common,
        ).remote(config, team.experts)
        team.router = RouterActor.options(
            name=team.actor_name("router"),
            max_concurrency=config.executor.max_concurrent_plans,
            **config.router.resources.ray_options(),
            **common,
        ).remote(config, team.executor)
        try:
            await team.wait_ready(config.server.startup_timeout_s)
        except BaseException:
            team.shutdown()
            raise
        return team

    async def wait_ready(self, timeout_s: float) -> None:
        """Fail fast, naming the expert and the resource, when an actor cannot be placed."""
        assert self.executor is not None and self.router is not None
        pending = {name: h.ready.remote() for name, h in self.experts.items()}
        pending["executor"] = self.executor.load.remote()
        pending["router"] = self.router.ready.remote()
        refs = list(pending.values())
        ready, _ = await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=timeout_s)
        late = [name for name, ref in pending.items() if ref not in ready]
        if late:
            details = [
                f"expert {name!r} needs {_missing_resources(self.config.expert(name))}"
                if name in self.experts
                else f"{name} actor did not start"
                for name in late
            ]
            raise PlacementError(
                f"cannot place the team within {timeout_s:g}s: " + "; ".join(details),
                field=f"experts.{late[0]}" if late[0] in self.experts else None,
            )
        for name, ref in pending.items():  # placed, but did its engine start?
            try:
                await ref
            except Exception as exc:
                if isinstance(unwrap(exc), RouterModelError):  # names the router's model
                    raise unwrap(exc) from None
                raise NoHealthyExpertError(
                    f"{name} failed to start: {unwrap(exc)}", field=f"experts.{name}"
                ) from None

    async def stream(self, request: OrchestrateRequest) -> AsyncIterator[Any]:
        """One request end to end: plan, dispatch, guard, fusion; ends in done or error.

        Errors before the plan is accepted (bad input, full queue) are raised, so a
        server can still answer 4xx/429; after it, they become the terminal `error` event.
        """
        assert self.router is not None and self.executor is not None
        try:
            plan = await self.router.plan.remote(request)
            gen = self.executor.stream.options(num_returns="streaming").remote(plan)
            first = await (await gen.__anext__())
        except Exception as exc:
            raise unwrap(exc) from None
        finished = False
        try:
            async for event in finish_stream(first, self._events(gen), self.config, self._synthesize):
                finished = event.type in ("done", "error")
                yield event
        except Exception as exc:
            if not finished:
                yield _after_acceptance(request.id, unwrap(exc))
        finally:
            if not finished:
                # The caller went away (or failed): nothing of this request may keep running.
                ray.cancel(gen)
                self.executor.cancel.remote(request.id)

    @staticmethod
    async def _events(gen: Any) -> AsyncIterator[Any]:
        async for ref in gen:
            yield await ref

    async def _synthesize(self, task: ExpertTask) -> AsyncIterator[Any]:
        assert self.executor is not None
        gen = self.executor.run_task.options(num_returns="streaming").remote(task)
        try:
            async for event in self._events(gen):
                yield event
        finally:
            ray.cancel(gen)

    async def stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Executor and per-expert stats; an expert that does not answer says why."""
        assert self.executor is not None
        names = list(self.experts)
        expert_stats = await asyncio.gather(
            *(asyncio.wait_for(self.experts[n].stats.remote(), timeout_s) for n in names),
            return_exceptions=True,
        )

        def describe(stat: Any) -> dict[str, Any]:
            if isinstance(stat, dict):
                return stat
            if isinstance(stat, TimeoutError):
                return {"error": f"no answer within {timeout_s:g}s (restarting or busy)"}
            return {"error": f"{type(unwrap(stat)).__name__}: {unwrap(stat)}"}

        assert self.router is not None
        return {
            "router": await self.router.stats.remote(),
            "executor": await self.executor.stats.remote(),
            "experts": {n: describe(s) for n, s in zip(names, expert_stats, strict=True)},
        }

    def shutdown(self) -> None:
        """Kill every actor of the team (no restarts)."""
        for handle in [self.router, self.executor, *self.experts.values()]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        self.experts.clear()
        self.executor = self.router = None
