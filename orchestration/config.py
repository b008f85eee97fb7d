"""Configuration: YAML in, validated pydantic models out, errors that name the field path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from orchestration.errors import ConfigError, FieldError, format_validation_error
from orchestration.expert_config import (  # re-exported: one place to import config from
    ActorResources,
    ExpertConfig,
    MockOptions,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    ReplicasConfig,
    Score,
    _Section,
)
from orchestration.models import ExecutionStrategy
from orchestration.tenants import TenantConfig

__all__ = ["ActorResources", "ChorusConfig", "ExpertConfig", "MockOptions", "ReplicasConfig",
           "load_config", "parse_config"]

DEFAULT_CONFIG = "config/mock.yaml"


class ScalingConfig(_Section):
    """The autoscaling loop and the executor's replica cool-downs (docs/scaling.md)."""

    interval_s: PositiveFloat = 1.0
    # A new replica not ready within this time (cannot be placed, engine stuck) is given
    # up and reported; scale-ups of that expert pause for `placement_backoff_s`.
    placement_timeout_s: PositiveFloat = 300.0
    placement_backoff_s: NonNegFloat = 60.0
    # A replica failing this many attempts in a row leaves dispatch for `cooldown_s`.
    cooldown_failures: PositiveInt = 3
    cooldown_s: NonNegFloat = 30.0


class LoadThresholds(_Section):
    """Executor load (active + queued tasks) at which the router degrades its plans."""

    parallel_limited: NonNegInt = 8
    serial: NonNegInt = 24
    drop_normal_experts: NonNegInt = 24


class RouterConfig(_Section):
    """Who answers: scoring method and score thresholds; load thresholds for degrading."""

    primary: str = "general"
    max_parallel_experts: NonNegInt = 3
    default_strategy: ExecutionStrategy = ExecutionStrategy.PARALLEL_FULL
    thresholds: LoadThresholds = Field(default_factory=LoadThresholds)
    # The executor pushes its load to the router at most this often (when it changed).
    load_publish_s: PositiveFloat = 0.05
    # A keywords team is planned by the caller (no router call) with the load the
    # executor reported on the caller's latest admission, if it is at most this old.
    local_load_max_age_s: NonNegFloat = 1.0
    # keywords: keyword hits only (no model); semantic: similarity to experts' routes;
    # hybrid: similarity plus `keyword_weight` when a keyword of the expert occurs.
    method: Literal["keywords", "semantic", "hybrid"] = "keywords"
    # Sentence-embedding model for semantic/hybrid: a packaged name or a folder with
    # model.onnx and tokenizer.json (actors/embedder.py).
    model: str = "all-MiniLM-L6-v2"
    # An expert is a candidate when its score reaches its threshold; the best candidate
    # is the primary, and others are specialists if they also reach `specialist_ratio`
    # of the best score (a second topic in the prompt, not noise).
    score_threshold: Score = 0.2
    specialist_ratio: Annotated[float, Field(ge=0, le=1)] = 0.8
    keyword_weight: Annotated[float, Field(ge=0, le=1)] = 0.15
    resources: ActorResources = Field(default_factory=ActorResources)


class RetryConfig(_Section):
    """The seeds' policy: 3 attempts, waits of 200 ms x 2^n, each scaled by 1 ± jitter."""

    attempts: PositiveInt = 3
    initial_wait_s: NonNegFloat = 0.2
    multiplier: Annotated[float, Field(ge=1)] = 2.0
    max_wait_s: NonNegFloat = 5.0
    # Each wait is multiplied by a random factor in [1 - jitter, 1 + jitter]; 0 = exact.
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.5


class HedgeConfig(_Section):
    """Hedging a slow first token (docs/hedging.md): for an expert with two or more
    ready replicas, an attempt without a first token after `after_s` (`auto`: the
    expert's recent p95 TTFT) gets a copy on the least-loaded other replica; the first
    to produce a token wins, the other is cancelled."""

    enabled: bool = False
    after_s: PositiveFloat | Literal["auto"] = "auto"
    # At most this share of an expert's recent attempts (the last `window`) are hedges.
    max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    window: PositiveInt = 100


