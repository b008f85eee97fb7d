"""Registry: one team's actors, how each is made, and what dispatch sees of them.

The team's controller (`actors/controller.py`) holds the one registry; its supervisor,
its scaler and redeploys change it, and `publish` tells the executor an expert's
replicas. Every actor is created by the controller's process, so it is owned by it:
when the controller goes (the team is removed, or it died), Ray removes them all.

    Member      one actor: label ("general#0", "router", "executor"), role, handle,
                name, supervision state (`ActorLife`), the actor spec it was built
                from, and whether it is joining (not in dispatch yet) or draining.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.boundary import cause_of, translate
from actors.executor import ExecutorActor
from actors.expert import ExpertActor
from actors.placement import missing_resources
from actors.router import RouterActor
from orchestration.config import ChorusConfig, ExpertConfig
from orchestration.errors import NoHealthyExpertError, PlacementError, RouterModelError
from orchestration.reconcile import actor_spec
from orchestration.replicas import replica_label
from orchestration.supervision import ActorLife, Life


@dataclass
class Member:
    """One actor of the team."""

    label: str  # "general#0", "router", "executor"
    handle: ActorHandle
    name: str  # Ray's actor name (unique per incarnation)
    life: ActorLife
    spec: dict[str, Any] | None = None  # an expert replica's actor_spec
    joining: float | None = None  # created at (monotonic): not in dispatch until ready
    draining: bool = False  # no new task; removed once nothing is in flight

    @property
    def role(self) -> str:
        return self.life.role

    @property
    def expert(self) -> str | None:
        return self.life.expert

    def dispatch_state(self) -> str:
        """What the executor is told: "ready", "down" (restarting or re-created, not
        answering yet) or "draining"."""
        if self.draining:
            return "draining"
        return "ready" if self.life.state is Life.READY else "down"


class Registry:
    """The team's actors, by label; the config they run."""

    def __init__(self, config: ChorusConfig, name: str, token: str) -> None:
        self.config = config
        self.name = name  # "chorus-<app>"
        self.token = token  # names this controller incarnation's actors apart
        self.members: dict[str, Member] = {}
        self._incarnations = 0

    # ------------------------------------------------------------------ queries

    def replicas(self, expert: str) -> list[Member]:
        return [m for m in self.members.values() if m.expert == expert]

    def experts(self) -> list[str]:
        """Every expert that has replicas (a removed one, until it drained, included)."""
        return list(dict.fromkeys(m.expert for m in self.members.values() if m.expert))

    @property
    def executor(self) -> ActorHandle:
        return self.members["executor"].handle

    @property
    def router(self) -> ActorHandle:
        return self.members["router"].handle

    def handles(self) -> dict[str, dict[str, ActorHandle]]:
        """expert -> label -> handle, of every replica that is in dispatch or draining."""
        out: dict[str, dict[str, ActorHandle]] = {}
        for member in self.members.values():
            if member.expert is not None and member.joining is None:
                out.setdefault(member.expert, {})[member.label] = member.handle
        return out

    def free_label(self, expert: str) -> str:
        taken = {m.label for m in self.replicas(expert)}
        index = 0
        while replica_label(expert, index) in taken:
            index += 1
        return replica_label(expert, index)

    # ------------------------------------------------------------------ actors

    def _name(self, label: str) -> str:
        self._incarnations += 1
        return f"{self.name}.{self.token}.{label}~{self._incarnations}"

    def _options(self, name: str) -> dict[str, Any]:
        return {"name": name, "namespace": self.config.server.namespace}

    def create_replica(self, expert: ExpertConfig, label: str, *, joining: bool = False,
                       life: ActorLife | None = None) -> Member:
        """A replica actor of `expert`; a re-created one keeps its label and its life."""
        name = self._name(f"expert.{label}")
        options: dict[str, Any] = {
            # Ray restarts a crashed expert; our executor retries its tasks (so no Ray retries).
            "max_restarts": expert.max_restarts,
            "max_task_retries": 0,
            # Room above the engine's bound for streamed reads, health and stats calls.
            "max_concurrency": 2 * expert.max_concurrency + 8,
            **self._options(name),
            **expert.actor_options(),
        }
        if expert.env:
            options["runtime_env"] = {"env_vars": dict(expert.env)}
        handle = ExpertActor.options(**options).remote(expert, label, self.config.stream)
        now = time.monotonic()
        member = Member(label, handle, name,
                        life or ActorLife(label, "expert", expert.name, Life.STARTING, now),
                        spec=actor_spec(expert), joining=now if joining else None)
        self.members[label] = member
        return member

    def create_router(self, life: ActorLife | None = None, store: bool = True) -> Member:
        name = self._name("router")
        handle = RouterActor.options(
            max_restarts=3, max_concurrency=self.config.executor.max_concurrent_plans,
            **self.config.router.resources.ray_options(), **self._options(name),
        ).remote(self.config)
        member = Member("router", handle, name,
                        life or ActorLife("router", "router", None, Life.STARTING,
                                          time.monotonic()))
        if store:  # else a replacement, stored once it is ready
            self.members["router"] = member
        return member

    def create_executor(self, life: ActorLife | None = None) -> Member:
        name = self._name("executor")
        # Names, not handles: constructor arguments stay inline (a Ray restart re-runs
        # __init__ with them), and the supervisor pushes fresh handles later.
        replicas = {expert: {m.label: m.name for m in self.replicas(expert)
                             if m.joining is None}
                    for expert in self.experts()}
        router = self.members.get("router")
        handle = ExecutorActor.options(
            max_restarts=3, max_concurrency=self.config.executor.max_concurrent_plans,
            **self.config.executor.resources.ray_options(), **self._options(name),
        ).remote(self.config, replicas, router.name if router else None)
        member = Member("executor", handle, name,
                        life or ActorLife("executor", "executor", None, Life.STARTING,
                                          time.monotonic()))
        self.members["executor"] = member
        return member

    def remove(self, label: str) -> Member | None:
        """Kill an actor (drained, given up, or replaced) and forget it."""
        member = self.members.pop(label, None)
        if member is not None:
            ray.kill(member.handle, no_restart=True)
        return member

    def kill_all(self) -> None:
        for member in self.members.values():
            ray.kill(member.handle, no_restart=True)
        self.members.clear()

    # ------------------------------------------------------------------ dispatch

    def dispatch_members(self, expert: str) -> dict[str, tuple[ActorHandle, str, str]]:
        """label -> (handle, state, actor name) of the replicas the executor may use; a
        joining replica (scale-up, roll) is left out until it answered `ready`."""
        return {m.label: (m.handle, m.dispatch_state(), m.name)
                for m in self.replicas(expert) if m.joining is None}

    def publish(self, expert: str) -> None:
        """Tell the executor the expert's current replicas (fire and forget)."""
        executor = self.members.get("executor")
        if executor is not None:
            executor.handle.set_replicas.remote(expert, self.dispatch_members(expert))

    def publish_all(self) -> None:
        for expert in self.experts():
            self.publish(expert)
        executor, router = self.members.get("executor"), self.members.get("router")
        if executor is not None and router is not None:
            executor.handle.set_router.remote(router.handle)

    # ------------------------------------------------------------------ startup

    async def wait_ready(self, members: list[Member], timeout_s: float) -> None:
        """Wait until each actor answers; fail fast, naming each expert and the
        resource it lacks, when the cluster cannot place it, or what its engine said
        when it failed to start. Each answered one is `ready`."""
        if not members:
            return
        method = {"expert": "ready", "router": "ready", "executor": "probe"}
        pending = [(m, getattr(m.handle, method[m.role]).remote()) for m in members]
        refs = [ref for _, ref in pending]
        ready, _ = await asyncio.to_thread(ray.wait, refs, num_returns=len(refs),
                                           timeout=timeout_s)
        late = [m for m, ref in pending if ref not in ready]
        if late:
            experts = {m.expert for m in late} - {None}
            details = [f"expert {name!r} needs {missing_resources(self._expert(name))}"
                       for name in sorted(experts)]
            details += [f"{m.label} actor did not start" for m in late if m.expert is None]
            first = sorted(experts)[0] if experts else None
            raise PlacementError(
                f"cannot place the team within {timeout_s:g}s: " + "; ".join(details),
                field=f"experts.{first}" if first else None)
        now = time.monotonic()
        for member, ref in pending:  # placed, but did its engine start?
            try:
                answer = await ref
            except Exception as exc:  # an engine or the router's model failed to load
                if isinstance(error := translate(exc, actor=member.label), RouterModelError):
                    raise error from None  # it names the router's model
                name = member.expert or member.label
                raise NoHealthyExpertError(f"{name} failed to start: {cause_of(exc)}",
                                           field=f"experts.{name}") from None
            member.life.pid = answer.get("pid")
            member.life.ready(now, self.config.supervision)

    def _expert(self, name: str) -> ExpertConfig:
        return self.config.expert(name)
