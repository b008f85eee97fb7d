"""Replica choice and the autoscaling policy, without Ray: tables of histories."""

from __future__ import annotations

import pytest

from orchestration.autoscale import ScaleState, decide, placement_failed
from orchestration.config import ReplicasConfig
from orchestration.replicas import ReplicaPool

# --------------------------------------------------------------------------- the pool


def _pool(n: int, capacity: int = 2) -> ReplicaPool:
    pool = ReplicaPool("general", capacity, cooldown_failures=2, cooldown_s=10)
    pool.update({f"general#{i}": (object(), "ready", f"actor{i}") for i in range(n)}, now=0.0)
    return pool


def test_the_least_loaded_replica_gets_the_task_ties_go_to_the_longest_idle() -> None:
    pool = _pool(3)
    pool.replicas["general#0"].idle_since = 5.0
    pool.replicas["general#1"].idle_since = 1.0  # idle the longest
    pool.replicas["general#2"].idle_since = 3.0
    order = []
    for _ in range(6):
        replica = pool.pick(now=10.0)
        order.append(replica.label)
        pool.started(replica)
    assert order == ["general#1", "general#2", "general#0"] * 2
    assert pool.pick(now=10.0) is None  # every replica at its max_concurrency
    assert pool.capacity(now=10.0) == 6


def test_a_gone_replica_is_skipped_while_a_healthy_one_exists_and_counts_for_nothing() -> None:
    pool = _pool(2)
    gone = pool.replicas["general#0"]
    pool.started(gone)
    pool.finished(gone, now=1.0, outcome="gone")
    assert gone.health(1.0) == "suspect" and pool.capacity(1.0) == 2
    assert {pool.pick(1.0).label for _ in range(3)} == {"general#1"}
    pool.update({"general#0": (gone.handle, "ready", "actor0"),
                 "general#1": (pool.replicas["general#1"].handle, "ready", "actor1")}, 2.0)
    assert gone.health(2.0) == "healthy" and pool.capacity(2.0) == 4


def test_when_no_replica_is_healthy_the_others_are_still_used() -> None:
    pool = _pool(2)
    for replica in pool.replicas.values():
        pool.started(replica)
        pool.finished(replica, now=1.0, outcome="gone")
    assert pool.capacity(1.0) == 4 and pool.pick(1.0) is not None


def test_failures_in_a_row_cool_a_replica_down_for_a_while() -> None:
    pool = _pool(2)
    flaky = pool.replicas["general#0"]
    for outcome in ("failed", "cancelled", "failed"):  # a cancellation is not its fault
        pool.started(flaky)
        pool.finished(flaky, now=1.0, outcome=outcome)
    assert flaky.health(1.0) == "cooling" and pool.capacity(1.0) == 2
    assert flaky.health(11.5) == "healthy" and pool.capacity(11.5) == 4
    pool.started(flaky)
    pool.finished(flaky, now=12.0, outcome="ok")
    assert flaky.failures == 0 and flaky.served == 1


def test_draining_takes_a_replica_out_and_reports_it_once_empty() -> None:
    pool = _pool(2)
    busy = pool.replicas["general#1"]
    pool.started(busy)
    pool.update({"general#0": (pool.replicas["general#0"].handle, "ready", "actor0"),
                 "general#1": (busy.handle, "draining", "actor1")}, now=1.0)
    assert pool.capacity(1.0) == 2 and pool.drained() == []
    assert pool.pick(1.0).label == "general#0"
    pool.finished(busy, now=2.0, outcome="ok")
    assert pool.drained() == ["general#1"]


# --------------------------------------------------------------------------- autoscaling

KNOBS = ReplicasConfig(min=1, max=4, target_per_replica=4, upscale_delay_s=10,
                       downscale_delay_s=30)


def _run(history: list[tuple[float, int]], present: int = 1,
         knobs: ReplicasConfig = KNOBS) -> list[tuple[float, int, str]]:
    """Feed (time, load) samples; the replica count follows each decision at once."""
    state, out = ScaleState(), []
    for now, load in history:
        decision = decide(state, load, present, now, knobs)
        out.append((now, decision.target, decision.direction))
        present = decision.target
    return out


@pytest.mark.parametrize(("history", "present", "expected"), [
    # sustained load of 16 tasks: up to 4 once it lasted the upscale delay
    ([(0, 16), (5, 16), (10, 16)], 1, [(0, 1, "hold"), (5, 1, "hold"), (10, 4, "up")]),
    # a burst shorter than the delay changes nothing (hysteresis)
    ([(0, 16), (5, 16), (6, 0), (12, 16)], 1,
     [(0, 1, "hold"), (5, 1, "hold"), (6, 1, "hold"), (12, 1, "hold")]),
    # clamped to max: 100 tasks still means 4 replicas
    ([(0, 100), (10, 100)], 1, [(0, 1, "hold"), (10, 4, "up")]),
    # idle: down one replica at a time, each after the downscale delay
    ([(0, 0), (30, 0), (45, 0), (60, 0), (90, 0), (120, 0)], 4,
     [(0, 4, "hold"), (30, 3, "down"), (45, 3, "hold"), (60, 2, "down"), (90, 1, "down"),
      (120, 1, "hold")]),
    # clamped to min: never below 1
    ([(0, 0), (100, 0)], 1, [(0, 1, "hold"), (100, 1, "hold")]),
    # load that halves for less than the downscale delay keeps the replicas
    ([(0, 8), (20, 8), (25, 16), (60, 16)], 4,
     [(0, 4, "hold"), (20, 4, "hold"), (25, 4, "hold"), (60, 4, "hold")]),
])
def test_scaling_decisions_over_load_histories(history, present, expected) -> None:
    assert _run(history, present) == expected


def test_below_the_minimum_scales_up_at_once() -> None:
    knobs = ReplicasConfig(min=2, max=4, target_per_replica=4, upscale_delay_s=60)
    decision = decide(ScaleState(), 0, 1, 0.0, knobs)
    assert (decision.target, decision.direction) == (2, "up")


def test_a_scale_up_that_could_not_be_placed_pauses_scale_ups() -> None:
    state = ScaleState()
    assert decide(state, 16, 1, 0.0, KNOBS).target == 1
    placement_failed(state, now=5.0, backoff_s=60)
    held = decide(state, 16, 1, 20.0, KNOBS)
    assert held.target == 1 and "could not be placed" in held.reason
    assert decide(state, 16, 1, 70.0, KNOBS).target == 4


def test_the_reason_says_what_decided() -> None:
    decision = decide(ScaleState(), 12, 1, 0.0,
                      ReplicasConfig(min=1, max=4, target_per_replica=4, upscale_delay_s=0))
    assert decision.reason == "up: load 12 / 4 per replica wants 3 for 0s"


@pytest.mark.parametrize("bad", [{"min": 2, "max": 1}, {"min": 1, "max": 3, "initial": 4},
                                 {"min": 0}])
def test_replica_bounds_are_validated(bad) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ReplicasConfig(**bad)
