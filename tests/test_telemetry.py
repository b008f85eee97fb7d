"""The request window behind `/v1/stats` `requests`: rates, percentiles, fixed size. No Ray."""

from __future__ import annotations

import json

import pytest

from orchestration.telemetry import BOUNDS, RequestWindow


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_percentiles_land_within_one_bucket_of_the_truth() -> None:
    clock = Clock()
    window = RequestWindow(clock=clock)
    latencies = [0.010 * i for i in range(1, 101)]  # 10 ms .. 1 s, uniform
    for latency in latencies:
        window.record(latency, ttft_s=latency / 10)
    stats = window.snapshot()
    for q, truth in ((50, 0.50), (90, 0.90), (99, 0.99)):
        assert truth / 1.15 <= stats["latency_s"][f"p{q}"] <= truth * 1.15
        assert truth / 11.5 <= stats["ttft_s"][f"p{q}"] <= truth / 10 * 1.15
    assert stats["latency_s"]["count"] == 100 and stats["latency_s"]["max"] == 1.0
    assert stats["outcomes"] == {"ok": 100, "failed": 0, "disconnected": 0}


def test_one_value_reports_itself_and_no_value_reports_none() -> None:
    window = RequestWindow(clock=Clock())
    empty = window.snapshot()
    assert empty["latency_s"] == {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    assert empty["rate_per_s"] == 0
    window.record(0.25)
    stats = window.snapshot()
    assert stats["latency_s"]["p50"] == stats["latency_s"]["p99"] == 0.25
    assert stats["ttft_s"]["count"] == 0  # a request without a first token has no TTFT


def test_rate_counts_completed_seconds_only() -> None:
    clock = Clock()
    window = RequestWindow(rate_s=10, clock=clock)
    for _ in range(10):  # 3 requests in each of 10 seconds
        for _ in range(3):
            window.record(0.1)
        clock.now += 1
    window.record(0.1)  # the current, unfinished second
    assert window.snapshot()["rate_per_s"] == 3.0


def test_outcomes_and_series_follow_the_clock() -> None:
    clock = Clock()
    window = RequestWindow(window_s=5, recent_s=5, rate_s=1, clock=clock)
    window.record(0.1, outcome="ok")
    window.record(0.2, outcome="primary_timeout")  # any error code counts as failed
    clock.now += 2
    window.record(0.3, outcome="disconnected")
    stats = window.snapshot()
    assert stats["outcomes"] == {"ok": 1, "failed": 1, "disconnected": 1}
    assert stats["series"]["ended"] == [0, 0, 2, 0, 1]
    assert stats["series"]["failed"] == [0, 0, 1, 0, 0]
    assert stats["series"]["end"] == int(clock.now)


def test_old_seconds_leave_the_window() -> None:
    clock = Clock()
    window = RequestWindow(window_s=10, recent_s=5, rate_s=1, clock=clock)
    window.record(9.0)
    clock.now += 6  # out of the recent 5 s, still in the 10 s series
    stats = window.snapshot()
    assert stats["latency_s"]["count"] == 0 and sum(stats["series"]["ended"]) == 1
    clock.now += 10  # out of the window: its slot is reused for a new second
    window.record(0.5)
    stats = window.snapshot()
    assert sum(stats["series"]["ended"]) == 1 and stats["latency_s"]["max"] == 0.5


def test_size_does_not_grow_with_requests_served() -> None:
    clock = Clock()
    window = RequestWindow(window_s=60, recent_s=60, clock=clock)

    def size_after(requests: int) -> tuple[int, int]:
        for i in range(requests):
            window.record(0.001 * (i % 5000), ttft_s=0.0005 * (i % 300))
            if i % 100 == 0:
                clock.now += 1
        slots = [s for s in window._slots if s is not None]
        cells = sum(len(s.latency.counts) + len(s.ttft.counts) for s in slots)
        return cells, len(json.dumps(window.snapshot()))

    cells, body = size_after(10_000)
    assert cells == 60 * 2 * len(BOUNDS)  # every slot is in use
    later_cells, later_body = size_after(100_000)
    assert later_cells == cells and later_body <= body + 200  # digits of counts, not entries


def test_huge_latency_goes_to_the_last_bucket() -> None:
    window = RequestWindow(clock=Clock())
    window.record(10_000.0)
    assert window.snapshot()["latency_s"]["p99"] == 10_000.0


def test_window_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="rate_s <= recent_s"):
        RequestWindow(window_s=10, recent_s=20)
