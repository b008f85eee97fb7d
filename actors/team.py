"""Team: starts, attaches to, supervises and removes one Chorus team's actors.

It also runs requests on them (`stream`), from the caller's process: see
`actors/caller.py` for the path of one request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.boundary import cause_of, translate
from actors.caller import LivePlan, settled_plan
from actors.executor import ExecutorActor
from actors.expert import ExpertActor
from actors.placement import missing_resources
from actors.router import RouterActor
from actors.scaler import Scaler
from actors.supervisor import Supervisor, ray_state
from orchestration.config import ChorusConfig, ExpertConfig
from orchestration.errors import (
    ChorusError,
    NoHealthyExpertError,
    PlacementError,
    RouterModelError,
)
from orchestration.models import (
    ErrorEvent,
    ExecutorLoad,
    ExpertTask,
    OrchestrateRequest,
    PlanEvent,
)
from orchestration.pipeline import finish_stream
from orchestration.replicas import replica_label
from orchestration.routing import plan_request, plannable_by_caller


class Team:
    """Handles to one running team: expert replicas, executor and router, in a namespace."""

    def __init__(self, config: ChorusConfig, name: str = "chorus") -> None:
        self.config = config
        self.name = name
        self.namespace = config.server.namespace
        self.replicas: dict[str, dict[str, ActorHandle]] = {}  # expert -> label -> handle
        self.names: dict[str, str] = {}  # label ("general#0", "router") -> actor name
        self.draining: set[str] = set()  # replicas being scaled down
        self.pending: dict[str, float] = {}  # scale-ups not ready yet: label -> created at
        self.executor: ActorHandle | None = None
        self.router: ActorHandle | None = None
        self.supervisor: Supervisor | None = None
        self.scaler: Scaler | None = None
        # The executor's load as its latest admission reported it, and when (monotonic).
        self.load_seen: tuple[ExecutorLoad, float] | None = None

    @property
    def experts(self) -> dict[str, ActorHandle]:
        """The first replica of each expert (for drills and tests)."""
        return {name: next(iter(group.values())) for name, group in self.replicas.items()}

    def actor_name(self, role: str) -> str:
        return f"{self.name}.{role}"

    def replica(self, label: str) -> ActorHandle:
        expert = label.rsplit("#", 1)[0]
        return self.replicas[expert][label]

    # ------------------------------------------------------------------ actors

    def _common(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "get_if_exists": True}

    def create_replica(self, expert: ExpertConfig, label: str,
                       incarnation: str = "") -> ActorHandle:
        """One replica's actor; a re-created one gets a fresh name (`incarnation`)."""
        self.names[label] = self.actor_name(f"expert.{label}{incarnation}")
        options: dict[str, Any] = {
            "name": self.names[label],
            # Ray restarts a crashed expert; our executor retries its tasks (so no Ray retries).
            "max_restarts": expert.max_restarts,
            "max_task_retries": 0,
            # Room above the engine's bound for streamed reads and stats()/ready() calls.
            "max_concurrency": 2 * expert.max_concurrency + 8,
            **self._common(),
            **expert.actor_options(),
        }
        if expert.env:
            options["runtime_env"] = {"env_vars": dict(expert.env)}
        handle = ExpertActor.options(**options).remote(expert, label, self.config.stream)
        self.replicas.setdefault(expert.name, {})[label] = handle
        return handle

    def remove_replica(self, expert: str, label: str) -> None:
        """Kill a replica that drained or was given up, and forget it everywhere."""
        handle = self.replicas.get(expert, {}).pop(label, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)
        self.names.pop(label, None)
        self.draining.discard(label)
        self.pending.pop(label, None)
        if self.supervisor is not None:
            self.supervisor.forget(label)

    def members(self, expert: str) -> dict[str, tuple[ActorHandle, str]]:
        """The replicas the executor dispatches to, and their state: "ready", "down"
        (restarting or re-created, not answering yet) or "draining". A scale-up joins
        only once it answered `ready`."""
        lives = self.supervisor.lives if self.supervisor is not None else {}
        members = {}
        for label, handle in self.replicas.get(expert, {}).items():
            if label in self.pending:
                continue
            life = lives.get(label)
            state = ("draining" if label in self.draining else
                     "ready" if life is None or life.state.value == "ready" else "down")
            members[label] = (handle, state)
        return members

    def publish(self, expert: str) -> None:
        """Tell the executor the expert's current members."""
        if self.executor is not None:
            self.executor.set_replicas.remote(expert, self.members(expert))

    def create_router(self, incarnation: str = "") -> ActorHandle:
        self.names["router"] = self.actor_name(f"router{incarnation}")
        self.router = RouterActor.options(
            name=self.names["router"], max_restarts=3,
            max_concurrency=self.config.executor.max_concurrent_plans,
            **self.config.router.resources.ray_options(), **self._common(),
        ).remote(self.config)
        return self.router

    def create_executor(self, incarnation: str = "") -> ActorHandle:
        self.names["executor"] = self.actor_name(f"executor{incarnation}")
        replicas = {expert: {label: self.names[label] for label in group}
                    for expert, group in self.replicas.items()}
        self.executor = ExecutorActor.options(
            name=self.names["executor"], max_restarts=3,
            max_concurrency=self.config.executor.max_concurrent_plans,
            **self.config.executor.resources.ray_options(), **self._common(),
        ).remote(self.config, replicas, self.names.get("router"))
        return self.executor

    @classmethod
    async def start(cls, config: ChorusConfig, name: str = "chorus",
                    supervise: bool = True) -> Team:
        """Create (or attach to) the team's actors and wait until every one is ready."""
        team = cls(config, name)
        for expert in config.experts:
            for index in range(expert.replicas.initial):  # the validator sets it (default: min)
                team.create_replica(expert, replica_label(expert.name, index))
        # A crashed control actor comes back for the next requests (its in-flight streams
        # end with an `error` event); its state is per-request, so nothing else is lost.
        team.create_router()
        team.create_executor()
        try:
            await team.wait_ready(config.server.startup_timeout_s)
        except BaseException:
            team.shutdown()
            raise
        if supervise:
            team.supervisor = Supervisor(team)
            team.supervisor.start()
            if any(e.replicas.max > e.replicas.min for e in config.experts):
                team.scaler = Scaler(team)
                team.scaler.start()
        return team

    async def wait_ready(self, timeout_s: float) -> None:
        """Fail fast, naming each expert and the resource, when the team cannot be placed."""
        assert self.executor is not None and self.router is not None
        pending = {label: handle.ready.remote()
                   for group in self.replicas.values() for label, handle in group.items()}
        pending["executor"] = self.executor.probe.remote()
        pending["router"] = self.router.ready.remote()
        refs = list(pending.values())
        ready, _ = await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=timeout_s)
        late = [label for label, ref in pending.items() if ref not in ready]
        if late:
            experts = {label.rsplit("#", 1)[0] for label in late if "#" in label}
            details = [f"expert {name!r} needs {missing_resources(self.config.expert(name))}"
                       for name in sorted(experts)]
            details += [f"{label} actor did not start" for label in late if "#" not in label]
            first = sorted(experts)[0] if experts else None
            raise PlacementError(
                f"cannot place the team within {timeout_s:g}s: " + "; ".join(details),
                field=f"experts.{first}" if first else None)
        for label, ref in pending.items():  # placed, but did its engine start?
            try:
                await ref
            except Exception as exc:  # an engine or the router's model failed to load
                if isinstance(error := translate(exc, actor=label), RouterModelError):
                    raise error from None  # it names the router's model
                name = label.rsplit("#", 1)[0]
                raise NoHealthyExpertError(f"{name} failed to start: {cause_of(exc)}",
                                           field=f"experts.{name}") from None

    # ------------------------------------------------------------------ requests

    async def stream(self, request: OrchestrateRequest, live: bool = True) -> AsyncIterator[Any]:
        """One request end to end: plan, dispatch, guard, fusion; ends in done or error.

        Errors before the plan is admitted (bad input, full queue, actors down) are
        raised, so a server can still answer 4xx/429/503; after it, they become the
        terminal `error` event. `live=False` returns no text before the end (cheaper).
        """
        assert self.router is not None and self.executor is not None
        started = time.monotonic()
        seen = self.load_seen
        age = time.monotonic() - seen[1] if seen is not None else None
        try:
            if plannable_by_caller(request, self.config, age):
                plan = plan_request(request, self.config, seen[0] if seen else None)
            else:
                plan = await self.router.plan.remote(request)
        except Exception as exc:  # bad input (UnknownExpertError), or the router down
            raise translate(exc, actor="router") from None
        source: LivePlan | None = None
        if live:
            source = await LivePlan.open(plan, self.executor, self.replica, self.config.stream)
            if source.admitted is not None:
                self.load_seen = (source.admitted, time.monotonic())
            events: AsyncIterator[Any] = source.events()
        else:
            load, settled = await settled_plan(plan, self.executor)
            self.load_seen = (load, time.monotonic())
            events = _replay(settled)
        first = PlanEvent(request_id=plan.request_id, plan=plan)
        synthesize = self._synthesize if live else self._synthesize_settled
        finished = False
        try:
            async for event in finish_stream(first, events, self.config, synthesize, started):
                finished = event.type in ("done", "error")
                yield event
        except ChorusError as exc:  # the executor or a replica failed mid-request
            if not finished:
                yield ErrorEvent(request_id=plan.request_id, code=exc.code,
                                 message=exc.message, status=exc.status)
        finally:
            await events.aclose()
            if source is not None:
                await source.close()  # the caller went away: every task is cancelled

    async def _synthesize(self, task: ExpertTask) -> AsyncIterator[Any]:
        assert self.executor is not None
        plan = _one_task_plan(task)
        source = await LivePlan.open(plan, self.executor, self.replica, self.config.stream)
        events = source.events()
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
            await source.close()

    async def _synthesize_settled(self, task: ExpertTask) -> AsyncIterator[Any]:
        assert self.executor is not None
        _, events = await settled_plan(_one_task_plan(task), self.executor)
        for event in events:
            yield event

    # ------------------------------------------------------------------ health and stats

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Can a default request be served right now? (`/readyz`)"""
        assert self.supervisor is not None
        return await self.supervisor.readiness()

    async def stats(self, timeout_s: float | None = 5.0) -> dict[str, Any]:
        """Executor, router and per-replica stats; a replica that does not answer says why."""
        assert self.executor is not None and self.router is not None
        # A snapshot: replicas may come and go (scaling) while the answers arrive.
        handles = [(expert, label, handle) for expert, group in self.replicas.items()
                   for label, handle in group.items()]
        labels = [(expert, label) for expert, label, _ in handles]
        answers = await asyncio.gather(
            *(asyncio.wait_for(handle.stats.remote(), timeout_s) for _, _, handle in handles),
            asyncio.wait_for(self.executor.stats.remote(), timeout_s),
            asyncio.wait_for(self.router.stats.remote(), timeout_s),
            return_exceptions=True)
        lives = self.supervisor.states() if self.supervisor else {}
        if self.supervisor:  # it keeps Ray's restart count: no lookup per replica here
            restarts = [lives.get(label, {}).get("ray_restarts", 0) for _, label in labels]
        else:
            restarts = await asyncio.to_thread(
                lambda: [ray_state(handle)[1] for _, _, handle in handles])
        executor = _describe(answers[-2], timeout_s)
        views = executor.get("replicas", {})  # the executor's view: health, load
        experts: dict[str, Any] = {}
        for (expert, label), answer, ray_restarts in zip(labels, answers, restarts, strict=False):
            replica = {**_describe(answer, timeout_s), "ray_restarts": ray_restarts,
                       "dispatch": views.get(expert, {}).get(label),
                       "supervision": lives.get(label)}
            experts.setdefault(expert, {"replicas": {}})["replicas"][label] = replica
        for expert, entry in experts.items():
            first_label, first = next(iter(entry["replicas"].items()))
            entry.update({k: v for k, v in first.items()
                          if k not in ("supervision", "dispatch")})
            entry["state"] = (lives.get(first_label) or {}).get("status")
            if self.scaler is not None:
                entry["scaling"] = self.scaler.describe(expert)
        return {"router": {**_describe(answers[-1], timeout_s), "supervision": lives.get("router")},
                "executor": {**executor, "supervision": lives.get("executor")},
                "experts": experts}

    def shutdown(self) -> None:
        """Stop supervising and kill every actor of the team (no restarts)."""
        if self.scaler is not None:
            self.scaler.stop()
            self.scaler = None
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        handles = [self.router, self.executor,
                   *(h for group in self.replicas.values() for h in group.values())]
        for handle in handles:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        self.replicas.clear()
        self.executor = self.router = None


def _one_task_plan(task: ExpertTask) -> Any:
    from orchestration.models import ExecutionPlan

    return ExecutionPlan(request_id=f"{task.request_id or task.id}.{task.role}",
                         strategy="SERIAL", primary=task.model_copy(update={"stream": True}))


async def _replay(events: list[Any]) -> AsyncIterator[Any]:
    for event in events:
        yield event


def _describe(answer: Any, timeout_s: float | None) -> dict[str, Any]:
    if isinstance(answer, dict):
        return answer
    if isinstance(answer, TimeoutError):
        return {"error": f"no answer within {timeout_s:g}s (restarting or busy)"}
    return {"error": translate(answer, actor="actor").message}
