"""Routing policy: a request and the executor's load in, an `ExecutionPlan` out."""

from __future__ import annotations

import re
from collections.abc import Mapping

from orchestration.config import ChorusConfig, ExpertConfig
from orchestration.errors import UnknownExpertError, UnsupportedParameterError
from orchestration.models import (
    ExecutionPlan,
    ExecutionStrategy,
    ExecutorLoad,
    ExpertTask,
    InferenceOptions,
    OrchestrateRequest,
)
from orchestration.scheduling import dispatch_rank, task_weight
from orchestration.tools import is_forced


def keyword_hits(expert: ExpertConfig, prompt: str) -> int:
    """How many of the expert's keywords occur in the prompt as whole words."""
    text = prompt.lower()
    return sum(
        1 for kw in expert.keywords if re.search(rf"(?<!\w){re.escape(kw.lower())}(?!\w)", text)
    )


def expert_scores(
    config: ChorusConfig, prompt: str, similarity: Mapping[str, float] | None = None
) -> tuple[str, dict[str, float]]:
    """Every expert's score under the router's method, and the method actually used.

    `similarity` is each expert's semantic score (see `orchestration.semantic`); without
    it, a semantic or hybrid router can only count keywords, and says so.
    """
    method = config.router.method
    hits = {e.name: keyword_hits(e, prompt) for e in config.experts}
    if method == "keywords" or similarity is None:
        return "keywords", {name: float(n) for name, n in hits.items()}
    if method == "semantic":
        return method, {e.name: similarity.get(e.name, 0.0) for e in config.experts}
    bonus = config.router.keyword_weight
    return method, {
        e.name: similarity.get(e.name, 0.0) + (bonus if hits[e.name] else 0.0)
        for e in config.experts
    }


def threshold(config: ChorusConfig, method: str, expert: ExpertConfig) -> float:
    """The score an expert must reach: one keyword hit, or its similarity threshold."""
    return 1.0 if method == "keywords" else config.score_threshold(expert)


def ranked_fits(config: ChorusConfig, method: str, scores: Mapping[str, float]) -> list[ExpertConfig]:
    """Experts whose score reaches their threshold, best first, then in config order."""
    fits = [
        (scores[e.name], -index, e)
        for index, e in enumerate(config.experts)
        if scores[e.name] >= threshold(config, method, e)
    ]
    fits.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [e for _, _, e in fits]


def describe_scores(config: ChorusConfig, method: str, scores: Mapping[str, float]) -> str:
    """`hybrid scores: code 0.71>=0.45, critic 0.38<0.45, ...`: what decided, best first."""
    if method == "keywords":
        hits = [f"{name} {int(n)}" for name, n in sorted(scores.items(), key=lambda i: -i[1]) if n]
        return f"keyword hits: {', '.join(hits) or 'none'}"
    parts = []
    for name, score in sorted(scores.items(), key=lambda item: -item[1]):
        bar = threshold(config, method, config.expert(name))
        parts.append(f"{name} {score:.3f}{'>=' if score >= bar else '<'}{bar:g}")
    return f"{method} scores: {', '.join(parts)}"


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


def plannable_by_caller(request: OrchestrateRequest, config: ChorusConfig,
                        load_age_s: float | None) -> bool:
    """Can the caller run this policy itself, without a call to the router?

    Yes when the request decides the plan (`needs_router` is False), and for a
    `keywords` team (no model involved) when the caller has a load the executor reported
    at most `router.local_load_max_age_s` ago (with its latest admission): the same
    policy on the same kind of data the router would use. Otherwise the router plans.
    """
    if not needs_router(request):
        return True
    return (config.router.method == "keywords" and load_age_s is not None
            and load_age_s <= config.router.local_load_max_age_s)


def plan_request(
    request: OrchestrateRequest,
    config: ChorusConfig,
    load: ExecutorLoad | None = None,
    similarity: Mapping[str, float] | None = None,
) -> ExecutionPlan:
    """Decide who answers: primary, specialists, strategy, priorities and deadlines.

    The primary is the caller's, else the best-fitting expert, else `router.primary`;
    specialists are the next best fits (never the default primary, the generalist).
    """
    load = load or ExecutorLoad()
    method, scores = expert_scores(config, request.prompt, similarity)
    fits = ranked_fits(config, method, scores)
    reasons = [describe_scores(config, method, scores)]
    if method != config.router.method:
        reasons.append(f"no semantic scores: {config.router.method} router fell back to keywords")
    default = config.router.primary
    if request.primary is not None:
        primary_name = request.primary
        reasons.append(f"primary {primary_name}: chosen by the caller")
    elif fits and request.experts is None:
        primary_name = fits[0].name
        reasons.append(f"primary {primary_name}: best fit")
    else:
        primary_name = default
        why = "experts chosen by the caller" if fits else "no expert reached its threshold"
        reasons.append(f"primary {primary_name}: the default ({why})")
    _check_names(config, [primary_name], "primary")
    if (request.sampling.calls_tools and not is_forced(request.sampling)
            and config.expert(primary_name).tool_parser is None):
        raise UnsupportedParameterError(
            f"tool_choice: expert {primary_name!r} has no tool_parser, so its calls cannot be "
            "read from its text (tool_choice 'auto'); use tool_choice 'required' or name a "
            "function (docs/openai.md)", field="tool_choice")
    if request.sampling.answers_alone:
        # A tool call or a JSON answer is the primary's alone: nothing can be appended.
        if request.experts:
            _check_names(config, request.experts, "experts")
        chosen = []
        reasons.append("tools/response_format: the primary answers alone")
    elif request.experts is not None:
        _check_names(config, request.experts, "experts")
        chosen = [config.expert(n) for n in dict.fromkeys(request.experts) if n != primary_name]
        reasons.append("experts chosen by the caller")
    else:
        # Keyword hits are counts, not similarities: any hit makes a specialist there.
        ratio = 0.0 if method == "keywords" else config.router.specialist_ratio
        floor = ratio * scores[fits[0].name] if fits else 0.0
        chosen = [e for e in fits if e.name not in (primary_name, default) and scores[e.name] >= floor]
        chosen = chosen[: config.router.max_parallel_experts]
        reasons.append(f"specialists {[e.name for e in chosen]}")
        if load.total >= config.router.thresholds.drop_normal_experts:
            dropped = [e.name for e in chosen if e.importance != "high"]
            chosen = [e for e in chosen if e.importance == "high"]
            if dropped:
                reasons.append(f"load {load.total}: dropped normal-importance {dropped}")

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
        base = task_weight(role, expert.importance)
        return ExpertTask(
            expert=expert.name,
            prompt=request.prompt,
            system_prompt=expert.system_prompt,
            messages=request.messages,
            raw=request.raw,
            # The answer's sampling is the primary's; a specialist writes one free-text
            # contribution (docs/openai.md, "model: chorus").
            sampling=request.sampling if role == "primary" else request.sampling.for_specialists(),
            role=role,  # type: ignore[arg-type]
            weight=base,
            rank=dispatch_rank(base, request.priority, config.executor),
            timeout_s=timeout_s,
            ttft_timeout_s=config.executor.ttft_timeout_s,
            stall_timeout_s=config.executor.stall_timeout_s,
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
