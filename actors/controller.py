"""TeamController: the one owner of a team's actors, outliving every ingress replica.

Its jobs:

1. **apply a config**: start the team, or reconcile the running team with a new config
   (`orchestration/reconcile.py`): unchanged experts keep their actors, changed ones
   roll replica by replica, added ones start, removed ones drain, the router is swapped
   and the executor reconfigured in place;
2. **keep it alive and sized**: the one supervisor and the one scaler of the team run
   here, whatever the number of ingress replicas;
3. **answer for it**: readiness, stats (with the request telemetry every ingress
   replica reports), and the view its clients route with (`watch`, long-polled);
4. **drain and remove it**: on `drain` clients refuse new work while theirs finishes; on
   `shutdown`, or once its Serve app is gone, every actor of the team is killed.

For a Serve app it is a detached actor named `<team>.controller`, created by the first
ingress replica and found by the others; for `Client.local` it belongs to the driver.
The team's actors are created here, so they are owned by this process: if it dies,
Ray removes them too (an ingress replica then starts a new controller and team).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.placement import room_for
from actors.registry import Member, Registry
from actors.scaler import Scaler
from actors.stats import team_stats
from actors.supervisor import Supervisor
from orchestration.config import ChorusConfig, ExpertConfig
from orchestration.errors import ChorusError
from orchestration.reconcile import actor_spec, diff
from orchestration.replicas import replica_label
from orchestration.telemetry import RequestWindow

log = logging.getLogger("ray.serve")
RETIRE_AFTER_S = 10.0  # a swapped-out router lives this long for plans still in flight
INGRESS_GONE_S = 10.0  # an ingress replica that has not reported for this long is gone
APP_CHECK_S = 2.0


@dataclass(slots=True)
class TeamView:
    """What a client of the team routes with; a new `version` whenever it changes."""

    version: int
    config: ChorusConfig
    executor: ActorHandle
    router: ActorHandle
    replicas: dict[str, dict[str, ActorHandle]]  # expert -> label -> handle
    handles: dict[str, ActorHandle]  # actor name -> handle (a reader's replica)
    draining: bool = False


@ray.remote
class TeamController:
    """Owns one team: its actors, their supervision and scaling, its removal."""

    def __init__(self, name: str, app: str | None = None) -> None:
        self.name = name
        self.app = app  # the Serve app the team belongs to (None: a driver's own team)
        self.token = uuid.uuid4().hex[:6]  # this incarnation's actors have it in their names
        self.registry: Registry | None = None
        self.supervisor: Supervisor | None = None
        self.scaler: Scaler | None = None
        self.deployed_at = float("-inf")
        self.version = 0
        self.draining = False
        self.removed = False  # `shutdown` ran: this controller starts no team again
        self.window = RequestWindow()
        self.ingresses: dict[str, dict[str, Any]] = {}
        self._lock: asyncio.Lock | None = None
        self._bumped: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ the view

    def _event(self) -> asyncio.Event:
        if self._bumped is None:
            self._bumped = asyncio.Event()
        return self._bumped

    def _bump(self) -> None:
        self.version += 1
        event, self._bumped = self._event(), asyncio.Event()
        event.set()

    def view(self) -> TeamView:
        registry = self._team()
        members = [m for m in registry.members.values() if m.expert is not None]
        return TeamView(self.version, registry.config, registry.executor, registry.router,
                        registry.handles(), {m.name: m.handle for m in members},
                        self.draining)

    async def watch(self, version: int, timeout_s: float = 30.0) -> TeamView:
        """The view once it is newer than `version` (or after `timeout_s`, unchanged)."""
        if self.version == version and self.registry is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event().wait(), timeout_s)
        return self.view()

    def _team(self) -> Registry:
        if self.registry is None:
            raise ChorusError(f"team {self.name} is not running")
        return self.registry

    # ------------------------------------------------------------------ apply

    async def apply(self, config: ChorusConfig, deployed_at: float = 0.0) -> TeamView:
        """Run `config`: start the team, or reconcile the running one with it. A replica
        of an older deploy (re)attaching (`deployed_at` older than the latest) changes
        nothing. Raises what keeps the team from starting (PlacementError, ...)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self.removed:
            raise ChorusError(f"team {self.name} was removed")
        async with self._lock:
            if self.registry is None:
                await self._start(config)
            elif deployed_at >= self.deployed_at:
                await self._reconcile(config)
            self.deployed_at = max(self.deployed_at, deployed_at)
            return self.view()

    async def _start(self, config: ChorusConfig) -> None:
        registry = Registry(config, self.name, self.token)
        for expert in config.experts:
            for index in range(expert.replicas.initial or expert.replicas.min):
                registry.create_replica(expert, replica_label(expert.name, index))
        # A crashed router or executor comes back for the next requests (its in-flight
        # streams end with an `error` event); their state is per request.
        registry.create_router()
        registry.create_executor()
        try:
            await registry.wait_ready(list(registry.members.values()),
                                      config.server.startup_timeout_s)
        except BaseException:
            registry.kill_all()
            raise
        self.registry = registry
        self.supervisor = Supervisor(registry, self._bump)
        self.supervisor.start()
        self.scaler = Scaler(registry, self._removed)
        self.scaler.start()
        if self.app is not None:
            self._spawn(self._watch_app())
        self._bump()
        log.info("team %s started: %s", self.name, ", ".join(registry.members))

    async def _reconcile(self, new: ChorusConfig) -> None:
        registry = self._team()
        old = registry.config
        changes = diff(old, new)
        rolled = [e for e in new.experts if any(
            m.spec != actor_spec(e) for m in registry.replicas(e.name) if not m.draining)]
        if changes.nothing and not rolled:
            return
        log.info("team %s: applying a new config: %s", self.name, changes.summary())
        for key in changes.restart:
            log.warning("team %s: %s changed; it applies when the team is next started "
                        "(serve shutdown, then deploy)", self.name, key)
        registry.config = new
        added = [registry.create_replica(e, replica_label(e.name, i), joining=True)
                 for e in new.experts if e.name in changes.added
                 for i in range(e.replicas.initial or e.replicas.min)]
        try:
            await registry.wait_ready(added, new.server.startup_timeout_s)
        except BaseException:
            for member in added:
                self._removed(member.label, registry.remove(member.label))
            registry.config = old
            raise
        for member in added:
            member.joining = None
        await registry.executor.reconfigure.remote(new)  # pools, bounds, retries, fallbacks
        for name in changes.added:
            registry.publish(name)
        if changes.router_actor:
            await self._replace_router()
        elif changes.router:
            await registry.router.reconfigure.remote(new)
        if changes.stream:
            for member in registry.members.values():
                if member.expert is not None:
                    member.handle.set_stream.remote(new.stream)
        self._bump()
        for expert in rolled:
            await self._roll(expert)
        # Removed experts and new replica bounds: the scaler drains and grows (next round).

    async def _replace_router(self) -> None:
        """A router with the new config, swapped in once ready; the old one is killed
        after the plans it may still be making."""
        registry = self._team()
        old = registry.members["router"]
        new = registry.create_router(store=False)
        try:
            await registry.wait_ready([new], registry.config.server.startup_timeout_s)
        except BaseException:
            ray.kill(new.handle, no_restart=True)
            raise
        registry.members["router"] = new
        registry.executor.set_router.remote(new.handle)
        self._spawn(self._retire(old.handle))

    async def _retire(self, handle: ActorHandle) -> None:
        await asyncio.sleep(RETIRE_AFTER_S)
        ray.kill(handle, no_restart=True)

    async def _roll(self, expert: ExpertConfig) -> None:
        """Replace each replica built from an older spec, one at a time."""
        registry, scaler = self._team(), self.scaler
        assert scaler is not None
        spec = actor_spec(expert)
        scaler.held.add(expert.name)
        try:
            for old in list(registry.replicas(expert.name)):
                if old.spec == spec or old.draining or old.label not in registry.members:
                    continue
                how = "started beside it"
                if not room_for(expert):
                    how = "no room for one more replica: drained it first"
                    log.warning("team %s: no room for one more replica of %s: draining %s "
                                "first, then replacing it", self.name, expert.name, old.label)
                    await self._drain_out(old)
                new = registry.create_replica(expert, registry.free_label(expert.name),
                                              joining=True)
                try:
                    await registry.wait_ready([new], registry.config.scaling.placement_timeout_s)
                except BaseException:
                    self._removed(new.label, registry.remove(new.label))
                    raise  # the deploy fails; the replicas of the older spec serve on
                new.joining = None
                old.draining = True  # a no-op if it already went
                registry.publish(expert.name)
                self._bump()
                scaler.record(expert.name, "rolled", f"{new.label} replaces {old.label} ({how})")
        finally:
            scaler.held.discard(expert.name)

    async def _drain_out(self, member: Member) -> None:
        """Drain a replica and wait until the scaler removed it (at most `drain_s`)."""
        registry = self._team()
        member.draining = True
        registry.publish(member.expert or "")
        deadline = time.monotonic() + registry.config.server.drain_s
        while registry.members.get(member.label) is member and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if registry.members.get(member.label) is member:  # still busy: its attempts retry
            self._removed(member.label, registry.remove(member.label))
            registry.publish(member.expert or "")

    def _removed(self, label: str, member: Member | None) -> None:
        if self.supervisor is not None:
            self.supervisor.forget(label, member)
        self._bump()

    # ------------------------------------------------------------------ answers

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Can a default request be served right now? (`/readyz`)"""
        if self.registry is None or self.supervisor is None:
            return False, {"status": "unavailable", "problems": ["the team is not running"],
                           "checks": {}, "actors": {}}
        ready, body = await self.supervisor.readiness()
        if self.draining:
            body["problems"].insert(0, "draining: the team is being stopped")
            body["status"], ready = "draining", False
        return ready, body

    async def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        registry = self._team()
        body = await team_stats(registry, self.supervisor, self.scaler, timeout_s)
        now = time.monotonic()
        self.ingresses = {k: v for k, v in self.ingresses.items()
                          if now - v["seen"] < INGRESS_GONE_S}
        body["requests"] = self.window.snapshot()
        body["ingresses"] = [{k: v for k, v in info.items() if k != "seen"}
                             for info in self.ingresses.values()]
        return body

    def report(self, ingress: str, ended: list[tuple[float, float, float | None, str]],
               where: dict[str, Any]) -> None:
        """An ingress replica's requests that ended since its last report (time, latency,
        TTFT, outcome), and what it has in flight: counted once for the whole team."""
        for at, latency, ttft, outcome in ended:
            self.window.record(latency, ttft, outcome, at=at)
        self.ingresses[ingress] = {**where, "seen": time.monotonic()}

    # ------------------------------------------------------------------ drain and removal

    def drain(self) -> None:
        """Stop taking new work (clients answer 503 and `/readyz` says draining)."""
        if not self.draining:
            self.draining = True
            log.info("team %s: draining", self.name)
            self._bump()

    def in_flight(self) -> int:
        """Requests the ingress replicas that reported lately still have in flight."""
        now = time.monotonic()
        return sum(v.get("in_flight", 0) for v in self.ingresses.values()
                   if now - v["seen"] < INGRESS_GONE_S)

    def shutdown(self) -> None:
        """Kill every actor of the team; the controller's owner then kills it."""
        for loop in (self.scaler, self.supervisor):
            if loop is not None:
                loop.stop()
        for task in self._tasks:
            task.cancel()
        if self.registry is not None:
            log.info("team %s: removing %d actors", self.name, len(self.registry.members))
            self.registry.kill_all()
        self.registry = self.supervisor = self.scaler = None
        self.draining = self.removed = True
        self._bump()

    async def _watch_app(self) -> None:
        """A Serve app's team goes with its app, whoever deleted it and however."""
        from ray import serve

        missing = 0
        while True:
            await asyncio.sleep(APP_CHECK_S)
            try:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(self.app or "")
                gone = app is None or app.status.value == "DELETING"
            except Exception:  # noqa: BLE001 - no Serve instance any more: the app is gone
                gone = True
            missing = missing + 1 if gone else 0
            if missing >= 2:
                log.info("team %s: Serve app %r is gone; removing the team", self.name,
                         self.app)
                self.shutdown()
                ray.actor.exit_actor()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ping(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "running": self.registry is not None}
