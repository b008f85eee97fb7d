"""Scaler: applies `orchestration.autoscale` to each expert, every `scaling.interval_s`.

Each round it reads the executor's per-expert load (tasks queued + in flight), then:

- a scale-up creates replicas (lowest free `expert#i` label) that join dispatch as soon
  as they answer `ready`; on a cluster, their pending actors are what makes Ray's
  autoscaler start GPU workers. One not ready within `scaling.placement_timeout_s` is
  given up (killed, reported with the resource it lacks) and that expert's scale-ups
  pause for `scaling.placement_backoff_s`; serving goes on meanwhile;
- a scale-down drains one replica (the least loaded): it gets no new task, and once
  the executor reports nothing left in flight it is removed.

Decisions with their reasons are kept (the last few), shown in `/v1/stats` and counted
in `ray_chorus_scaling_decisions_total{expert,direction}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from actors.metrics import metrics
from actors.periodic import Periodic
from actors.placement import missing_resources
from orchestration.autoscale import ScaleState, decide, placement_failed
from orchestration.replicas import replica_label

if TYPE_CHECKING:
    from actors.team import Team

log = logging.getLogger("ray.serve")


class Scaler(Periodic):
    """One team's autoscaling loop."""

    def __init__(self, team: Team) -> None:
        self.team = team
        self.config = team.config.scaling
        self.interval_s = self.config.interval_s
        self.states = {e.name: ScaleState() for e in team.config.experts}
        self.last: dict[str, str] = {}  # expert -> the latest decision's reason
        self.history: deque[dict[str, Any]] = deque(maxlen=20)  # changes only

    async def step(self) -> None:
        team = self.team
        assert team.executor is not None
        pools = await asyncio.wait_for(team.executor.pool_stats.remote(), 10)
        now = time.monotonic()
        for expert in team.config.experts:
            if expert.replicas.max == expert.replicas.min:
                continue  # a fixed size: the supervisor alone keeps it
            load = pools.get(expert.name, {})
            changed = self._settle(expert.name, load, now)
            present = [label for label in team.replicas.get(expert.name, {})
                       if label not in team.draining]
            decision = decide(self.states[expert.name], load.get("queued", 0)
                              + load.get("in_flight", 0), len(present), now, expert.replicas)
            self.last[expert.name] = decision.reason
            if decision.target > len(present):
                self._grow(expert.name, decision.target - len(present), decision.reason)
            elif decision.target < len(present):
                changed |= self._drain(expert.name, load, decision.reason)
            if changed:
                team.publish(expert.name)
        self._export(pools)

    # ------------------------------------------------------------------ changes

    def _settle(self, expert: str, load: dict[str, Any], now: float) -> bool:
        """Promote scale-ups that are ready, give up stuck ones, remove drained ones."""
        team, changed = self.team, False
        lives = team.supervisor.lives if team.supervisor is not None else {}
        for label, created in list(team.pending.items()):
            if label.rsplit("#", 1)[0] != expert:
                continue
            life = lives.get(label)
            if life is not None and life.state.value == "ready":
                del team.pending[label]
                changed = True
            elif now - created > self.config.placement_timeout_s:
                why = missing_resources(team.config.expert(expert))
                team.remove_replica(expert, label)
                placement_failed(self.states[expert], now, self.config.placement_backoff_s)
                self._record(expert, "gave_up", f"{label} not ready within "
                             f"{self.config.placement_timeout_s:g}s: needs {why}")
                changed = True
        for label in load.get("drained", []):
            if label in team.draining:
                team.remove_replica(expert, label)
                self._record(expert, "removed", f"{label} drained")
                changed = True
        return changed

    def _grow(self, expert: str, count: int, reason: str) -> None:
        team = self.team
        taken = set(team.replicas.get(expert, {}))
        config = team.config.expert(expert)
        index = 0
        for _ in range(count):
            while replica_label(expert, index) in taken:
                index += 1
            label = replica_label(expert, index)
            taken.add(label)
            team.create_replica(config, label)
            team.pending[label] = time.monotonic()
            if team.supervisor is not None:
                team.supervisor.watch(label, expert)
            self._record(expert, "up", f"{label}: {reason}")

    def _drain(self, expert: str, load: dict[str, Any], reason: str) -> bool:
        team = self.team
        loads = load.get("replicas", {})
        ready = [label for label in team.replicas.get(expert, {})
                 if label not in team.draining and label not in team.pending]
        if len(ready) <= 1:
            return False
        victim = min(ready, key=lambda label: (loads.get(label, {}).get("in_flight", 0),
                                               -int(label.rsplit("#", 1)[1])))
        team.draining.add(victim)
        self._record(expert, "down", f"{victim} draining: {reason}")
        return True

    def _record(self, expert: str, direction: str, reason: str) -> None:
        log.info("scaling %s: %s %s", expert, direction, reason)
        self.history.append({"at": time.time(), "expert": expert, "direction": direction,
                             "reason": reason})
        metrics().scaling.inc(tags={"expert": expert, "direction": direction})

    # ------------------------------------------------------------------ visibility

    def _export(self, pools: dict[str, Any]) -> None:
        team = self.team
        for expert, labels in team.replicas.items():
            states = {"ready": 0, "starting": 0, "draining": 0}
            for label in labels:
                kind = ("draining" if label in team.draining else
                        "starting" if label in team.pending else "ready")
                states[kind] += 1
            for state, count in states.items():
                metrics().replicas.set(count, tags={"expert": expert, "state": state})
            for label, replica in pools.get(expert, {}).get("replicas", {}).items():
                metrics().replica_in_flight.set(replica["in_flight"],
                                                tags={"expert": expert, "replica": label})

    def describe(self, expert: str) -> dict[str, Any]:
        team, knobs = self.team, self.team.config.expert(expert).replicas
        labels = team.replicas.get(expert, {})
        return {
            "min": knobs.min, "max": knobs.max, "target_per_replica": knobs.target_per_replica,
            "ready": sum(1 for x in labels if x not in team.pending and x not in team.draining),
            "starting": sum(1 for x in labels if x in team.pending),
            "draining": sum(1 for x in labels if x in team.draining),
            "last_decision": self.last.get(expert),
            "history": [h for h in self.history if h["expert"] == expert],
        }
