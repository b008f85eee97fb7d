"""Scaler: keeps each expert's replica count where the config and the load want it.

It runs in the team's controller, over its `Registry`, every `scaling.interval_s`.
Each round it reads the executor's per-expert load (tasks queued + in flight), then:

- joining replicas (scale-ups, rolls, re-sizes) that answered `ready` join dispatch;
  one not ready within `scaling.placement_timeout_s` is given up (killed, reported
  with the resource it lacks) and that expert's scale-ups pause for
  `scaling.placement_backoff_s`; serving goes on meanwhile;
- `orchestration.autoscale` decides the count: below `replicas.min` it grows at once,
  above `replicas.max` (a redeploy lowered it) it drains at once, in between it
  follows the load after the up/down delays;
- a scale-up creates replicas (lowest free `expert#i` label); on a cluster, their
  pending actors are what makes Ray's autoscaler start GPU workers;
- a scale-down drains one replica (the least loaded): it gets no new task, and once
  the executor reports nothing left in flight it is removed; an expert that left the
  config is drained whole, then the executor forgets it.

Decisions with their reasons are kept (the last few; a redeploy's rolls among them),
shown in `/v1/stats` and counted in `ray_chorus_scaling_decisions_total{expert,direction}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from actors.metrics import metrics
from actors.periodic import Periodic
from actors.placement import missing_resources
from actors.registry import Member, Registry
from orchestration.autoscale import ScaleState, decide, placement_failed
from orchestration.supervision import Life

log = logging.getLogger("ray.serve")


class Scaler(Periodic):
    """One team's replica counts: autoscaling, re-sizes and removals."""

    def __init__(self, registry: Registry, removed: Callable[[str, Member], None]) -> None:
        self.registry = registry
        self.removed = removed  # a replica was removed: the controller forgets it
        self.states: dict[str, ScaleState] = {}
        self.held: set[str] = set()  # experts being rolled: no decision meanwhile
        self.last: dict[str, str] = {}  # expert -> the latest decision's reason
        self.history: deque[dict[str, Any]] = deque(maxlen=20)  # changes only

    @property
    def config(self) -> Any:
        return self.registry.config.scaling

    @property
    def interval_s(self) -> float:  # type: ignore[override]
        return self.config.interval_s

    async def step(self) -> None:
        registry = self.registry
        pools = await asyncio.wait_for(registry.executor.pool_stats.remote(), 10)
        now = time.monotonic()
        configured = {e.name: e for e in registry.config.experts}
        for expert in dict.fromkeys([*configured, *registry.experts()]):
            load = pools.get(expert, {})
            changed = self._settle(expert, load, now)
            if expert not in configured:
                changed |= self._drain_all(expert)
            elif expert not in self.held:
                changed |= self._decide(expert, load, now)
            if changed:
                registry.publish(expert)
        for expert in pools:  # left the config and every replica is gone
            if expert not in configured and not registry.replicas(expert):
                registry.executor.forget_expert.remote(expert)
                self.states.pop(expert, None)
                self.last.pop(expert, None)
        self._export(pools)

    # ------------------------------------------------------------------ changes

    def _decide(self, expert: str, load: dict[str, Any], now: float) -> bool:
        knobs = self.registry.config.expert(expert).replicas
        state = self.states.setdefault(expert, ScaleState())
        present = [m for m in self.registry.replicas(expert) if not m.draining]
        if len(present) > knobs.max:  # a redeploy lowered the bound: no delay
            return self._drain(expert, load, f"down: {len(present)} above max {knobs.max}")
        decision = decide(state, load.get("queued", 0) + load.get("in_flight", 0),
                          len(present), now, knobs)
        self.last[expert] = decision.reason
        if decision.target > len(present):
            self._grow(expert, decision.target - len(present), decision.reason)
        elif decision.target < len(present):
            return self._drain(expert, load, decision.reason)
        return False

    def _settle(self, expert: str, load: dict[str, Any], now: float) -> bool:
        """Promote joining replicas that are ready, give up stuck ones, remove drained ones."""
        registry, changed = self.registry, False
        for member in registry.replicas(expert):
            if member.joining is None:
                continue
            if member.life.state is Life.READY:
                member.joining = None
                changed = True
            elif now - member.joining > self.config.placement_timeout_s:
                expert_config = member_config(registry, member)
                why = missing_resources(expert_config) if expert_config else "its expert"
                self.removed(member.label, registry.remove(member.label))
                placement_failed(self.states.setdefault(expert, ScaleState()), now,
                                 self.config.placement_backoff_s)
                self.record(expert, "gave_up", f"{member.label} not ready within "
                             f"{self.config.placement_timeout_s:g}s: needs {why}")
                changed = True
        for label in load.get("drained", []):
            member = registry.members.get(label)
            if member is not None and member.draining:
                self.removed(label, registry.remove(label))
                self.record(expert, "removed", f"{label} drained")
                changed = True
        return changed

    def _grow(self, expert: str, count: int, reason: str) -> None:
        config = self.registry.config.expert(expert)
        for _ in range(count):
            member = self.registry.create_replica(config, self.registry.free_label(expert),
                                                  joining=True)
            self.record(expert, "up", f"{member.label}: {reason}")

    def _drain(self, expert: str, load: dict[str, Any], reason: str) -> bool:
        loads = load.get("replicas", {})
        ready = [m for m in self.registry.replicas(expert)
                 if not m.draining and m.joining is None]
        if len(ready) <= 1:
            return False
        victim = min(ready, key=lambda m: (loads.get(m.label, {}).get("in_flight", 0),
                                           -int(m.label.rsplit("#", 1)[1])))
        victim.draining = True
        self.record(expert, "down", f"{victim.label} draining: {reason}")
        return True

    def _drain_all(self, expert: str) -> bool:
        changed = False
        for member in self.registry.replicas(expert):
            if not member.draining:
                member.draining = True
                self.record(expert, "down", f"{member.label} draining: removed from the config")
                changed = True
        return changed

    def record(self, expert: str, direction: str, reason: str) -> None:
        log.info("scaling %s: %s %s", expert, direction, reason)
        self.history.append({"at": time.time(), "expert": expert, "direction": direction,
                             "reason": reason})
        metrics().scaling.inc(tags={"expert": expert, "direction": direction})

    # ------------------------------------------------------------------ visibility

    def _export(self, pools: dict[str, Any]) -> None:
        for expert in self.registry.experts():
            for state, count in self.counts(expert).items():
                metrics().replicas.set(count, tags={"expert": expert, "state": state})
            for label, replica in pools.get(expert, {}).get("replicas", {}).items():
                metrics().replica_in_flight.set(replica["in_flight"],
                                                tags={"expert": expert, "replica": label})

    def counts(self, expert: str) -> dict[str, int]:
        states = {"ready": 0, "starting": 0, "draining": 0}
        for member in self.registry.replicas(expert):
            kind = ("draining" if member.draining else
                    "starting" if member.joining is not None else "ready")
            states[kind] += 1
        return states

    def describe(self, expert: str) -> dict[str, Any]:
        knobs = self.registry.config.expert(expert).replicas
        return {
            "min": knobs.min, "max": knobs.max, "target_per_replica": knobs.target_per_replica,
            **self.counts(expert),
            "last_decision": self.last.get(expert),
            "history": [h for h in self.history if h["expert"] == expert],
        }


def member_config(registry: Registry, member: Member) -> Any:
    """The config a replica was made from: its expert's, while the expert is configured."""
    return next((e for e in registry.config.experts if e.name == member.expert), None)
