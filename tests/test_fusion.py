"""Fusion strategies: primary, append (failed experts reported), MoA synthesis and its fallback."""

from __future__ import annotations

import pytest

from orchestration.fusion import (
    SYNTHESIS_SYSTEM_PROMPT,
    FusionOutcome,
    build_synthesis_task,
    fuse,
    should_synthesize,
    synthesis_outcome,
)
from orchestration.models import (
    ExecutionPlan,
    ExecutionStrategy,
    ExpertTask,
    TaskResult,
    TaskStatus,
)

QUESTION = "How do I reverse a list in Python?"


def ok(expert: str, text: str, role: str = "expert") -> TaskResult:
    return TaskResult(
        task_id=f"t-{expert}",
        expert=expert,
        role=role,
        status=TaskStatus.SUCCESS,
        result=text,
        attempts=1,
    )


def failed(
    expert: str, status: TaskStatus, error: str | None, attempts: int = 3, role: str = "expert"
) -> TaskResult:
    return TaskResult(
        task_id=f"t-{expert}",
        expert=expert,
        role=role,
        status=status,
        error=error,
        attempts=attempts,
    )


PRIMARY = ok("general", "Use `lst[::-1]` or `lst.reverse()`.", role="primary")
CODE = ok("code", "  `list(reversed(lst))` returns a new list.  ")
CRITIC = ok("critic", "Note that reverse() works in place.")
CUDA = failed("math", TaskStatus.ERROR, "Simulated GPU error:\nCUDA kernel overload.")
SLOW = failed("slow", TaskStatus.TIMEOUT, "Timeout after 30.0s", attempts=1)


def plan() -> ExecutionPlan:
    return ExecutionPlan(
        request_id="req-1",
        strategy=ExecutionStrategy.PARALLEL_FULL,
        primary=ExpertTask(
            expert="general",
            prompt=QUESTION,
            role="primary",
            weight=10,
            rank=30,
            temperature=0.3,
            seed=7,
        ),
        experts=[ExpertTask(expert=e, prompt=QUESTION) for e in ("code", "math", "critic")],
    )


# ------------------------------------------------------------------------------ fuse


def test_primary_strategy_returns_primary_text_and_still_reports_failures() -> None:
    outcome = fuse("primary", PRIMARY, [CODE, CUDA, SLOW])
    assert outcome.content == PRIMARY.result
    assert outcome.failed == [CUDA, SLOW]
    assert outcome.source == "general"


def test_append_lists_contributions_in_order_then_unavailable_experts() -> None:
    outcome = fuse("append", PRIMARY, [CODE, CUDA, CRITIC, SLOW])
    assert outcome.content == (
        "Use `lst[::-1]` or `lst.reverse()`.\n\n---\nExpert contributions:\n"
        "**code**: `list(reversed(lst))` returns a new list.\n\n"
        "**critic**: Note that reverse() works in place.\n\n"
        "Unavailable experts:\n"
        "- **math**: error after 3 attempts: Simulated GPU error: CUDA kernel overload.\n"
        "- **slow**: timeout: Timeout after 30.0s"
    )
    assert outcome.failed == [CUDA, SLOW]


def test_append_with_only_failed_experts_still_reports_them() -> None:
    cancelled = failed("code", TaskStatus.CANCELLED, None, attempts=0)
    outcome = fuse("append", PRIMARY, [cancelled])
    assert outcome.content.endswith(
        "---\nUnavailable experts:\n- **code**: cancelled: no reason given"
    )
    assert "Expert contributions" not in outcome.content


def test_append_without_experts_is_the_primary_text() -> None:
    assert fuse("append", PRIMARY, []).content == PRIMARY.result


def test_the_body_is_kept_as_streamed_and_only_contributions_are_trimmed() -> None:
    spaced = ok("general", " Use `lst[::-1]`. ", role="primary")  # e.g. cut by a stop
    assert fuse("primary", spaced, []).content == spaced.result
    assert fuse("append", spaced, [CODE]).content == (
        " Use `lst[::-1]`. \n\n---\nExpert contributions:\n"
        "**code**: `list(reversed(lst))` returns a new list.")


def test_long_errors_are_one_short_line() -> None:
    noisy = failed("code", TaskStatus.ERROR, "Traceback\n" + "x" * 1000)
    line = fuse("append", PRIMARY, [noisy]).content.splitlines()[-1]
    assert line.startswith("- **code**: error after 3 attempts: Traceback xxx")
    assert len(line) < 260


