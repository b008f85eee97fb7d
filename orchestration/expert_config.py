"""The sections of one expert's configuration: its engine's mock options, replicas,
resources, and the `ExpertConfig` that holds them (re-exported by `orchestration.config`,
which loads the whole team's file)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestration.errors import format_validation_error

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
# A cosine similarity that an expert's score must reach (MiniLM scores live in 0..1).
Score = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorResources(_Section):
    """What a Ray actor reserves. Chosen on purpose: see docs/resources.md."""

    # 0 CPUs: an actor needs a CPU only to be placed, and a control actor holding one
    # would starve a 2-core laptop; set 1 where an engine really burns a core.
    num_cpus: NonNegFloat = 0.0
    num_gpus: NonNegFloat = 0.0
    accelerator_type: str | None = None
    resources: dict[str, NonNegFloat] = Field(default_factory=dict)
    memory: NonNegInt | None = None

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.memory:
            options["memory"] = self.memory
        return options


class MockOptions(_Section):
    """The fault-injecting mock engine: latency profile and fault schedule by request count."""

    ttft_s: NonNegFloat = 0.02
    token_latency_s: NonNegFloat = 0.005
    # Seconds the engine spends starting, at every start and restart (a model's load).
    startup_s: NonNegFloat = 0.0
    tokens: PositiveInt = 24
    seed: int = 0
    fail_every: NonNegInt = 0
    fail_message: str = "Simulated GPU error: CUDA kernel overload."
    slow_every: NonNegInt = 0
    slow_s: NonNegFloat = 5.0
    crash_every: NonNegInt = 0
    hang_every: NonNegInt = 0
    garbage_every: NonNegInt = 0
    # Where a fault of fail/crash/hang_every strikes: after this many tokens of the
    # answer were sent (0: before the first), so an answer can break off mid-stream.
    fault_after_tokens: NonNegInt = 0
    # Text appended to every answer (used to test the guard with fake secrets), sent in
    # pieces of `inject_chunk` characters so that a secret crosses delta boundaries.
    inject: str = ""
    inject_chunk: NonNegInt = 0
    # Per replica (its index): options that differ on it, e.g. one slow replica.
    replicas: dict[NonNegInt, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _replica_options(self) -> MockOptions:
        for index in self.replicas:
            self.on_replica(index)  # each override must make valid options
        return self

    def on_replica(self, index: int) -> MockOptions:
        """The options of replica `index`: these, with its override (if any) applied."""
        override = self.replicas.get(index)
        if not override:
            return self
        if "replicas" in override:
            raise ValueError(f"replicas.{index}: an override cannot itself have replicas")
        try:
            return MockOptions.model_validate({**self.model_dump(exclude={"replicas"}),
                                               **override})
        except ValidationError as exc:
            raise ValueError(f"replicas.{index}: {format_validation_error(exc)}") from None


class ReplicasConfig(_Section):
    """How many actors serve one expert, and how the number follows the load."""

    min: PositiveInt = 1
    max: PositiveInt = 1
    initial: PositiveInt | None = None  # default: min
    # Desired replicas = ceil((queued + in-flight tasks) / target_per_replica); default:
    # the expert's max_concurrency (a replica per full set of slots).
    target_per_replica: PositiveFloat | None = None
    upscale_delay_s: NonNegFloat = 10.0
    downscale_delay_s: NonNegFloat = 60.0

    @model_validator(mode="after")
    def _ordered(self) -> ReplicasConfig:
        if self.initial is None:
            self.initial = self.min
        if not self.min <= self.initial <= self.max:
            raise ValueError(f"need min <= initial <= max (got {self.min}, {self.initial}, "
                             f"{self.max})")
        return self


class ExpertConfig(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")]
    backend: Literal["mock", "vllm"] = "mock"
    model: str = "mock"
    description: str = ""
    system_prompt: str | None = None
    keywords: list[str] = Field(default_factory=list)
    # Example utterances the router embeds to recognise this expert's prompts.
    routes: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    # Overrides `router.score_threshold` for this expert.
    score_threshold: Score | None = None
    # high: its tasks weigh 5 (others 1) and it is kept when load drops normal experts.
    importance: Literal["high", "normal"] = "normal"
    max_concurrency: PositiveInt = 4  # per replica
    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)
    max_restarts: Annotated[int, Field(ge=-1)] = 3
    fallback: str | None = None
    # With `executor.hedge` on: false keeps this expert's attempts from being hedged
    # (a costly model; docs/hedging.md).
    hedge: bool = True
    num_gpus: NonNegFloat | None = None
    resources: ActorResources = Field(default_factory=ActorResources)
    mock: MockOptions = Field(default_factory=MockOptions)
    # vLLM's tool-call parser for this expert's model (`hermes`, `llama3_json`, ...):
    # needed for `tool_choice: auto`; forced tool choices work without one.
    tool_parser: str | None = None
    # vLLM engine arguments passed through to AsyncEngineArgs (model, dtype, ...).
    engine: dict[str, Any] = Field(default_factory=dict)
    # Environment for the actor's process (e.g. VLLM_CPU_KVCACHE_SPACE).
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gpu_default(self) -> ExpertConfig:
        # `num_gpus` at the top is the short form; vLLM experts default to one GPU (a
        # CPU team says `num_gpus: 0`), mock experts to none.
        if self.num_gpus is not None:
            self.resources.num_gpus = self.num_gpus
        elif self.backend == "vllm" and "num_gpus" not in self.resources.model_fields_set:
            self.resources.num_gpus = 1
        self.num_gpus = self.resources.num_gpus
        if self.replicas.target_per_replica is None:
            self.replicas.target_per_replica = float(self.max_concurrency)
        return self

    def actor_options(self) -> dict[str, Any]:
        return self.resources.ray_options()
