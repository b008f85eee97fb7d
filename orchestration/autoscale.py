"""How many replicas an expert should have: load in, decision out. No Ray, no clock.

The load is what only the executor knows: the expert's tasks queued plus in flight.
Desired replicas = ceil(load / `target_per_replica`), clamped to [min, max]. A change
is made only after the desire has pointed the same way for `upscale_delay_s` (up) or
`downscale_delay_s` (down), so a burst or a lull does not make it flap; scaling down
is one replica at a time (each drains before it goes). Replicas that are still
starting count as present, so a slow start does not trigger more scale-ups.

    decide(state, load=12, present=1, now=t, knobs)  -> Decision(target=3, reason=...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestration.config import ReplicasConfig


@dataclass
class Decision:
    target: int
    reason: str

    @property
    def direction(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass
class ScaleState:
    """What the policy remembers between decisions, per expert."""

    wanting: str = "hold"  # "up" | "down" | "hold": what the desire pointed to last time
    since: float = 0.0  # when it started pointing there
    blocked_until: float = 0.0  # no scale-up before this (a scale-up could not be placed)


def desired(load: int, knobs: ReplicasConfig) -> int:
    return min(knobs.max, max(knobs.min, math.ceil(load / knobs.target_per_replica)))


def decide(state: ScaleState, load: int, present: int, now: float,
           knobs: ReplicasConfig) -> Decision:
    """The replica count to have now, and why (`hold: ...` when nothing changes)."""
    want = desired(load, knobs)
    if present < knobs.min:  # below the floor (replicas gave up or died): no delay
        state.wanting, state.since = "hold", now
        return Decision(knobs.min, f"up: {present} below min {knobs.min}")
    direction = "up" if want > present else "down" if want < present else "hold"
    if direction != state.wanting:
        state.wanting, state.since = direction, now
    waited = now - state.since
    per = f"load {load} / {knobs.target_per_replica:g} per replica"
    if direction == "up":
        if now < state.blocked_until:
            return Decision(present, f"hold: {per} wants {want}, but a scale-up could not "
                                     f"be placed; next try in {state.blocked_until - now:.0f}s")
        if waited >= knobs.upscale_delay_s:
            state.since = now
            return Decision(want, f"up: {per} wants {want} for {waited:.0f}s")
        return Decision(present, f"hold: {per} wants {want} for {waited:.0f}s "
                                 f"(< upscale delay {knobs.upscale_delay_s:g}s)")
    if direction == "down":
        if waited >= knobs.downscale_delay_s:
            state.since = now
            return Decision(present - 1, f"down: {per} wants {want} for {waited:.0f}s")
        return Decision(present, f"hold: {per} wants {want} for {waited:.0f}s "
                                 f"(< downscale delay {knobs.downscale_delay_s:g}s)")
    return Decision(present, f"hold: {per} wants {want}")


def placement_failed(state: ScaleState, now: float, backoff_s: float) -> None:
    """A scale-up could not be placed: do not ask again for `backoff_s`."""
    state.blocked_until = now + backoff_s
