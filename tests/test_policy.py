"""Routing and scheduling policy, without Ray: data in, decision out."""

from __future__ import annotations

import pytest

from orchestration.config import RetryConfig
from orchestration.errors import BadRequestError, TransientError, UnknownExpertError
from orchestration.models import ExecutionStrategy, ExecutorLoad, OrchestrateRequest
from orchestration.routing import plan_request
from orchestration.scheduling import build_retrying
from tests.conftest import make_config


def test_keywords_pick_the_specialist() -> None:
    config = make_config(router={"method": "keywords"})
    prompt = "Fix this Python function bug"
    plan = plan_request(OrchestrateRequest(prompt=prompt, primary="general"), config)
    assert plan.primary.expert == "general"
    assert [t.expert for t in plan.experts] == ["code"]
    assert plan.primary.weight == 10 and plan.experts[0].weight == 5
    assert plan.strategy is ExecutionStrategy.PARALLEL_FULL
    # Unforced, the best fit leads: code, with nobody else matching.
    fit = plan_request(OrchestrateRequest(prompt=prompt), config)
    assert [t.expert for t in fit.tasks] == ["code"]
    assert fit.reason.startswith("keyword hits: code 3; primary code: best fit")


def test_no_keyword_means_primary_only() -> None:
    plan = plan_request(OrchestrateRequest(prompt="Tell me a story"), make_config())
    assert plan.experts == []


def test_load_degrades_strategy_and_drops_normal_importance_experts() -> None:
    config = make_config(router={"method": "keywords"})
    prompt = "review the python code and calculate the sum"
    idle = plan_request(OrchestrateRequest(prompt=prompt), config, ExecutorLoad())
    assert [t.expert for t in idle.tasks] == ["code", "math", "critic"]  # 2, 2, 1 hits
    idle = plan_request(OrchestrateRequest(prompt=prompt, primary="general"), config)
    assert {t.expert for t in idle.experts} == {"code", "math", "critic"}
    request = OrchestrateRequest(prompt=prompt, primary="general")
    busy = plan_request(request, config, ExecutorLoad(active=9))
    assert busy.strategy is ExecutionStrategy.PARALLEL_LIMITED
    swamped = plan_request(request, config, ExecutorLoad(active=16, queued=20))
    assert swamped.strategy is ExecutionStrategy.SERIAL
    assert [t.expert for t in swamped.experts] == ["code"]  # the only HIGH specialist
    assert "dropped" in swamped.reason


def test_caller_overrides_are_honoured_even_under_load() -> None:
    config = make_config()
    request = OrchestrateRequest(prompt="hi", experts=["critic", "math"],
                                 strategy=ExecutionStrategy.PARALLEL_LIMITED, priority="high")
    plan = plan_request(request, config, ExecutorLoad(queued=100))
    assert [t.expert for t in plan.experts] == ["critic", "math"]
    assert plan.strategy is ExecutionStrategy.PARALLEL_LIMITED
    assert plan.primary.rank == 30  # 10 shifted by a high request (+20)


@pytest.mark.parametrize(("field", "value", "path"), [
    ("experts", ["code", "oracle"], "experts[1]"),
    ("primary", "oracle", "primary"),
])
def test_unknown_expert_is_refused_clearly(field: str, value: object, path: str) -> None:
    with pytest.raises(UnknownExpertError) as info:
        plan_request(OrchestrateRequest(prompt="hi", **{field: value}), make_config())
    assert info.value.field == path
    assert "'oracle'" in info.value.message and "known experts: general" in info.value.message


@pytest.mark.parametrize(("data", "field"), [
    ({"prompt": "  "}, "prompt"),
    ({"prompt": "x", "timeout_s": -1}, "timeout_s"),
    ({"prompt": "x", "priority": "urgent"}, "priority"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "colour": "red"}, "colour"),
])
def test_bad_request_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(BadRequestError) as info:
        OrchestrateRequest.parse(data)
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}:")


async def _failing_waits(policy: RetryConfig) -> list[float]:
    waits: list[float] = []
    calls = 0
    with pytest.raises(TransientError):
        async for attempt in build_retrying(policy, waits.append):
            with attempt:
                calls += 1
                raise TransientError("boom")
    assert calls == policy.attempts
    return waits


async def test_retry_policy_waits_like_the_seeds() -> None:
    exact = make_config(executor={"retry": {"jitter": 0}}).executor.retry
    assert await _failing_waits(exact) == [0.2, 0.4]


async def test_retry_waits_are_jittered_around_the_seeds_schedule() -> None:
    import statistics

    policy = make_config().executor.retry  # jitter 0.5 by default
    assert len(await _failing_waits(policy)) == 2
    sample = [build_waits(policy) for _ in range(2000)]
    firsts, seconds = [w[0] for w in sample], [w[1] for w in sample]
    assert all(0.1 <= w <= 0.3 for w in firsts) and all(0.2 <= w <= 0.6 for w in seconds)
    assert abs(statistics.mean(firsts) - 0.2) < 0.01 and abs(statistics.mean(seconds) - 0.4) < 0.02
    assert len({round(w, 6) for w in firsts}) > 1000  # spread out, not one wave


def build_waits(policy: RetryConfig) -> list[float]:
    """The waits the policy would choose before attempts 2 and 3."""
    import types

    from orchestration.scheduling import backoff

    wait = backoff(policy)
    return [wait(types.SimpleNamespace(attempt_number=n)) for n in (1, 2)]


async def test_retry_policy_does_not_retry_bad_input() -> None:
    calls = 0
    with pytest.raises(BadRequestError):
        async for attempt in build_retrying(make_config().executor.retry):
            with attempt:
                calls += 1
                raise BadRequestError("bad")
    assert calls == 1


def test_the_callers_seed_reaches_every_task() -> None:
    from orchestration.openai_compat import ChatCompletionRequest, to_orchestrate

    config = make_config()
    plan = plan_request(OrchestrateRequest(prompt="review python code", seed=7), config)
    assert plan.options.seed == 7 and {t.seed for t in plan.tasks} == {7}
    chat = ChatCompletionRequest.parse(
        {"model": "code", "seed": 11, "messages": [{"role": "user", "content": "hi"}]})
    assert to_orchestrate(chat, config.expert_names, "r1").seed == 11
    assert plan_request(OrchestrateRequest(prompt="hi"), config).primary.seed is None


@pytest.mark.parametrize(("fields", "needed"), [
    ({}, True),  # the router picks the primary (by fit) and the specialists
    ({"primary": "code"}, True),  # ... still the specialists
    ({"experts": []}, True),  # ... still the primary
    ({"primary": "code", "experts": []}, False),  # one task: nothing to decide
    ({"primary": "code", "experts": ["math"]}, True),  # the strategy depends on load
    ({"primary": "code", "experts": ["math"], "strategy": "SERIAL"}, False),
])
def test_a_request_that_names_everything_needs_no_router(fields: dict, needed: bool) -> None:
    from orchestration.routing import needs_router

    assert needs_router(OrchestrateRequest(prompt="x", **fields)) is needed
