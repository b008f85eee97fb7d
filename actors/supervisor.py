"""Supervisor: keeps a team's actors alive beyond Ray's restart budget, and says how they are.

Every `check_interval_s` it pings each actor (an expert replica answers `ready`, the
router `ping`, the executor `probe`). An actor that does not answer is looked up in
Ray's actor table: `RESTARTING` (Ray brings it back), `ALIVE` (still loading: starting)
or `DEAD` (Ray gave up). A dead actor is re-created after the backoff that
`orchestration.supervision` decides, under a new incarnation name, and the executor is
told about its new handle. The states feed `/v1/stats`, `/readyz` and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import ray
from ray.actor import ActorHandle

from actors.boundary import translate
from actors.metrics import metrics
from actors.periodic import Periodic
from orchestration.supervision import ActorLife, Life

if TYPE_CHECKING:
    from actors.team import Team

log = logging.getLogger("ray.serve")


def ray_state(handle: ActorHandle) -> tuple[str, int]:
    """(state, restarts) from Ray's actor table (GCS).

    Ray's public state API (`ray.util.state`) needs the dashboard, which Chorus does not
    require; the GCS table it reads is what `ray._private.state` returns directly.
    """
    from ray._private import state

    info = state.actors(actor_id=handle._actor_id.hex())
    return str(info.get("State", "UNKNOWN")), int(info.get("NumRestarts", 0))


class Supervisor(Periodic):
    """Watches one team's actors; re-creates those Ray gave up on."""

    def __init__(self, team: Team) -> None:
        self.team = team
        self.config = team.config.supervision
        self.interval_s = self.config.check_interval_s
        now = time.monotonic()
        self.lives: dict[str, ActorLife] = {
            label: ActorLife(label, "expert", expert, Life.READY, now)
            for expert, group in team.replicas.items() for label in group}
        self.lives["router"] = ActorLife("router", "router", None, Life.READY, now)
        self.lives["executor"] = ActorLife("executor", "executor", None, Life.READY, now)
        # Each actor's health call still in flight: a slow one (an engine loading for
        # minutes) is awaited again next round, never sent again (they would pile up).
        self._pings: dict[str, ray.ObjectRef] = {}

    def watch(self, label: str, expert: str) -> None:
        """Supervise a new replica (a scale-up), starting."""
        self.lives[label] = ActorLife(label, "expert", expert, Life.STARTING, time.monotonic())

    def forget(self, label: str) -> None:
        life = self.lives.pop(label, None)
        self._pings.pop(label, None)
        if life is not None:  # a removed replica must not stay "ready" on dashboards
            for state in Life:
                metrics().actor_state.set(0, tags={"actor": label, "role": life.role,
                                                   "state": state.value})

    def states(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {label: life.to_dict(now) for label, life in self.lives.items()}

    # ------------------------------------------------------------------ the loop

    async def step(self) -> None:
        """One round over every actor; one actor's trouble never stops the others'."""
        lives = list(self.lives.values())
        outcomes = await asyncio.gather(*(self._check(life) for life in lives),
                                        return_exceptions=True)
        for life, outcome in zip(lives, outcomes, strict=True):
            if isinstance(outcome, Exception):  # e.g. a re-creation that failed: retried
                log.error("supervising %s failed: %r", life.label, outcome)
        self._export()

    def _handle(self, life: ActorLife) -> ActorHandle | None:
        if life.role == "expert":
            assert life.expert is not None
            return self.team.replicas.get(life.expert, {}).get(life.label)
        return self.team.router if life.role == "router" else self.team.executor

    async def _check(self, life: ActorLife) -> None:
        before = life.state
        try:
            await self._observe(life)
        finally:
            if life.role == "expert" and life.state is not before and life.expert is not None:
                self.team.publish(life.expert)  # the executor dispatches on these states

    async def _observe(self, life: ActorLife) -> None:
        now = time.monotonic()
        if life.state is Life.DEAD:
            if life.retry_at is not None and now >= life.retry_at:
                self._recreate(life, now)
            return
        handle = self._handle(life)
        if handle is None:
            return
        ping = self._pings.get(life.label)
        if ping is None:
            method = {"expert": "ready", "router": "ping", "executor": "probe"}[life.role]
            ping = self._pings[life.label] = getattr(handle, method).remote()
        try:
            # Cancelling this await leaves the call running; the next round awaits it.
            answer = await asyncio.wait_for(ping, self.config.ping_timeout_s)
        except TimeoutError:
            reason = f"no answer within {self.config.ping_timeout_s:g}s"
        except Exception as exc:  # died, restarting, or its engine failed to start
            self._pings.pop(life.label, None)
            reason = translate(exc, actor=life.label).message
        else:
            self._pings.pop(life.label, None)
            pid = answer.get("pid")
            if life.pid is not None and pid != life.pid:  # Ray restarted it in between
                _, life.ray_restarts = await asyncio.to_thread(ray_state, handle)
                if life.role == "executor":
                    self._tell_executor_everything()  # it came back with its first handles
            life.pid = pid
            life.ready(now, self.config)
            return
        state, restarts = await asyncio.to_thread(ray_state, handle)
        life.ray_restarts = restarts
        if state == "DEAD":
            delay = life.dead(now, reason, self.config)
            log.warning("%s is dead (%s); re-creating it in %.1fs", life.label, reason, delay)
        elif state == "RESTARTING":
            life.restarting(now, reason)
        else:
            life.starting(now)

    def _recreate(self, life: ActorLife, now: float) -> None:
        """A fresh incarnation under a new name; the executor learns its handle."""
        old = self._handle(life)
        self._pings.pop(life.label, None)
        if old is not None:
            ray.kill(old, no_restart=True)  # release what is left of it
        team = self.team
        incarnation = f"~{life.recreated + 1}"
        life.recreated_now(now)
        metrics().recreations.inc(tags={"actor": life.label})
        log.warning("re-creating %s (incarnation %s)", life.label, incarnation)
        if life.role == "expert":
            assert life.expert is not None
            team.create_replica(team.config.expert(life.expert), life.label, incarnation)
            team.publish(life.expert)
        elif life.role == "router":
            team.create_router(incarnation)
            if team.executor is not None:
                team.executor.set_router.remote(team.router)
        else:
            team.create_executor(incarnation)
            # It starts believing every replica it was named is ready: tell it the truth
            # (draining, starting or down ones) and where the router is.
            self._tell_executor_everything()

    def _tell_executor_everything(self) -> None:
        team = self.team
        if team.executor is None:
            return
        for expert in team.replicas:
            team.publish(expert)
        if team.router is not None:
            team.executor.set_router.remote(team.router)

    def _export(self) -> None:
        gauge = metrics().actor_state
        for life in self.lives.values():
            for state in Life:
                gauge.set(1 if life.state is state else 0,
                          tags={"actor": life.label, "role": life.role, "state": state.value})

    # ------------------------------------------------------------------ readiness

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = router and executor answer in time, the executor can grant a slot,
        and the default primary (or its fallback) has a ready replica."""
        team, timeout = self.team, self.config.readiness_timeout_s
        checks: dict[str, Any] = {}
        problems: list[str] = []
        try:
            assert team.router is not None
            await asyncio.wait_for(team.router.ping.remote(), timeout)
            checks["router"] = "ok"
        except Exception as exc:  # down, restarting or too slow: not ready
            checks["router"] = _why(exc, timeout, "router")
            problems.append(f"router: {checks['router']}")
        try:
            assert team.executor is not None
            probe = await asyncio.wait_for(team.executor.probe.remote(), timeout)
            checks["executor"] = probe
            if not probe["ok"]:
                problems.append("executor: " + ("wedged: work waits and no slot moved for "
                                f"{probe['seconds_since_progress']:g}s" if probe["wedged"]
                                else "slot accounting drifted"))
        except Exception as exc:  # down, restarting or too slow: not ready
            checks["executor"] = _why(exc, timeout, "executor")
            problems.append(f"executor: {checks['executor']}")
        primary = team.config.router.primary
        candidates = [primary, *([fb] if (fb := team.config.expert(primary).fallback) else [])]
        now = time.monotonic()
        serving = [name for name in candidates
                   if any(life.state is Life.READY for life in self.lives.values()
                          if life.expert == name)]
        checks["default_primary"] = serving[0] if serving else None
        if not serving:
            states = ", ".join(f"{life.label} {life.describe(now)}"
                               for life in self.lives.values() if life.expert in candidates)
            who = f"{primary!r}" + (f" or its fallback {candidates[1]!r}" if fb else "")
            problems.append(f"no ready replica of the default primary {who}: {states}")
        experts = {label: life.describe(now) for label, life in self.lives.items()}
        ready = not problems
        return ready, {"status": "ready" if ready else "unavailable", "problems": problems,
                       "checks": checks, "actors": experts}


def _why(exc: BaseException, timeout: float, actor: str) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    return translate(exc, actor=actor).message
