"""An expert's replicas as the executor dispatches to them. No Ray: handles are opaque.

`ReplicaPool.pick` sends each granted task to the healthy replica with the fewest
tasks in flight (ties: the one idle the longest). Health, as the executor sees it:

    healthy     dispatched to first
    suspect     its last call failed because its process was gone: skipped while a
                healthy replica exists (its tasks' retries go elsewhere), used again on
                its next success or when the supervisor reports it ready again
    cooling     `cooldown_failures` failures in a row: out of dispatch for `cooldown_s`
                (like LiteLLM's cooldowns), reported in stats
    draining    being scaled down: no new task; removed once its tasks finished

The replicas dispatched to are the healthy ones; only when none is healthy, every
replica that is not draining (a task then waits for a restart only when there is
nothing else, and never forever: the call fails fast, and the runner's retries and
fallback decide). The pool's `capacity`, the executor's per-expert bound, is the sum of
`max_concurrency` over those replicas, so `max_concurrency` holds per replica.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any


def replica_label(expert: str, index: int) -> str:
    """How replicas are named in stats, logs and metrics: `general#0`, `general#1`."""
    return f"{expert}#{index}"


def replica_index(label: str) -> int:
    """The index of a replica label: `general#1` -> 1."""
    return int(label.rpartition("#")[2] or 0)


@dataclass
class Replica:
    label: str  # "general#1"
    handle: Any
    capacity: int  # the expert's max_concurrency: per replica
    name: str = ""  # the actor's name (callers find its handle by it)
    in_flight: int = 0
    idle_since: float = 0.0
    served: int = 0
    failures: int = 0  # in a row
    suspect: bool = False
    cooling_until: float = 0.0
    draining: bool = False

    def health(self, now: float) -> str:
        if self.draining:
            return "draining"
        if self.cooling_until > now:
            return "cooling"
        return "suspect" if self.suspect else "healthy"


@dataclass
class ReplicaPool:
    """One expert's replicas and the rules for choosing among them."""

    expert: str
    capacity_each: int
    cooldown_failures: int = 3
    cooldown_s: float = 30.0
    replicas: dict[str, Replica] = field(default_factory=dict)

    def dispatchable(self, now: float) -> list[Replica]:
        serving = [r for r in self.replicas.values() if not r.draining]
        healthy = [r for r in serving if r.health(now) == "healthy"]
        return healthy or serving

    def capacity(self, now: float) -> int:
        return sum(r.capacity for r in self.dispatchable(now))

    def pick(self, now: float, avoid: Collection[str] = ()) -> Replica | None:
        """The least-loaded dispatchable replica with room (ties: idle the longest), not
        one of `avoid` (labels)."""
        room = [r for r in self.dispatchable(now)
                if r.in_flight < r.capacity and r.label not in avoid]
        return min(room, key=lambda r: (r.in_flight, r.idle_since), default=None)

    def update(self, members: dict[str, tuple[Any, str, str]], now: float) -> None:
        """The supervisor's view: label -> (handle, "ready" | "down" | "draining", actor
        name). Keeps counters."""
        for label in [label for label in self.replicas if label not in members]:
            del self.replicas[label]
        for label, (handle, state, name) in members.items():
            replica = self.replicas.get(label)
            if replica is None:
                replica = self.replicas[label] = Replica(label, handle, self.capacity_each,
                                                         name, idle_since=now)
            elif replica.name != name:
                replica.handle, replica.name = handle, name  # re-created: a fresh process
                replica.suspect, replica.failures, replica.cooling_until = False, 0, 0.0
            replica.draining = state == "draining"
            if state == "ready":
                replica.suspect = False  # it answered the supervisor since it failed
            elif state == "down":
                replica.suspect = True  # restarting or being re-created

    def started(self, replica: Replica) -> None:
        replica.in_flight += 1

    def finished(self, replica: Replica, now: float, outcome: str) -> None:
        """An attempt on `replica` ended: "ok", "failed", "gone" (its process was dead
        or restarting) or "cancelled" (the request's doing, not the replica's)."""
        replica.in_flight -= 1
        if not replica.in_flight:
            replica.idle_since = now
        if outcome == "cancelled":
            return
        if outcome == "ok":
            replica.served += 1
            replica.failures, replica.suspect = 0, False
            return
        replica.failures += 1
        replica.suspect = replica.suspect or outcome == "gone"
        if replica.failures >= self.cooldown_failures:
            replica.cooling_until = now + self.cooldown_s
            replica.failures = 0

    def drained(self) -> list[str]:
        """Draining replicas with nothing left in flight: ready to be removed."""
        return [r.label for r in self.replicas.values() if r.draining and not r.in_flight]

    def stats(self, now: float) -> dict[str, Any]:
        return {r.label: {"health": r.health(now), "in_flight": r.in_flight,
                          "served": r.served, "failures_in_a_row": r.failures}
                for r in self.replicas.values()}
