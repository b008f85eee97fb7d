"""Fusion: turn the primary's answer and the experts' answers into one reply.

Strategies (config `fusion.strategy`):
- `primary`: the primary's answer alone;
- `append`: the primary's answer, then each expert's contribution under its name and the
  list of experts that failed, with status and reason (a failed expert is never dropped
  silently; every strategy also returns them in `FusionOutcome.failed`);
- `synthesize`: Mixture-of-Agents aggregate-and-synthesize. It needs one more task, so it is
  two steps: `build_synthesis_task` asks the synthesizer expert to merge every successful
  answer, and `synthesis_outcome` keeps its answer, or the `append` outcome if it failed.
  `fuse("synthesize", ...)` therefore returns that `append` fallback.

A failed primary: the body is the first successful expert's answer (plan order: the router
ranks experts), under a note naming the failure, so one dead expert never fails a request.
If no task succeeded, `content` is empty and `source` is None: the caller ends the request
with an error event rather than an empty answer.

Whitespace: the body (the primary's answer, or the synthesizer's) is kept exactly as the
engine generated it, as OpenAI and vLLM return it: it was streamed as generated, and the
whole answer must equal the concatenated stream (a `stop` may leave a trailing space; a
legacy completion often starts with one). Only text Chorus sets in its own markdown (an
expert's contribution after its name, a stand-in's answer under its note, a synthesis
input) is stripped: it is not streamed as generated but sent whole, in the `fusion` event.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestration.errors import QuorumReachedError
from orchestration.models import ExecutionPlan, ExpertTask, TaskResult, TaskStatus

FusionStrategy = Literal["primary", "append", "synthesize"]
STRATEGIES: tuple[str, ...] = ("primary", "append", "synthesize")
MAX_REASON_CHARS = 200  # an error is one line of a list, not a traceback

# The aggregate-and-synthesize prompt of Mixture-of-Agents (Wang et al., 2024), plus one line
# so the reply reads as an answer to the user rather than a review of the responses.
SYNTHESIS_SYSTEM_PROMPT = (
    "You have been provided with a set of responses from various models to the latest user "
    "query. Your task is to synthesize these responses into a single, high-quality response. "
    "It is crucial to critically evaluate the information provided in these responses, "
    "recognizing that some of it may be biased or incorrect. Your response should not simply "
    "replicate the given answers but should offer a refined, accurate, and comprehensive "
    "reply to the instruction. Ensure your response is well-structured, coherent, and adheres "
    "to the highest standards of accuracy and reliability. Answer the user directly; do not "
    "mention the responses or the models."
)


class FusionOutcome(BaseModel):
    """The fused reply, and every task that did not succeed (primary first, then plan order)."""

    model_config = ConfigDict(extra="forbid")

    content: str
    failed: list[TaskResult] = Field(default_factory=list)
    # Whose answer is the body: the primary, a stand-in expert, the synthesizer; None if nobody.
    source: str | None = None


def _answer(result: TaskResult) -> str:
    """An answer set in Chorus's markdown, trimmed (never the streamed body: see module)."""
    return (result.result or "").strip()


def _reason(result: TaskResult) -> str:
    """`timeout after 3 attempts: ...` on one line."""
    reason = " ".join((result.error or "no reason given").split())
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    tries = f" after {result.attempts} attempts" if result.attempts > 1 else ""
    return f"{result.status.value}{tries}: {reason}"


def fuse(strategy: FusionStrategy, primary: TaskResult, experts: list[TaskResult]) -> FusionOutcome:
    """Fuse with `primary` or `append`; `synthesize` gives its `append` fallback (see module)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown fusion strategy {strategy!r}; expected one of {STRATEGIES}")
    failed = [r for r in (primary, *experts) if not r.ok]
    answered = [r for r in experts if r.ok]
    if primary.ok:
        body, source = primary.result or "", primary.expert  # as streamed: never trimmed
    elif answered:
        stand_in = answered.pop(0)
        source = stand_in.expert
        body = (
            f"_Note: the primary expert **{primary.expert}** is unavailable "
            f"({_reason(primary)}); this answer comes from **{stand_in.expert}**._\n\n"
            f"{_answer(stand_in)}"
        )
    else:
        return FusionOutcome(content="", failed=failed, source=None)
    if strategy == "primary":
        return FusionOutcome(content=body, failed=failed, source=source)

    sections = []
    if answered:
        contributions = (f"**{r.expert}**: {_answer(r) or '_(empty answer)_'}" for r in answered)
        sections.append("Expert contributions:\n" + "\n\n".join(contributions))
    # (a specialist cut because the quorum answered is in `failed`, but not unavailable)
    unavailable = [r for r in experts if not r.ok and r.error_code != QuorumReachedError.code]
    if unavailable:
        lines = (f"- **{r.expert}**: {_reason(r)}" for r in unavailable)
        sections.append("Unavailable experts:\n" + "\n".join(lines))
    if sections:
        body += "\n\n---\n" + "\n\n".join(sections)
    return FusionOutcome(content=body, failed=failed, source=source)


def synthesis_inputs(primary: TaskResult, experts: list[TaskResult]) -> list[TaskResult]:
    """The answers a synthesis would merge: successful, non-empty, primary first."""
    return [r for r in (primary, *experts) if r.ok and _answer(r)]


def should_synthesize(primary: TaskResult, experts: list[TaskResult]) -> bool:
    """Synthesis only pays with two answers or more; with one, `fuse` already has it."""
    return len(synthesis_inputs(primary, experts)) >= 2


def build_synthesis_task(
    plan: ExecutionPlan,
    primary: TaskResult,
    experts: list[TaskResult],
    synthesizer: str,
    max_tokens: int,
    timeout_s: float,
) -> ExpertTask:
    """The MoA aggregate-and-synthesize task over every successful answer of `plan`."""
    inputs = synthesis_inputs(primary, experts)
    if not inputs:
        raise ValueError("nothing to synthesize: no task of the plan succeeded")
    responses = "\n\n".join(
        f"Response {i} (from {r.expert}):\n{_answer(r)}" for i, r in enumerate(inputs, 1)
    )
    prompt = (
        f"User query:\n{plan.primary.prompt}\n\n"
        f"Responses from models:\n\n{responses}\n\n"
        "Write the single best response to the user query."
    )
    # It stands for the primary's answer, so it is dispatched with the primary's weight and rank.
    return ExpertTask(
        expert=synthesizer,
        prompt=prompt,
        system_prompt=SYNTHESIS_SYSTEM_PROMPT,
        role="synthesis",
        weight=plan.primary.weight,
        rank=plan.primary.rank,
        timeout_s=timeout_s,
        ttft_timeout_s=plan.primary.ttft_timeout_s,
        stall_timeout_s=plan.primary.stall_timeout_s,
        max_tokens=max_tokens,
        temperature=plan.primary.temperature,
        seed=plan.primary.seed,
        request_id=plan.request_id,
    )


def synthesis_outcome(synth: TaskResult, fallback: FusionOutcome) -> FusionOutcome:
    """The synthesizer's answer, or `fallback` (the `append` outcome) with synth in `failed`."""
    if synth.ok and _answer(synth):
        return FusionOutcome(  # the content as streamed in fusion deltas: never trimmed
            content=synth.result or "", failed=list(fallback.failed), source=synth.expert
        )
    if synth.ok:  # an empty synthesis is a failure to report, not an answer
        synth = synth.model_copy(
            update={"status": TaskStatus.ERROR, "error": "synthesis returned an empty answer"}
        )
    return FusionOutcome(
        content=fallback.content, failed=[*fallback.failed, synth], source=fallback.source
    )
