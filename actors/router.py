"""RouterActor: turns a request into a plan, reading the executor's load first."""

from __future__ import annotations

import ray
from ray.actor import ActorHandle

from orchestration.config import ChorusConfig
from orchestration.models import ExecutionPlan, ExecutorLoad, OrchestrateRequest
from orchestration.routing import plan_request


@ray.remote
class RouterActor:
    """Load-aware planner: the policy lives in `orchestration.routing`, not here."""

    def __init__(self, config: ChorusConfig, executor: ActorHandle) -> None:
        self.config = config
        self.executor = executor
        self.load_override: ExecutorLoad | None = None

    async def plan(self, request: OrchestrateRequest) -> ExecutionPlan:
        load = self.load_override or await self.executor.load.remote()
        return plan_request(request, self.config, load)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def set_load_override(self, load: ExecutorLoad | None) -> None:
        """Pretend the executor carries `load` (for drills and tests); None to stop."""
        self.load_override = load
