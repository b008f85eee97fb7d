"""RouterActor: turns a request into a plan, using the load the executor publishes."""

from __future__ import annotations

import os

import ray

from orchestration.config import ChorusConfig
from orchestration.models import ExecutionPlan, ExecutorLoad, OrchestrateRequest
from orchestration.routing import plan_request


@ray.remote
class RouterActor:
    """Load-aware planner: the policy lives in `orchestration.routing`, not here.

    The executor pushes its load (`set_load`) when it changes, at most every
    `router.load_publish_s`; planning reads that copy, so a plan costs no call of
    its own to the executor.
    """

    def __init__(self, config: ChorusConfig) -> None:
        self.config = config
        self.load = ExecutorLoad()
        self.load_override: ExecutorLoad | None = None

    async def plan(self, request: OrchestrateRequest) -> ExecutionPlan:
        return plan_request(request, self.config, self.load_override or self.load)

    def set_load(self, active: int, queued: int) -> None:
        self.load = ExecutorLoad(active=active, queued=queued)

    def ping(self) -> dict[str, object]:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "load": self.load.model_dump()}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def set_load_override(self, load: ExecutorLoad | None) -> None:
        """Pretend the executor carries `load` (for drills and tests); None to stop."""
        self.load_override = load
