"""Request telemetry for the operations view: requests/s and TTFT/latency percentiles.

A fixed-size window, fed by the ingress as requests end: one slot per second over the
last `window_s` seconds, each slot counting outcomes and holding two histograms with
fixed, log-spaced buckets. Memory and snapshot cost depend on the window, never on the
number of requests served. Percentiles are estimates within one bucket (about 15%).
Plain Python, no Ray; one instance per team, in its controller, fed by every ingress
replica's reports (`actors/team.py`).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from typing import Any

# Bucket upper bounds, 1 ms to about 17 minutes, each 15% above the previous one.
_GROWTH = 1.15
BOUNDS: tuple[float, ...] = tuple(0.001 * _GROWTH**i for i in range(int(math.log(1e6, _GROWTH)) + 1))
QUANTILES = (0.5, 0.9, 0.99)
OUTCOMES = ("ok", "failed", "disconnected")


def _bucket(seconds: float) -> int:
    """Index of the first bound >= seconds; the last bucket also takes anything larger."""
    return min(bisect.bisect_left(BOUNDS, seconds), len(BOUNDS) - 1)


class _Histogram:
    __slots__ = ("counts", "min", "max")

    def __init__(self) -> None:
        self.counts = [0] * len(BOUNDS)
        self.min, self.max = math.inf, 0.0

    def add(self, seconds: float) -> None:
        self.counts[_bucket(seconds)] += 1
        self.min, self.max = min(self.min, seconds), max(self.max, seconds)

    def merge(self, other: _Histogram) -> None:
        for i, n in enumerate(other.counts):
            if n:
                self.counts[i] += n
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """Interpolated inside the bucket holding the q-th observation, within [min, max]."""
        total = sum(self.counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = BOUNDS[i - 1] if i else 0.0
                high = BOUNDS[i] if i < len(BOUNDS) - 1 else max(BOUNDS[i], self.max)
                estimate = low + (high - low) * (rank - seen) / n
                return min(max(estimate, self.min), self.max)
            seen += n
        return self.max

    def summary(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {"count": sum(self.counts)}
        for q in QUANTILES:
            value = self.quantile(q)
            out[f"p{round(q * 100)}"] = None if value is None else round(value, 4)
        out["max"] = round(self.max, 4) if out["count"] else None
        return out


class _Second:
    """Everything that ended during one wall-clock second."""

    __slots__ = ("second", "outcomes", "ttft", "latency")

    def __init__(self, second: int) -> None:
        self.second = second
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.ttft = _Histogram()
        self.latency = _Histogram()


class RequestWindow:
    """Requests that ended in the last `window_s` seconds, one slot per second."""

    def __init__(self, window_s: int = 300, recent_s: int = 60, rate_s: int = 10,
                 clock: Callable[[], float] = time.time) -> None:
        if not 0 < rate_s <= recent_s <= window_s:
            raise ValueError("need 0 < rate_s <= recent_s <= window_s")
        self.window_s, self.recent_s, self.rate_s = window_s, recent_s, rate_s
        self._clock = clock
        self._slots: list[_Second | None] = [None] * window_s

    def _slot(self, second: int) -> _Second:
        index = second % self.window_s
        slot = self._slots[index]
        if slot is None or slot.second != second:  # a second that left the window
            slot = self._slots[index] = _Second(second)
        return slot

    def record(self, latency_s: float, ttft_s: float | None = None,
               outcome: str = "ok", at: float | None = None) -> None:
        """One request ended (at wall-clock `at`, default now): `outcome` is ok,
        disconnected, or anything else (failed). One that ended before the window is
        dropped."""
        second = int(self._clock() if at is None else at)
        if second <= int(self._clock()) - self.window_s:
            return
        slot = self._slot(second)
        slot.outcomes[outcome if outcome in slot.outcomes else "failed"] += 1
        slot.latency.add(latency_s)
        if ttft_s is not None:
            slot.ttft.add(ttft_s)

    def _last(self, seconds: int, now: int) -> list[_Second | None]:
        """Slots of the last `seconds` seconds, oldest first (None for an empty second)."""
        slots = []
        for second in range(now - seconds + 1, now + 1):
            slot = self._slots[second % self.window_s]
            slots.append(slot if slot is not None and slot.second == second else None)
        return slots

    def snapshot(self) -> dict[str, Any]:
        """What `/v1/stats` shows under `requests`: its shape is fixed (numbers, and lists
        of `window_s` integers), only digits change as requests are served."""
        now = int(self._clock())
        window = self._last(self.window_s, now)
        recent = [s for s in window[-self.recent_s:] if s is not None]
        ttft, latency = _Histogram(), _Histogram()
        outcomes = dict.fromkeys(OUTCOMES, 0)
        for slot in recent:
            ttft.merge(slot.ttft)
            latency.merge(slot.latency)
            for key, n in slot.outcomes.items():
                outcomes[key] += n
        # Completed seconds only: the current one is still filling up.
        rated = window[-self.rate_s - 1:-1]
        done = sum(sum(s.outcomes.values()) for s in rated if s is not None)
        return {
            "window_s": self.window_s,
            "recent_s": self.recent_s,
            "rate_per_s": round(done / self.rate_s, 3),
            "outcomes": outcomes,
            "ttft_s": ttft.summary(),
            "latency_s": latency.summary(),
            "series": {
                "end": now,
                "step_s": 1,
                "ended": [sum(s.outcomes.values()) if s else 0 for s in window],
                "failed": [s.outcomes["failed"] if s else 0 for s in window],
            },
        }
