"""ExpertActor: one expert = one async Ray actor running one engine (mock or vLLM)."""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.engines import Engine, GenerationRequest, make_engine
from orchestration.config import ExpertConfig
from orchestration.models import ExpertTask


def _request(task: ExpertTask) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"{task.id}:{task.attempt}",
        sampling_key=task.id,
        prompt=task.prompt,
        system_prompt=task.system_prompt,
        max_tokens=task.max_tokens,
        temperature=task.temperature,
        seed=task.seed,
        priority=task.effective_priority,
    )


@ray.remote
class ExpertActor:
    """Serves one expert's tasks through its engine; knows engines only by protocol."""

    def __init__(self, config: ExpertConfig) -> None:
        self.config = config
        self.engine: Engine = make_engine(config)
        self._started: asyncio.Task[None] | None = None
        self.pid = os.getpid()
        self.node_id = ray.get_runtime_context().get_node_id()
        # Ray re-runs __init__ after a crash; this tells the restart apart from a start.
        with warnings.catch_warnings():  # Ray's property warns about an API it uses itself
            warnings.simplefilter("ignore", DeprecationWarning)
            self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed

    async def _ensure_started(self) -> None:
        # Started lazily (and once) so that a restarted actor warms its engine up again
        # on its first call without anyone having to remember to call `ready()`.
        if self._started is None:
            self._started = asyncio.ensure_future(self.engine.start())
        await asyncio.shield(self._started)

    async def ready(self) -> dict[str, Any]:
        await self._ensure_started()
        return {"expert": self.config.name, "node_id": self.node_id, "pid": self.pid}

    async def stream(self, task: ExpertTask) -> AsyncIterator[str]:
        """Yield text deltas as the engine produces them (a Ray streaming generator)."""
        await self._ensure_started()
        async for delta in self.engine.stream(_request(task)):
            yield delta

    async def generate(self, task: ExpertTask) -> str:
        """The whole answer in one object: one ObjectRef instead of one per token."""
        await self._ensure_started()
        return "".join([delta async for delta in self.engine.stream(_request(task))])

    async def stats(self) -> dict[str, Any]:
        engine_stats = await self.engine.stats()
        return {
            "expert": self.config.name,
            "backend": self.config.backend,
            "pid": self.pid,
            "node_id": self.node_id,
            "reconstructed": self.reconstructed,
            **engine_stats,
        }

    async def shutdown(self) -> None:
        await self.engine.shutdown()
