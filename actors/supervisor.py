"""Supervisor: keeps a team's actors alive beyond Ray's restart budget, and says how they are.

It runs in the team's controller, over its `Registry`. Three ways of seeing an actor:

- Ray's **actor table**, read every `watch_interval_s` (0.1 s) for each ready actor: a
  crash shows there within milliseconds (restarting, restarted, or dead), so dispatch
  and readiness follow it at once; the supervisor then awaits the restarted actor's
  first answer, so it is `ready` again (and in dispatch) the moment it answers;
- a **vigil**: one call per actor that never returns (`vigil()`); when the actor's
  process dies, Ray fails that call (within about a second and a half here), and the
  supervisor looks the actor up in Ray's actor table right then;
- a **round** every `check_interval_s`: each actor is pinged (an expert replica answers
  `ready`, the router `ping`, the executor `probe`). One that does not answer is looked
  up in Ray's actor table: `RESTARTING` (Ray brings it back), `ALIVE` (still loading:
  starting) or `DEAD` (Ray gave up). A dead actor is re-created after the backoff that
  `orchestration.supervision` decides, under a new name, and the executor is told.

The states feed `/v1/stats`, `/readyz`, dispatch (`Registry.publish`) and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.actor_table import ray_state
from actors.boundary import translate
from actors.metrics import metrics
from actors.periodic import Periodic
from actors.registry import Member, Registry
from orchestration.supervision import Life

log = logging.getLogger("ray.serve")
_HEALTH = {"expert": "ready", "router": "ping", "executor": "probe"}


def _states(handles: list[ActorHandle]) -> list[tuple[str, int]]:
    return [ray_state(handle) for handle in handles]


class Supervisor(Periodic):
    """Watches one team's actors; re-creates those Ray gave up on."""

    def __init__(self, registry: Registry, changed: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.changed = changed  # the team's view changed (a re-created actor)
        # Each actor's health call still in flight: a slow one (an engine loading for
        # minutes) is awaited again next round, never sent again (they would pile up).
        self._pings: dict[str, ray.ObjectRef] = {}
        self._vigils: dict[str, asyncio.Task[None]] = {}
        self._revivals: dict[str, asyncio.Future[bool]] = {}
        self._watcher: asyncio.Task[None] | None = None

    @property
    def config(self) -> Any:
        return self.registry.config.supervision

    @property
    def interval_s(self) -> float:  # type: ignore[override]
        return self.config.check_interval_s

    def forget(self, label: str, member: Member | None) -> None:
        """A removed actor: no vigil, no ping, and it leaves the state gauge."""
        self._pings.pop(label, None)
        for task in (self._vigils.pop(label, None), self._revivals.pop(label, None)):
            if task is not None:
                task.cancel()
        if member is not None:
            for state in Life:
                metrics().actor_state.set(0, tags={"actor": label, "role": member.role,
                                                   "state": state.value})

    def stop(self) -> None:
        super().stop()
        if self._watcher is not None:
            self._watcher.cancel()
        for task in [*self._vigils.values(), *self._revivals.values()]:
            task.cancel()
        self._vigils.clear()
        self._revivals.clear()

    # ------------------------------------------------------------------ the loop

    async def step(self) -> None:
        """One round over every actor; one actor's trouble never stops the others'."""
        members = list(self.registry.members.values())
        outcomes = await asyncio.gather(*(self._check(m) for m in members),
                                        return_exceptions=True)
        for member, outcome in zip(members, outcomes, strict=True):
            if isinstance(outcome, Exception):  # e.g. a re-creation that failed: retried
                log.error("supervising %s failed: %r", member.label, outcome)
        self._export()

    async def _check(self, member: Member) -> None:
        before = member.life.state
        try:
            await self._observe(member)
        finally:
            self._settled(member, before)

    def _settled(self, member: Member, before: Life) -> None:
        if member.life.state is not before and member.expert is not None:
            self.registry.publish(member.expert)  # the executor dispatches on these states
        if member.life.state is Life.READY:
            self._keep_vigil(member)

    async def _observe(self, member: Member) -> None:
        life, now = member.life, time.monotonic()
        if life.state is Life.DEAD:
            if life.retry_at is not None and now >= life.retry_at:
                self._recreate(member, now)
            return
        ping = self._pings.get(member.label)
        if ping is None:
            ping = self._pings[member.label] = getattr(member.handle,
                                                       _HEALTH[member.role]).remote()
        try:
            # Cancelling this await leaves the call running; the next round awaits it.
            answer = await asyncio.wait_for(ping, self.config.ping_timeout_s)
        except TimeoutError:
            reason = f"no answer within {self.config.ping_timeout_s:g}s"
        except Exception as exc:  # died, restarting, or its engine failed to start
            self._pings.pop(member.label, None)
            reason = translate(exc, actor=member.label).message
        else:
            self._pings.pop(member.label, None)
            await self._answered(member, answer)
            return
        await self._down(member, reason, now)

    async def _answered(self, member: Member, answer: dict[str, Any]) -> None:
        """It answered: ready; a new pid means Ray restarted it in between."""
        life = member.life
        if life.pid is not None and answer.get("pid") != life.pid:
            _, life.ray_restarts = await asyncio.to_thread(ray_state, member.handle)
            if member.role == "executor":
                self.registry.publish_all()  # it came back with its first handles
        life.pid = answer.get("pid")
        life.ready(time.monotonic(), self.config)

    async def _down(self, member: Member, reason: str, now: float) -> None:
        """Not answering: what does Ray say it is?"""
        life = member.life
        state, life.ray_restarts = await asyncio.to_thread(ray_state, member.handle)
        if state == "DEAD":
            delay = life.dead(now, reason, self.config)
            log.warning("%s is dead (%s); re-creating it in %.1fs", life.label, reason, delay)
        elif state == "RESTARTING":
            life.restarting(now, reason)
        else:
            life.starting(now)

    async def recheck(self, member: Member) -> None:
        """A call to it just failed as if its process were gone: what does Ray say?"""
        before = member.life.state
        await self._down(member, "its process did not answer", time.monotonic())
        self._settled(member, before)

    # ------------------------------------------------------------------ vigils

    def _keep_vigil(self, member: Member) -> None:
        vigil = self._vigils.get(member.label)
        if vigil is None or vigil.done():
            self._vigils[member.label] = asyncio.ensure_future(self._vigil(member))

    async def _vigil(self, member: Member) -> None:
        """Wait on a call that only ends when the actor's process does; then follow its
        restart, so it is `ready` again (and in dispatch) the moment it answers."""
        while self.registry.members.get(member.label) is member:
            pid = member.life.pid
            try:
                await member.handle.vigil.remote()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the process died (Ray restarts it, or gave up)
                if self.registry.members.get(member.label) is not member:
                    return  # removed or replaced meanwhile: not ours to report
                if member.life.pid != pid and member.life.state is Life.READY:
                    continue  # the table watch saw the restart, and it is back already
                before = member.life.state
                self._pings.pop(member.label, None)
                await self._down(member, translate(exc, actor=member.label).message,
                                 time.monotonic())
                if member.life.state is Life.READY:  # the table still said ALIVE
                    member.life.starting(time.monotonic())
                self._settled(member, before)
                self._export()
            if not await self._revival(member):
                return  # dead for good: the rounds re-create it (with a vigil of its own)

    def _revival(self, member: Member) -> asyncio.Future[bool]:
        """One wait per restart for the actor's first answer, whoever asks first."""
        revival = self._revivals.get(member.label)
        if revival is None or revival.done():
            revival = self._revivals[member.label] = asyncio.ensure_future(self._back(member))
        return revival

    async def _back(self, member: Member) -> bool:
        """Await the restarted actor's first answer (an engine may load for minutes);
        False once Ray says it is dead for good."""
        while True:
            if self.registry.members.get(member.label) is not member:
                return False
            try:
                answer = await getattr(member.handle, _HEALTH[member.role]).remote()
                break
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - sent while it restarted, or it is dead
                state, _ = await asyncio.to_thread(ray_state, member.handle)
                if state == "DEAD":
                    return False
                await asyncio.sleep(self.config.watch_interval_s)
        if self.registry.members.get(member.label) is not member or member.life.state is Life.DEAD:
            return False
        before = member.life.state
        await self._answered(member, answer)
        self._settled(member, before)  # in dispatch again
        self._export()
        return True

    async def _watch_table(self) -> None:
        """Every `supervision.watch_interval_s`, Ray's actor table for each ready actor:
        a crash shows there within milliseconds (restarting, restarted, or dead), well
        before Ray fails the vigil's call."""
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            ready = [m for m in self.registry.members.values() if m.life.state is Life.READY]
            if not ready:
                continue
            try:
                rows = await asyncio.to_thread(_states, [m.handle for m in ready])
            except Exception:  # noqa: BLE001 - the GCS is busy: the vigils still watch
                continue
            now = time.monotonic()
            for member, (state, restarts) in zip(ready, rows, strict=True):
                life = member.life
                if life.state is not Life.READY or (
                        state == "ALIVE" and restarts <= life.ray_restarts):
                    continue
                life.ray_restarts = restarts
                if state == "DEAD":
                    life.dead(now, "its process died and Ray will not restart it", self.config)
                else:  # restarting, or restarted and not answering yet
                    life.restarting(now, "its process died; Ray restarted it")
                self._settled(member, Life.READY)
                self._export()
                if state != "DEAD":
                    self._revival(member)

    def start(self) -> None:
        super().start()
        self._watcher = asyncio.ensure_future(self._watch_table())

    # ------------------------------------------------------------------ re-creation

    def _recreate(self, member: Member, now: float) -> None:
        """A fresh incarnation under a new name; the executor learns its handle."""
        registry, life = self.registry, member.life
        self._pings.pop(member.label, None)
        ray.kill(member.handle, no_restart=True)  # release what is left of it
        life.recreated_now(now)
        metrics().recreations.inc(tags={"actor": life.label})
        log.warning("re-creating %s (incarnation %d)", life.label, life.recreated)
        if member.role == "expert":
            assert member.expert is not None
            expert = next((e for e in registry.config.experts if e.name == member.expert), None)
            if expert is None:  # removed from the config while it was dead
                registry.remove(member.label)
                return
            new = registry.create_replica(expert, member.label, life=life)
            new.draining = member.draining
            registry.publish(member.expert)
        elif member.role == "router":
            registry.create_router(life=life)
            registry.publish_all()
        else:
            registry.create_executor(life=life)
            # It starts believing every replica it was named is ready: tell it the truth
            # (draining, starting or down ones) and where the router is.
            registry.publish_all()
        self.changed()

    def _export(self) -> None:
        gauge = metrics().actor_state
        for member in self.registry.members.values():
            for state in Life:
                gauge.set(1 if member.life.state is state else 0,
                          tags={"actor": member.label, "role": member.role,
                                "state": state.value})

    # ------------------------------------------------------------------ readiness

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = router and executor answer in time, the executor can grant a slot,
        and the default primary (or its fallback) has a ready replica in dispatch."""
        registry, timeout = self.registry, self.config.readiness_timeout_s
        checks: dict[str, Any] = {}
        problems: list[str] = []
        try:
            await asyncio.wait_for(registry.router.ping.remote(), timeout)
            checks["router"] = "ok"
        except Exception as exc:  # down, restarting or too slow: not ready
            checks["router"] = _why(exc, timeout, "router")
            problems.append(f"router: {checks['router']}")
        try:
            probe = await asyncio.wait_for(registry.executor.probe.remote(), timeout)
            checks["executor"] = probe
            if not probe["ok"]:
                problems.append("executor: " + ("wedged: work waits and no slot moved for "
                                f"{probe['seconds_since_progress']:g}s" if probe["wedged"]
                                else "slot accounting drifted"))
        except Exception as exc:  # down, restarting or too slow: not ready
            checks["executor"] = _why(exc, timeout, "executor")
            problems.append(f"executor: {checks['executor']}")
        config = registry.config
        primary = config.router.primary
        candidates = [primary, *([fb] if (fb := config.expert(primary).fallback) else [])]
        now = time.monotonic()
        serving = [name for name in candidates
                   if any(m.dispatch_state() == "ready" for m in registry.replicas(name)
                          if m.joining is None)]
        checks["default_primary"] = serving[0] if serving else None
        if not serving:
            states = ", ".join(f"{m.label} {describe(m, now)}"
                               for name in candidates for m in registry.replicas(name))
            who = f"{primary!r}" + (f" or its fallback {candidates[1]!r}" if fb else "")
            problems.append(f"no ready replica of the default primary {who}: {states}")
        actors = {m.label: describe(m, now) for m in registry.members.values()}
        ready = not problems
        return ready, {"status": "ready" if ready else "unavailable", "problems": problems,
                       "checks": checks, "actors": actors}


def describe(member: Member, now: float) -> str:
    """One word (or phrase) for an actor: its supervision state, or draining/joining."""
    if member.draining:
        return "draining"
    if member.joining is not None and member.life.state is Life.READY:
        return "joining"
    return member.life.describe(now)


def _why(exc: BaseException, timeout: float, actor: str) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    return translate(exc, actor=actor).message