class ExecutorConfig(_Section):
    max_in_flight: PositiveInt = 16
    max_queue: PositiveInt = 256
    # Three limits (docs/failover.md#timeouts): a task's whole answer, retries included
    # (a request's `timeout_s` overrides it); an attempt's first token; and the longest
    # gap between two tokens. A long answer that keeps coming is never cut but by the first.
    task_timeout_s: PositiveFloat = 300.0
    ttft_timeout_s: PositiveFloat = 30.0
    stall_timeout_s: PositiveFloat = 10.0
    retry: RetryConfig = Field(default_factory=RetryConfig)
    strategy_concurrency: dict[ExecutionStrategy, PositiveInt] = Field(
        default_factory=lambda: {
            ExecutionStrategy.SERIAL: 1,
            ExecutionStrategy.PARALLEL_LIMITED: 2,
            ExecutionStrategy.PARALLEL_FULL: 4,
        }
    )
    # A request's priority shifts its tasks' rank; 20 makes it dominate the 1..10 weights.
    rank_shift: dict[Literal["high", "normal", "low"], int] = Field(
        default_factory=lambda: {"high": 20, "normal": 0, "low": -20}
    )
    # Async-actor concurrency: how many plans the executor serves at once.
    max_concurrent_plans: PositiveInt = 1000
    # Within a priority, a contended slot goes to the tenant served least (weighted
    # tokens); false: first come, first served (docs/tenants.md#fair-share).
    fair_share: bool = True
    # The team's latency budget for a request that names none (docs/budget.md); unset:
    # no budget, every specialist is waited for (up to its timeouts).
    budget_s: PositiveFloat | None = None
    hedge: HedgeConfig = Field(default_factory=HedgeConfig)
    resources: ActorResources = Field(default_factory=ActorResources)

    @model_validator(mode="after")
    def _all_strategies(self) -> ExecutorConfig:
        missing = [s.value for s in ExecutionStrategy if s not in self.strategy_concurrency]
        if missing:
            raise ValueError(f"strategy_concurrency lacks {', '.join(missing)}")
        return self


class StreamConfig(_Section):
    """How generated text travels from an expert to the caller (see docs/token-path.md)."""

    # After the first batch (sent at once), a stream sends at most one batch per
    # `max_hold_s`: text that arrives sooner waits at most this long and leaves merged.
    max_hold_s: NonNegFloat = 0.05
    # Ray generator backpressure: batches in flight before the producer waits (and
    # merges what piles up meanwhile).
    backpressure_objects: PositiveInt = 1
    # How long an attempt's text waits, after it ended, for its caller to open a session
    # with the replica (the caller opens one when the attempt's `Dispatched` arrives).
    linger_s: PositiveFloat = 10.0


class SupervisionConfig(_Section):
    """Chorus re-creates an actor that Ray will no longer restart (see docs/operations.md)."""

    check_interval_s: PositiveFloat = 1.0
    # How often Ray's actor table is read for each ready actor (a crash shows there at
    # once): what bounds how late dispatch and /readyz learn of a dead process.
    watch_interval_s: PositiveFloat = 0.1
    # An answer to the health check later than this counts as not ready.
    ping_timeout_s: PositiveFloat = 5.0
    # /readyz waits this long for the router and the executor to answer.
    readiness_timeout_s: PositiveFloat = 2.0
    # Backoff between re-creations of one actor: initial x 2^n, capped, jittered.
    initial_backoff_s: PositiveFloat = 1.0
    max_backoff_s: PositiveFloat = 60.0
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.5
    # Ready this long without failing again: the next failure starts the backoff over.
    stable_after_s: PositiveFloat = 60.0
    # /readyz: the executor is wedged if work waits and no slot moved for this long.
    wedged_after_s: PositiveFloat = 60.0


class FusionConfig(_Section):
    strategy: Literal["primary", "append", "synthesize"] = "append"
    synthesizer: str | None = None
    max_tokens: PositiveInt = 512
    # `all`: fuse when every specialist ended; `first`: as soon as `min_experts` of them
    # (and the primary) answered, cutting the rest (a request's `min_experts` also does).
    quorum: Literal["first", "all"] = "all"
    min_experts: PositiveInt = 1
    # Under a latency budget, the share of it kept for the synthesis (`synthesize`):
    # the specialists are cut that much earlier, so the synthesis is not.
    budget_share: Annotated[float, Field(ge=0, lt=1)] = 0.3


class GuardConfig(_Section):
    strip_think: bool = True
    redact_patterns: list[str] = Field(
        default_factory=lambda: [
            r"sk-[A-Za-z0-9_-]{16,}",
            r"(?i)bearer\s+[A-Za-z0-9._~+/=-]{16,}",
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
            r"AKIA[0-9A-Z]{16}",
        ]
    )
    replacement: str = "[REDACTED]"


