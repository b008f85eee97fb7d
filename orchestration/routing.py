"""Routing policy: a request and the executor's load in, an `ExecutionPlan` out."""

from __future__ import annotations

import re

from orchestration.config import ChorusConfig, ExpertConfig
from orchestration.errors import UnknownExpertError
from orchestration.models import (
    ExecutionPlan,
    ExecutionStrategy,
    ExecutorLoad,
    ExpertTask,
    InferenceOptions,
    OrchestrateRequest,
)
from orchestration.scheduling import effective_priority, task_priority


def _keyword_hits(expert: ExpertConfig, prompt: str) -> int:
    text = prompt.lower()
    return sum(
        1 for kw in expert.keywords if re.search(rf"(?<!\w){re.escape(kw.lower())}(?!\w)", text)
    )


def select_specialists(config: ChorusConfig, prompt: str, primary: str) -> list[ExpertConfig]:
    """Experts whose keywords occur in the prompt, most hits first, then config order."""
    scored = [
        (hits, -index, expert)
        for index, expert in enumerate(config.experts)
        if expert.name != primary and (hits := _keyword_hits(expert, prompt)) > 0
    ]
    scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [expert for _, _, expert in scored][: config.router.max_parallel_experts]


def choose_strategy(config: ChorusConfig, load: ExecutorLoad) -> ExecutionStrategy:
    """The seeds' load-aware choice: full parallelism when idle, serial when swamped."""
    thresholds = config.router.thresholds
    if load.total >= thresholds.serial:
        return ExecutionStrategy.SERIAL
    if load.total >= thresholds.parallel_limited:
        return ExecutionStrategy.PARALLEL_LIMITED
    return config.router.default_strategy


def _check_names(config: ChorusConfig, names: list[str], field: str) -> None:
    known = config.expert_names
    for i, name in enumerate(names):
        if name not in known:
            raise UnknownExpertError(
                f"{field}: unknown expert {name!r}; known experts: {', '.join(known)}",
                field=f"{field}[{i}]" if field == "experts" else field,
            )


def needs_router(request: OrchestrateRequest) -> bool:
    """False when the request itself decides the plan: its primary and its experts are
    named, and with experts, its strategy. Such a plan (e.g. an OpenAI call to one
    expert's model) comes out of this same policy in the caller, without a call to the
    router: nothing in it depends on the router's model or the executor's load."""
    if request.primary is None or request.experts is None:
        return True
    return bool(request.experts) and request.strategy is None


def plan_request(
    request: OrchestrateRequest, config: ChorusConfig, load: ExecutorLoad | None = None
) -> ExecutionPlan:
    """Decide who answers: primary, specialists, strategy, priorities and deadlines."""
    load = load or ExecutorLoad()
    primary_name = request.primary or config.router.primary
    _check_names(config, [primary_name], "primary")
    reasons = []
    if request.experts is not None:
        _check_names(config, request.experts, "experts")
        chosen = [config.expert(n) for n in dict.fromkeys(request.experts) if n != primary_name]
        reasons.append("experts chosen by the caller")
    else:
        chosen = select_specialists(config, request.prompt, primary_name)
        reasons.append(f"keywords matched {[e.name for e in chosen]}")
        if load.total >= config.router.thresholds.drop_normal_experts:
            dropped = [e.name for e in chosen if e.priority != "high"]
            chosen = [e for e in chosen if e.priority == "high"]
            if dropped:
                reasons.append(f"load {load.total}: dropped low-priority {dropped}")

    if request.strategy is not None:
        strategy = request.strategy
        reasons.append("strategy chosen by the caller")
    else:
        strategy = choose_strategy(config, load)
        reasons.append(f"load {load.total} -> {strategy.value}")

    options = InferenceOptions(
        max_tokens=request.max_tokens or InferenceOptions().max_tokens,
        temperature=(
            request.temperature if request.temperature is not None else InferenceOptions().temperature
        ),
        seed=request.seed,
    )
    timeout_s = request.timeout_s or config.executor.task_timeout_s

    def task(expert: ExpertConfig, role: str) -> ExpertTask:
        base = task_priority(role, expert.priority)
        return ExpertTask(
            expert=expert.name,
            prompt=request.prompt,
            system_prompt=expert.system_prompt,
            role=role,  # type: ignore[arg-type]
            priority=base,
            effective_priority=effective_priority(base, request.priority, config.executor),
            timeout_s=timeout_s,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            seed=options.seed,
            request_id=request.id,
            # The caller reads the primary's text as it comes (and, when asked, the
            # specialists'); the other texts come back whole in their results.
            stream=role != "expert" or request.stream_experts,
        )

    return ExecutionPlan(
        request_id=request.id,
        strategy=strategy,
        priority=request.priority,
        primary=task(config.expert(primary_name), "primary"),
        experts=[task(e, "expert") for e in chosen],
        options=options,
        reason="; ".join(reasons),
    )
