"""The latency budget and quorum without Ray: the runner's gate, the plan's figures,
fusion's lists, the recent-latency window (docs/budget.md)."""

from __future__ import annotations

import asyncio
import time

from orchestration.budget import planned
from orchestration.errors import BudgetError, EngineError, QuorumReachedError
from orchestration.fusion import fuse
from orchestration.latency import RecentLatency
from orchestration.models import (
    ExecutionPlan,
    ExpertTask,
    OrchestrateRequest,
    TaskResult,
    TaskStatus,
)
from orchestration.task_runner import TaskRun
from tests.conftest import make_config
from tests.test_task_runner import FakeExperts, _runner, _task


def _budgeted(seconds: float) -> TaskRun:
    return TaskRun(_task(), budget_until=time.monotonic() + seconds)


async def test_a_retry_that_cannot_fit_the_budget_is_not_dispatched() -> None:
    experts = FakeExperts({"a": [EngineError("a: CUDA"), "late"]})
    runner = _runner(experts)
    runner.latency.add("a", 30.0, 0.1)  # its recent answers took 30 s; 5 s are left
    result = await runner.run(_budgeted(5.0))
    assert result.status is TaskStatus.BUDGET and result.error_code == "budget"
    assert "p50 latency is 30.00s" in result.error and "a: CUDA" in result.error
    assert [key for _, key in experts.calls] == ["t:1"]
    assert runner.counters["dispatched"] == 1 and runner.counters["retried"] == 0
    assert runner.counters["budget"] == 1


async def test_a_primary_that_cannot_make_the_budget_falls_back_early() -> None:
    experts = FakeExperts({"a": [EngineError("a: CUDA"), "late"], "b": ["quick"]})
    runner = _runner(experts, {"a": "b"})
    runner.latency.add("a", 30.0, 0.1)
    runner.latency.add("b", 0.01, 0.001)
    result = await runner.run(_budgeted(5.0))
    assert result.ok and result.result == "quick" and result.served_by == ["a", "b"]
    assert [e for e, _ in experts.calls] == ["a", "b"]  # no second attempt on `a`


async def test_a_fallback_that_cannot_fit_either_is_not_started() -> None:
    experts = FakeExperts({"a": [EngineError("a: CUDA")], "b": ["late"]})
    runner = _runner(experts, {"a": "b"})
    runner.latency.add("a", 30.0, 0.1)
    runner.latency.add("b", 30.0, 0.1)
    result = await runner.run(_budgeted(5.0))
    assert result.status is TaskStatus.BUDGET and result.served_by == ["a"]
    assert result.error.startswith("b: no attempt started")


async def test_an_expert_of_unknown_latency_is_retried_within_the_budget() -> None:
    experts = FakeExperts({"a": [EngineError("a: CUDA"), "ok"]})
    result = await _runner(experts).run(_budgeted(5.0))
    assert result.ok and result.attempts == 2


async def test_a_task_its_plan_cuts_ends_with_the_cut_not_a_cancellation() -> None:
    experts = FakeExperts({"a": ["hang"]})
    state = _budgeted(5.0)
    job = asyncio.ensure_future(_runner(experts).run(state))
    while not experts.calls:
        await asyncio.sleep(0.001)
    state.cut = BudgetError("a: cut by the latency budget after 1.00s, all the time it had")
    job.cancel()
    result = await job
    assert result.status is TaskStatus.BUDGET and result.error == state.cut.message
    assert experts.cancelled == ["t:1"] and experts.slots_held == 0


def test_recent_latency_keeps_a_bounded_window_and_nearest_rank_quantiles() -> None:
    recent = RecentLatency(size=10)
    for i in range(1, 101):
        recent.add("a", float(i), i / 100)
    assert recent.latency("a") == 95.0  # the last 10: 91..100
    assert recent.ttft("a", 0.95) == 1.0 and recent.ttft("a", 0.5) == 0.95
    assert recent.latency("b") is None and recent.stats()["a"]["attempts"] == 10


def _plan(experts: int) -> ExecutionPlan:
    tasks = [ExpertTask(expert="general", prompt="p", role="primary")]
    tasks += [ExpertTask(expert=f"e{i}", prompt="p") for i in range(experts)]
    return ExecutionPlan(request_id="r", strategy="PARALLEL_FULL", primary=tasks[0],
                         experts=tasks[1:])


def test_the_plan_carries_what_is_left_of_the_budget_and_the_synthesis_share() -> None:
    request = OrchestrateRequest(prompt="p", budget_s=2.0)
    plain = planned(_plan(2), request, make_config(), elapsed_s=0.5)
    assert (plain.budget_s, plain.cut_s, plain.quorum) == (1.5, 1.5, None)
    synth = make_config(fusion={"strategy": "synthesize", "synthesizer": "general",
                                "budget_share": 0.25})
    fused = planned(_plan(2), request, synth, elapsed_s=0.5)
    assert (fused.budget_s, fused.cut_s) == (1.5, 1.0)  # 2 x 0.75 - 0.5
    team = make_config(executor={"budget_s": 3.0}, fusion={"quorum": "first"})
    default = planned(_plan(3), OrchestrateRequest(prompt="p"), team, elapsed_s=0.0)
    assert (default.budget_s, default.quorum) == (3.0, 1)
    asked = planned(_plan(3), OrchestrateRequest(prompt="p", min_experts=2), make_config(), 0)
    assert (asked.budget_s, asked.quorum) == (None, 2)
    alone = planned(_plan(0), OrchestrateRequest(prompt="p", min_experts=2), make_config(), 0)
    assert alone.quorum is None


def test_a_specialist_cut_by_the_quorum_is_failed_but_not_unavailable() -> None:
    primary = TaskResult(task_id="p", expert="general", role="primary",
                         status=TaskStatus.SUCCESS, result="answer")
    fast = TaskResult(task_id="f", expert="fast", status=TaskStatus.SUCCESS, result="quick")
    cut = TaskResult(task_id="s", expert="slow", status=TaskStatus.CANCELLED,
                     error="slow: not needed", error_code=QuorumReachedError.code)
    late = TaskResult(task_id="l", expert="late", status=TaskStatus.BUDGET,
                      error="late: cut by the latency budget", error_code="budget")
    outcome = fuse("append", primary, [fast, cut, late])
    assert [r.expert for r in outcome.failed] == ["slow", "late"]
    assert "**late**: budget: late: cut" in outcome.content
    assert "**slow**" not in outcome.content