class IngressAutoscaling(_Section):
    """Serve's `autoscaling_config` for the ingress: replicas follow ongoing requests."""

    min_replicas: PositiveInt = 1
    max_replicas: PositiveInt = 4
    # Ongoing HTTP requests (streams) per ingress replica that Serve aims for.
    target_ongoing_requests: PositiveFloat = 64.0

    @model_validator(mode="after")
    def _ordered(self) -> IngressAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"need min_replicas <= max_replicas (got {self.min_replicas}, "
                             f"{self.max_replicas})")
        return self


class IngressConfig(_Section):
    """The HTTP ingress deployment (stateless: the team has its own controller)."""

    replicas: PositiveInt = 1
    autoscaling: IngressAutoscaling | None = None  # set: `replicas` is not used

    def serve_options(self) -> dict[str, Any]:
        if self.autoscaling is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": self.autoscaling.model_dump()}


class ServerConfig(_Section):
    api_key: str | None = None
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    # A stopping ingress replica (SIGTERM, scale-down, redeploy) serves its streams to
    # the end for up to this long; an expert replica being drained (rolled, removed)
    # finishes its attempts for up to this long before it is removed.
    drain_s: PositiveFloat = 30.0
    max_prompt_chars: PositiveInt = 32_000
    max_tokens_limit: PositiveInt = 4096
    # Request bodies: larger is refused with 413, deeper JSON nesting with 400.
    max_body_bytes: PositiveInt = 2 * 1024 * 1024
    max_json_depth: PositiveInt = 32
    # The caller's X-Request-ID is kept as a correlation label up to this length
    # (printable ASCII); longer or unprintable is refused with 400 naming the header.
    max_correlation_id_chars: PositiveInt = 128
    retry_after_s: PositiveInt = 1
    startup_timeout_s: PositiveFloat = 120.0
    namespace: str = "chorus"
    # Resources of the Serve ingress replica (e.g. the head's `chorus-control`).
    resources: ActorResources = Field(default_factory=ActorResources)


class ChorusConfig(_Section):
    experts: Annotated[list[ExpertConfig], Field(min_length=1)]
    router: RouterConfig = Field(default_factory=RouterConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)  # orchestration/tenants.py

    @model_validator(mode="after")
    def _references(self) -> ChorusConfig:
        tenants = [t.name for t in self.tenants]
        for i, name in enumerate(tenants):
            if name in tenants[:i] or name == "default" and self.server.api_key:
                raise FieldError(f"tenants[{i}].name", f"duplicate tenant name {name!r}")
        names = [e.name for e in self.experts]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise FieldError(f"experts[{i}].name", f"duplicate expert name {name!r}")
        if self.router.primary not in names:
            raise FieldError("router.primary", f"unknown expert {self.router.primary!r}")
        for i, expert in enumerate(self.experts):
            if expert.fallback is not None and expert.fallback not in names:
                raise FieldError(f"experts[{i}].fallback", f"unknown expert {expert.fallback!r}")
            if expert.fallback == expert.name:
                raise FieldError(f"experts[{i}].fallback", "an expert cannot be its own fallback")
        if self.router.method != "keywords" and not any(e.routes for e in self.experts):
            raise FieldError("router.method", f"{self.router.method} routing needs `routes` "
                             "(example utterances) on at least one expert")
        if self.fusion.strategy == "synthesize":
            if self.fusion.synthesizer is None:
                raise FieldError("fusion.synthesizer", "required when strategy is synthesize")
            if self.fusion.synthesizer not in names:
                raise FieldError("fusion.synthesizer", f"unknown expert {self.fusion.synthesizer!r}")
        return self

    def expert(self, name: str) -> ExpertConfig:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(name)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def score_threshold(self, expert: ExpertConfig) -> float:
        """The similarity an expert's score must reach to be consulted."""
        if expert.score_threshold is not None:
            return expert.score_threshold
        return self.router.score_threshold


def parse_config(data: Any, source: str = "<config>") -> ChorusConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with an `experts` list")
    try:
        return ChorusConfig.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc)
        first = message.split(":", 1)[0]
        raise ConfigError(f"{source}: invalid config\n{message}", field=first) from None


def load_config(path: str | os.PathLike[str] | None = None) -> ChorusConfig:
    """Load a YAML config; `None` means `$CHORUS_CONFIG` or the default mock team."""
    resolved = Path(path or os.environ.get("CHORUS_CONFIG") or DEFAULT_CONFIG)
    if not resolved.is_absolute() and not resolved.exists():
        # Let `chorus` work from any directory for the configs shipped in the repo.
        candidate = Path(__file__).resolve().parent.parent / resolved
        if candidate.exists():
            resolved = candidate
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {resolved}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{resolved}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(resolved))
