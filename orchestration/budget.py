"""A request's latency budget and quorum, as its plan carries them (docs/budget.md). No Ray.

The caller times a request from its arrival (`Call.arrived`); the executor, in another
process, from the plan's admission. So the caller turns the request's budget into
seconds left at submission (`ExecutionPlan.budget_s`), and when to cut the specialists
still running (`cut_s`: earlier by the synthesis's share when the team synthesizes), and
the executor counts them from its own admission. `quorum` is how many specialists must
have answered before the rest are cut (None: all).
"""

from __future__ import annotations

from orchestration.config import ChorusConfig
from orchestration.models import ExecutionPlan, OrchestrateRequest

_LEAST_S = 0.001  # a budget already spent still cuts at once rather than never


def request_budget(request: OrchestrateRequest | None, config: ChorusConfig) -> float | None:
    """The request's budget (seconds from its arrival), else the team's, else None."""
    asked = request.budget_s if request is not None else None
    return asked if asked is not None else config.executor.budget_s


def planned(plan: ExecutionPlan, request: OrchestrateRequest | None, config: ChorusConfig,
            elapsed_s: float) -> ExecutionPlan:
    """`plan` with its budget (seconds left, `elapsed_s` after the request arrived) and
    its quorum."""
    fusion = config.fusion
    quorum = request.min_experts if request is not None else None
    if quorum is None and fusion.quorum == "first":
        quorum = fusion.min_experts
    update: dict[str, float | int | None] = {"quorum": quorum if plan.experts else None}
    budget = request_budget(request, config)
    if budget is not None:
        synthesizes = fusion.strategy == "synthesize" and bool(plan.experts)
        share = fusion.budget_share if synthesizes else 0.0
        update["budget_s"] = max(budget - elapsed_s, _LEAST_S)
        update["cut_s"] = max(budget * (1 - share) - elapsed_s, _LEAST_S)
    return plan.model_copy(update=update)


def left_s(budget_s: float | None, elapsed_s: float) -> float | None:
    """Seconds left of a budget `elapsed_s` in (None: no budget)."""
    return None if budget_s is None else budget_s - elapsed_s
