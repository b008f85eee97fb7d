"""RouterActor: turns a request into a plan, using the load the executor publishes.

The executor pushes its load (`set_load`) when it changes, at most every
`router.load_publish_s`; planning reads that copy, so a plan costs no call of its own
to the executor.

For `semantic` and `hybrid` routing it holds the embedding model: loaded (and the
experts' routes embedded, or read from the node's cache: `actors/route_cache.py`) once
when the actor starts, or restarts; each prompt is embedded per request, concurrent
prompts in one batch.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import Any

import numpy as np
import ray

from actors.embedder import BatchingEncoder, Embedder
from actors.route_cache import VectorCache, default_folder, identity
from orchestration.config import ChorusConfig
from orchestration.errors import RouterModelError
from orchestration.models import ExecutionPlan, ExecutorLoad, OrchestrateRequest
from orchestration.routing import plan_request
from orchestration.semantic import RouteIndex

LATENCY_WINDOW = 1000  # plans whose routing latency `stats()` summarises


@ray.remote
class RouterActor:
    """Load-aware planner: the policy lives in `orchestration.routing`, not here."""

    def __init__(self, config: ChorusConfig) -> None:
        self.config = config
        self.load = ExecutorLoad()
        self.load_override: ExecutorLoad | None = None
        self.encoder: BatchingEncoder | None = None
        self.routes: RouteIndex | None = None
        self.load_error: RouterModelError | None = None
        self.load_s = 0.0
        self.plans = 0
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.model: Embedder | None = None
        self._load(config)

    def _load(self, config: ChorusConfig) -> None:
        """The embedding model (when the method needs one, and it changed) and the index
        of every expert's routes."""
        self.config = config
        self.load_error = None
        if config.router.method == "keywords":
            self.model = self.encoder = self.routes = None
            return
        started = time.perf_counter()
        if self.model is None or self.model.name != config.router.model:
            try:
                self.model = Embedder(config.router.model)
            except RouterModelError as exc:  # kept, and raised by ready()/plan(): see ready()
                self.load_error = exc
                return
            self.encoder = BatchingEncoder(self.model.encode)
        # Routes embedded before (a restart, a redeploy) come from the node's disk.
        cache = VectorCache(self.model.encode, identity(self.model.name, self.model.path),
                            default_folder())
        self.routes = RouteIndex.build(config, cache.encode)
        self.load_s = time.perf_counter() - started

    async def reconfigure(self, config: ChorusConfig) -> dict[str, Any]:
        """A redeploy's team, in place: experts, routes, thresholds; the model is loaded
        again only if it changed. Raises (as `ready` does) if the new model cannot load."""
        await asyncio.to_thread(self._load, config)
        return self.ready()

    def ready(self) -> dict[str, Any]:
        """Raise the model's load error as itself, so startup can name the model.

        (Raised from __init__, it would reach the caller as Ray's ActorDiedError with a
        traceback in its text, and Ray would not say which model.)
        """
        if self.load_error is not None:
            raise self.load_error
        return self.stats()

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    async def plan(self, request: OrchestrateRequest) -> ExecutionPlan:
        if self.load_error is not None:
            raise self.load_error
        load = self.load_override or self.load
        started = time.perf_counter()
        similarity = None
        if self.encoder is not None and self.routes is not None:
            similarity = self.routes.similarity(await self.encoder.embed(request.prompt))
        plan = plan_request(request, self.config, load, similarity)
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.plans += 1
        return plan

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    def set_load(self, active: int, queued: int) -> None:
        self.load = ExecutorLoad(active=active, queued=queued)

    async def vigil(self) -> None:
        """Never returns: the supervisor learns of this process's death when it fails."""
        await asyncio.Event().wait()

    def ping(self) -> dict[str, Any]:
        return {"node_id": self.node_id(), "pid": os.getpid(), "load": self.load.model_dump()}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict[str, Any]:
        """Method, model, and the routing latency per plan (embedding + policy, ms)."""
        latencies = np.array(self.latencies_ms)
        encoder = self.encoder
        return {
            "node_id": self.node_id(),
            "pid": os.getpid(),
            "method": self.config.router.method,
            "model": self.config.router.model if encoder is not None else None,
            "routes": self.routes.size if self.routes is not None else 0,
            "model_load_s": round(self.load_s, 3),
            "plans": self.plans,
            "latency_ms_p50": round(float(np.percentile(latencies, 50)), 3) if len(latencies) else None,
            "latency_ms_p99": round(float(np.percentile(latencies, 99)), 3) if len(latencies) else None,
            "batches": encoder.batches if encoder is not None else 0,
            "largest_batch": encoder.largest_batch if encoder is not None else 0,
        }

    def set_load_override(self, load: ExecutorLoad | None) -> None:
        """Pretend the executor carries `load` (for drills and tests); None to stop."""
        self.load_override = load
