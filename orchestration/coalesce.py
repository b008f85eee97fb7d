"""Adaptive coalescing: an attempt's text written piece by piece, read in batches.

The engine loop `put`s each delta as it comes; a reader takes *everything written
since its last batch* as one batch, the way vLLM's output collector merges outputs
when the producer gets ahead of the consumer. The first batch leaves as soon as there
is text (TTFT does not grow); later batches leave when the consumer asks again (a
slow consumer, e.g. under Ray's generator backpressure, gets bigger batches instead of
a longer queue), but never sooner than `hold_s` after the previous one, which bounds
the objects per second a stream costs while keeping text from waiting more than
`hold_s`. Text is never reordered, duplicated or lost: a reader's batches concatenate
to the channel's text from its offset on.

`Channels` keeps the channels of one expert process, keyed by attempt, so that a
reader may arrive before or after the attempt starts (or shortly after it ended).
No Ray here.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator


class TextChannel:
    """The text of one attempt: appended by one writer, read by any number of readers."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._tokens: list[int] = []
        self._ends: list[int] = []  # cumulative character offset after each part
        self.closed = False
        self.writer_attached = False
        self._changed = asyncio.Event()

    @property
    def size(self) -> int:
        return self._ends[-1] if self._ends else 0

    def put(self, text: str, tokens: int = 1) -> None:
        if self.closed:
            raise RuntimeError("write to a closed channel")
        if not text and not tokens:
            return
        self._parts.append(text)
        self._tokens.append(tokens)
        self._ends.append(self.size + len(text))
        self._notify()

    def close(self) -> None:
        """End of the attempt (whole or not: the executor's result says which); readers
        drain, then stop."""
        if not self.closed:
            self.closed = True
            self._notify()

    def _notify(self) -> None:
        # Wake every reader waiting on the current event, then arm a fresh one: each
        # reader awaits the event it saw, so none can miss a write.
        self._changed.set()
        self._changed = asyncio.Event()

    def _take(self, pos: int) -> tuple[str, int, int]:
        """Text from character `pos` to the end, its token count, and the new position."""
        first = bisect.bisect_right(self._ends, pos)
        start = self._ends[first - 1] if first else 0
        text = "".join(self._parts[first:])[pos - start:]
        tokens = sum(self._tokens[first:]) if pos == start else sum(self._tokens[first + 1:])
        return text, tokens, self.size

    async def batches(self, offset: int = 0, hold_s: float = 0.0) -> AsyncIterator[tuple[str, int]]:
        """Yield (text, tokens) batches from character `offset` until the channel closes."""
        loop = asyncio.get_running_loop()
        pos, next_flush = offset, 0.0
        while True:
            if self.size > pos:
                wait = next_flush - loop.time()
                if wait > 0 and not self.closed:
                    await asyncio.sleep(wait)  # the hold: bounded by `hold_s`
                text, tokens, pos = self._take(pos)
                if text or tokens:
                    yield text, tokens
                next_flush = loop.time() + hold_s
                continue
            if self.closed:
                return
            await self._changed.wait()


class Channels:
    """The channels of one expert process, by attempt key, with bounded lifetimes.

    A writer (`open`) or a reader (`read`) may come first. A channel lingers
    `linger_s` after it closes so a late reader still gets the text; a channel that
    a reader opened and no writer claims within `orphan_s` is closed (the attempt was
    cancelled before it reached this process), so no reader waits forever.
    """

    def __init__(self, linger_s: float = 10.0, orphan_s: float = 60.0) -> None:
        self.linger_s = linger_s
        self.orphan_s = orphan_s
        self._channels: dict[str, TextChannel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def _get(self, key: str) -> TextChannel:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = TextChannel()
        return channel

    def open(self, key: str) -> TextChannel:
        """The writer's channel for an attempt (created, or the one a reader opened)."""
        channel = self._get(key)
        channel.writer_attached = True
        return channel

    def finish(self, key: str) -> None:
        """Close the attempt's channel and forget it after the linger time."""
        channel = self._channels.get(key)
        if channel is None:
            return
        channel.close()
        asyncio.get_running_loop().call_later(self.linger_s, self._drop, key, channel)

    def read(self, key: str, offset: int = 0, hold_s: float = 0.0) -> AsyncIterator[tuple[str, int]]:
        channel = self._get(key)
        if not channel.writer_attached:
            asyncio.get_running_loop().call_later(self.orphan_s, self._orphaned, key, channel)
        return channel.batches(offset, hold_s)

    def _orphaned(self, key: str, channel: TextChannel) -> None:
        if not channel.writer_attached:
            channel.close()  # no attempt wrote to it
            self._drop(key, channel)

    def _drop(self, key: str, channel: TextChannel) -> None:
        if self._channels.get(key) is channel:
            del self._channels[key]
