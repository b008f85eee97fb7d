"""A background loop in the caller's process: `step()` every `interval_s` until stopped."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("ray.serve")


class Periodic:
    """Base of the supervisor and the scaler: one asyncio task, one round per interval."""

    interval_s: float = 1.0
    _task: asyncio.Task[None] | None = None

    async def step(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # one bad round (an actor restarting) must not end the loop
                log.exception("%s round failed; trying again next round", type(self).__name__)
            await asyncio.sleep(self.interval_s)
