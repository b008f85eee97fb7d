"""Adaptive coalescing: attempts' text written piece by piece, sent in shared batches.

The engine loop `put`s each delta into its attempt's `TextChannel` as it comes. A
caller process reads the text of *all* its attempts on one expert replica through one
`TextSession`: each batch carries, for every channel of that caller with new text,
everything written since the previous batch, the way vLLM's output collector merges
outputs when the producer gets ahead of the consumer. So what a batch costs (one Ray
object) is shared by every request that caller has on that replica.

- A channel's first text leaves at once (TTFT does not grow), with whatever else is
  pending.
- After that a session sends at most one batch per `hold_s`, so text waits at most
  `hold_s`; a slow consumer (Ray's generator backpressure) gets bigger batches instead
  of a longer queue.
- Text is never reordered, duplicated or lost: the pieces a session sends for a channel
  concatenate to the channel's text.

`Channels` keeps one expert process's channels by attempt key. A channel written before
its caller opened a session waits for it `linger_s` after it closed. No Ray here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TextChannel:
    """The text of one attempt: appended by one writer, sent by its caller's session."""

    __slots__ = ("key", "caller", "parts", "tokens", "sent", "closed", "started")

    def __init__(self, key: str, caller: str) -> None:
        self.key = key
        self.caller = caller
        self.parts: list[str] = []  # written, not yet sent
        self.tokens = 0  # tokens in `parts`
        self.sent = 0  # characters sent so far
        self.closed = False
        self.started = False  # has any text been sent (the first leaves at once)

    def take(self) -> tuple[str, int]:
        text, tokens = "".join(self.parts), self.tokens
        self.parts, self.tokens = [], 0
        self.sent += len(text)
        self.started = True
        return text, tokens


class TextSession:
    """One caller's view of this process's channels: which have text to send."""

    def __init__(self) -> None:
        self.dirty: dict[str, TextChannel] = {}  # channels with unsent text, in write order
        self.urgent = False  # a channel's first text is waiting: send without the hold
        self.changed = asyncio.Event()
        self.closed = False

    def touched(self, channel: TextChannel) -> None:
        self.dirty[channel.key] = channel
        if not channel.started:
            self.urgent = True
        self.changed.set()

    async def batches(self, hold_s: float) -> AsyncIterator[list[tuple[str, str, int]]]:
        """Yield [(key, text, tokens), ...] batches until the session is closed."""
        loop = asyncio.get_running_loop()
        next_flush = 0.0
        while not self.closed:
            if not self.dirty:
                self.changed.clear()
                await self.changed.wait()
                continue
            wait = next_flush - loop.time()
            if wait > 0 and not self.urgent:  # the hold, cut short by a first text
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent(), wait)
            batch = []
            for channel in self.dirty.values():
                text, tokens = channel.take()
                if text or tokens:
                    batch.append((channel.key, text, tokens))
            self.dirty.clear()
            self.urgent = False
            next_flush = loop.time() + hold_s
            if batch:
                yield batch

    async def _urgent(self) -> None:
        while not self.urgent and not self.closed:
            await self.changed.wait()
            self.changed.clear()


class Channels:
    """The channels of one expert process, by attempt key, and their callers' sessions.

    A channel whose caller has an open session is forgotten once it closed and its
    text was handed to the session; one written before its caller's session opened
    lingers `linger_s` after it closed, so the session still gets it.
    """

    def __init__(self, linger_s: float = 10.0) -> None:
        self.linger_s = linger_s
        self._channels: dict[str, TextChannel] = {}
        self._sessions: dict[str, TextSession] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def open(self, key: str, caller: str) -> TextChannel:
        """The writer's channel for an attempt whose text `caller` reads."""
        channel = self._channels[key] = TextChannel(key, caller)
        return channel

    def put(self, channel: TextChannel, text: str, tokens: int = 1) -> None:
        if channel.closed:
            raise RuntimeError("write to a closed channel")
        if not text and not tokens:
            return
        channel.parts.append(text)
        channel.tokens += tokens
        session = self._sessions.get(channel.caller)
        if session is not None:
            session.touched(channel)

    def finish(self, channel: TextChannel) -> None:
        """The attempt ended (whole or not: the executor's result says which)."""
        channel.closed = True
        if channel.caller in self._sessions:
            self._forget(channel)  # its text is in (or already through) the session
        else:
            asyncio.get_running_loop().call_later(self.linger_s, self._forget, channel)

    def _forget(self, channel: TextChannel) -> None:
        if self._channels.get(channel.key) is channel:
            del self._channels[channel.key]

    async def session(self, caller: str, hold_s: float) -> AsyncIterator[list[tuple[str, str, int]]]:
        """Every channel of `caller`, from its start, until the caller stops reading."""
        session = self._sessions[caller] = TextSession()
        for channel in list(self._channels.values()):  # written before the session opened
            if channel.caller == caller:
                if channel.parts or channel.tokens:
                    session.touched(channel)
                if channel.closed:
                    self._forget(channel)
        try:
            async for batch in session.batches(hold_s):
                yield batch
        finally:
            session.closed = True
            if self._sessions.get(caller) is session:
                del self._sessions[caller]
