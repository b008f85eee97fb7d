"""What Chorus knows about each actor it keeps alive, and when to re-create one. No Ray.

Ray restarts a crashed actor up to its `max_restarts`; after that the actor is dead
for good. Chorus then re-creates it, after a backoff that grows with each re-creation
that did not stay up (`stable_after_s`), with jitter, so a crash-looping expert is
neither hammered nor able to take the others down. The states, as shown in
`/v1/stats`, `/readyz`, the metrics and `chorus stats`:

    starting    created, not yet answering `ready` (engine loading)
    ready       answering within `ping_timeout_s`
    restarting  Ray is restarting it (it crashed; restarts are left)
    dead        Ray gave up; Chorus re-creates it at `retry_at` ("dead — retrying in 4s")
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tenacity import wait_exponential

from orchestration.config import SupervisionConfig
from orchestration.scheduling import wait_jittered


class Life(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    DEAD = "dead"


def recreate_backoff(config: SupervisionConfig, failures: int) -> float:
    """Seconds before re-creation number `failures` (1, 2, ...): exponential, jittered."""
    policy = wait_jittered(
        wait_exponential(multiplier=config.initial_backoff_s, max=config.max_backoff_s),
        config.jitter)
    # tenacity's waits read only `attempt_number` from their retry state.
    return policy(types.SimpleNamespace(attempt_number=max(1, failures)))


@dataclass
class ActorLife:
    """One supervised actor (an expert replica, the router or the executor)."""

    label: str  # "general#0", "router", "executor"
    role: str  # "expert" | "router" | "executor"
    expert: str | None = None
    state: Life = Life.STARTING
    since: float = 0.0
    retry_at: float | None = None
    last_error: str | None = None
    recreated: int = 0  # times Chorus re-created it
    ray_restarts: int = 0  # Ray's own restarts of the current incarnation
    failures: int = 0  # re-creations that did not stay up for `stable_after_s`
    pid: int | None = None  # process of the current incarnation, as last seen

    def _enter(self, state: Life, now: float) -> None:
        if state is not self.state:
            self.state, self.since = state, now

    def ready(self, now: float, config: SupervisionConfig) -> None:
        self._enter(Life.READY, now)
        self.retry_at = None
        if self.failures and now - self.since >= config.stable_after_s:
            self.failures = 0  # it stayed up: the next failure starts the backoff over

    def starting(self, now: float) -> None:
        self._enter(Life.STARTING, now)

    def restarting(self, now: float, reason: str) -> None:
        self._enter(Life.RESTARTING, now)
        self.last_error = reason

    def dead(self, now: float, reason: str, config: SupervisionConfig) -> float:
        """Ray gave up on it; returns the delay before Chorus re-creates it."""
        if self.state is not Life.DEAD:
            self.failures += 1
            self.retry_at = now + recreate_backoff(config, self.failures)
        self._enter(Life.DEAD, now)
        self.last_error = reason
        return max(0.0, (self.retry_at or now) - now)

    def recreated_now(self, now: float) -> None:
        self.recreated += 1
        self.ray_restarts = 0
        self.pid = None
        self.retry_at = None
        self._enter(Life.STARTING, now)

    def describe(self, now: float) -> str:
        if self.state is Life.DEAD and self.retry_at is not None:
            return f"dead — retrying in {max(0.0, self.retry_at - now):.0f}s"
        return self.state.value

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state.value, "status": self.describe(now),
            "for_s": round(now - self.since, 1), "recreated": self.recreated,
            "ray_restarts": self.ray_restarts, "last_error": self.last_error,
        }
