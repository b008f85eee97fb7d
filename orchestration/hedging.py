"""Hedging a slow first token: when to hedge, and which attempt wins. No Ray, no I/O.

An attempt whose first token has not come after `HedgePolicy.after_s` is *held* (its
replica will ask before it sends any text), then a copy — the hedge — goes to another
replica, held from its start. Each asks `Race.claim(key)` at its first token: the
first to ask wins and streams; the other is cancelled (docs/hedging.md). So two
attempts of one task never both reach the caller, and only the winner's tokens count.

`HedgePolicy` bounds it: hedging is on, the wait is known (`after_s`, or the expert's
recent p95 TTFT when `auto`), the expert is not exempt (`hedge: false`), and at most `max_fraction` of the expert's last
`window` attempts are hedges. Room (another ready replica with a free slot, nobody
queued for the expert) is the dispatcher's to say.
"""

from __future__ import annotations

import asyncio
from collections import deque

from orchestration.config import HedgeConfig
from orchestration.latency import RecentLatency


class HedgePolicy:
    """When an expert's attempt may be hedged; memory is `window` flags per expert."""

    def __init__(self, config: HedgeConfig, latency: RecentLatency,
                 exempt: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.latency = latency
        self.exempt = exempt  # experts never hedged (`hedge: false`)
        self._recent: dict[str, deque[bool]] = {}  # expert -> was each recent attempt a hedge

    def after_s(self, expert: str) -> float | None:
        """How long an attempt of `expert` waits for its first token before it is
        hedged; None: it is not (hedging is off, or `auto` has no TTFT to go by yet)."""
        if not self.config.enabled or expert in self.exempt:
            return None
        if self.config.after_s == "auto":
            return self.latency.ttft(expert, 0.95)
        return self.config.after_s

    def attempted(self, expert: str, hedge: bool) -> None:
        """One attempt of `expert` was dispatched (a hedge or not)."""
        window = self._recent.get(expert)
        if window is None or window.maxlen != self.config.window:
            window = self._recent[expert] = deque(window or (), maxlen=self.config.window)
        window.append(hedge)

    def allows(self, expert: str) -> bool:
        """Whether one more hedge keeps the expert's recent hedges within `max_fraction`
        of its recent attempts (the hedge counted among them)."""
        window = self._recent.get(expert, ())
        hedges = sum(window) + 1
        return hedges <= self.config.max_fraction * (len(window) + 1) + 1e-9

    def fraction(self, expert: str) -> float:
        """The share of the expert's recent attempts that were hedges."""
        window = self._recent.get(expert)
        return sum(window) / len(window) if window else 0.0


class Race:
    """A held attempt and its hedge: the first to claim its first token wins."""

    def __init__(self, first: str) -> None:
        self.first = first  # the attempt that was held (its key)
        self.second: str | None = None  # the hedge's key, once dispatched
        self.winner: str | None = None
        self.decided: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def claim(self, key: str) -> bool:
        """Attempt `key` has its first token: may it send it? Only the first to ask
        (or the only one left) wins; the answer never changes."""
        if self.winner is None:
            self.decide(key)
        return self.winner == key

    def decide(self, key: str) -> None:
        if self.winner is None:
            self.winner = key
            self.decided.set_result(key)
