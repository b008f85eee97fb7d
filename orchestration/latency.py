"""Each expert's recent latency, as the executor sees its attempts. No Ray, no clock.

The last `size` successful attempts of each expert: how long each took from dispatch
to its whole answer, and to its first token. The latency budget asks the median
(`p50`) whether a retry or a fallback can still finish in time; hedging asks the
p95 TTFT when it waits `auto` (docs/budget.md). Memory is `size` numbers per expert,
whatever the number of requests served.
"""

from __future__ import annotations

import math
from collections import deque


class RecentLatency:
    """Per expert, the last `size` attempts' latency and TTFT (seconds)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._latency: dict[str, deque[float]] = {}
        self._ttft: dict[str, deque[float]] = {}

    def add(self, expert: str, latency_s: float, ttft_s: float | None) -> None:
        """One successful attempt of `expert`."""
        self._latency.setdefault(expert, deque(maxlen=self.size)).append(latency_s)
        if ttft_s is not None:
            self._ttft.setdefault(expert, deque(maxlen=self.size)).append(ttft_s)

    def latency(self, expert: str, q: float = 0.5) -> float | None:
        """The q-quantile of the expert's recent attempt latency (None: none yet)."""
        return _quantile(self._latency.get(expert), q)

    def ttft(self, expert: str, q: float = 0.95) -> float | None:
        """The q-quantile of the expert's recent TTFT (None: none yet)."""
        return _quantile(self._ttft.get(expert), q)

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        return {expert: {"attempts": len(values), "latency_p50_s": _round(self.latency(expert)),
                         "ttft_p95_s": _round(self.ttft(expert))}
                for expert, values in self._latency.items()}


def _quantile(values: deque[float] | None, q: float) -> float | None:
    """The nearest-rank quantile: an observed value, never an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