def test_failed_primary_falls_back_to_the_first_successful_expert_with_a_note() -> None:
    dead = failed("general", TaskStatus.TIMEOUT, "Timeout after 30.0s", role="primary")
    outcome = fuse("append", dead, [CUDA, CODE, CRITIC])
    assert outcome.source == "code"
    assert outcome.content.startswith(
        "_Note: the primary expert **general** is unavailable "
        "(timeout after 3 attempts: Timeout after 30.0s); this answer comes from **code**._\n\n"
        "`list(reversed(lst))` returns a new list."
    )
    assert "**critic**: Note that" in outcome.content
    assert "- **math**: error" in outcome.content
    assert outcome.content.count("list(reversed(lst))") == 1
    assert outcome.failed == [dead, CUDA]
    assert fuse("primary", dead, [CODE]).content.endswith("returns a new list.")


def test_nobody_answered_gives_empty_content_for_the_caller_to_report() -> None:
    dead = failed("general", TaskStatus.ERROR, "boom", role="primary")
    outcome = fuse("append", dead, [CUDA])
    assert outcome == FusionOutcome(content="", failed=[dead, CUDA], source=None)


def test_synthesize_strategy_returns_the_append_fallback() -> None:
    assert fuse("synthesize", PRIMARY, [CODE, CUDA]) == fuse("append", PRIMARY, [CODE, CUDA])


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fusion strategy"):
        fuse("vote", PRIMARY, [])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ synthesis


def test_synthesis_task_carries_the_primary_weight_and_rank_and_the_moa_prompt() -> None:
    task = build_synthesis_task(plan(), PRIMARY, [CODE, CUDA, CRITIC], "critic", 333, 12.5)
    assert task.role == "synthesis"
    assert task.expert == "critic"
    assert (task.weight, task.rank) == (10, 30)
    assert (task.max_tokens, task.timeout_s) == (333, 12.5)
    assert (task.temperature, task.seed, task.request_id) == (0.3, 7, "req-1")
    assert task.system_prompt == SYNTHESIS_SYSTEM_PROMPT
    assert "synthesize these responses into a single, high-quality response" in task.system_prompt
    assert "critically evaluate" in task.system_prompt


def test_synthesis_prompt_numbers_successful_answers_only() -> None:
    task = build_synthesis_task(plan(), PRIMARY, [CODE, CUDA, CRITIC, SLOW], "critic", 256, 30)
    prompt = task.prompt
    assert prompt.startswith(f"User query:\n{QUESTION}\n\n")
    for i, result in enumerate([PRIMARY, CODE, CRITIC], 1):
        assert f"Response {i} (from {result.expert}):\n{result.result.strip()}" in prompt
    assert prompt.index("Response 1") < prompt.index("Response 2") < prompt.index("Response 3")
    assert "Response 4" not in prompt
    for bad in (CUDA, SLOW):
        assert bad.expert not in prompt and bad.error not in prompt


def test_synthesis_skips_a_failed_primary_and_needs_an_answer() -> None:
    dead = failed("general", TaskStatus.ERROR, "boom", role="primary")
    task = build_synthesis_task(plan(), dead, [CODE, CRITIC], "critic", 256, 30)
    assert "(from general)" not in task.prompt and "Response 1 (from code)" in task.prompt
    with pytest.raises(ValueError, match="nothing to synthesize"):
        build_synthesis_task(plan(), dead, [CUDA], "critic", 256, 30)


def test_should_synthesize_needs_two_answers() -> None:
    assert should_synthesize(PRIMARY, [CODE, CUDA])
    assert not should_synthesize(PRIMARY, [CUDA, SLOW])
    assert not should_synthesize(PRIMARY, [ok("code", "   ")])


def test_synthesis_outcome_keeps_the_synthesis_and_the_failures() -> None:
    fallback = fuse("append", PRIMARY, [CODE, CUDA])
    synth = ok("critic", " The merged answer. ", role="synthesis")
    outcome = synthesis_outcome(synth, fallback)
    # As streamed (fusion deltas): never trimmed.
    assert outcome == FusionOutcome(content=" The merged answer. ", failed=[CUDA], source="critic")


@pytest.mark.parametrize(
    "synth",
    [
        failed("critic", TaskStatus.TIMEOUT, "Timeout after 30.0s", role="synthesis"),
        ok("critic", "  ", role="synthesis"),
    ],
)
def test_failed_synthesis_falls_back_to_append_and_is_reported(synth: TaskResult) -> None:
    fallback = fuse("append", PRIMARY, [CODE, CUDA])
    outcome = synthesis_outcome(synth, fallback)
    assert outcome.content == fallback.content
    assert outcome.source == "general"
    assert outcome.failed[0] == CUDA
    assert outcome.failed[1].expert == "critic" and not outcome.failed[1].ok
    assert outcome.failed[1].error
