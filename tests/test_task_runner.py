"""The task runner without Ray: a fake dispatcher plays the experts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from orchestration.config import RetryConfig
from orchestration.errors import (
    BadRequestError,
    EngineError,
    ExpertUnavailableError,
    StalledError,
    TaskCancelledError,
)
from orchestration.generation import Sampling
from orchestration.models import ExpertTask, TaskStatus
from orchestration.task_runner import TaskRun, TaskRunner
from orchestration.wire import Completion, Dispatched, Handoff, Retrying

FAST = RetryConfig(attempts=3, initial_wait_s=0.001, multiplier=2.0, jitter=0)


@dataclass
class FakeLease:
    expert: str
    replica: str
    actor: str = ""
    outcome: str = "cancelled"


@dataclass
class FakeExperts:
    """Each expert answers by a script: an exception to raise, "hang", or text."""

    scripts: dict[str, list[object]]
    calls: list[tuple[str, str]] = field(default_factory=list)  # (expert, key)
    cancelled: list[str] = field(default_factory=list)
    slots_held: int = 0
    # A live caller's answers to hand-offs, in order (None: nobody reads the text live).
    caller: list[str] | None = None
    prefixes: list[str] = field(default_factory=list)  # each attempt's prefix

    def live(self, task: ExpertTask) -> bool:
        return self.caller is not None

    async def delivered(self, task: ExpertTask, attempt: int) -> str:
        assert self.caller is not None
        if not self.caller:  # a caller that never answers
            await asyncio.Event().wait()
        return self.caller.pop(0)

    replicas: int = 1  # per expert: #0, #1, ...

    @asynccontextmanager
    async def slot(self, expert: str, task: ExpertTask,
                   avoid: frozenset[str] = frozenset()) -> AsyncIterator[FakeLease]:
        label = next(f"{expert}#{i}" for i in range(self.replicas) if f"{expert}#{i}" not in avoid)
        self.slots_held += 1
        try:
            yield FakeLease(expert, label)
        finally:
            self.slots_held -= 1

    def others(self, expert: str, avoid: frozenset[str]) -> bool:
        return any(f"{expert}#{i}" not in avoid for i in range(self.replicas))

    async def invoke(self, lease: FakeLease, task: ExpertTask, key: str) -> Completion:
        self.calls.append((lease.expert, key))
        self.prefixes.append(task.prefix)
        step = self.scripts[lease.expert].pop(0)
        try:
            if step == "hang":
                await asyncio.Event().wait()
            if isinstance(step, Exception):
                raise step
        except asyncio.CancelledError:
            self.cancelled.append(key)  # where Ray would `ray.cancel` the ref
            raise
        return Completion(text=task.prefix + str(step), completion_tokens=3, prompt_tokens=2,
                          finish_reason="stop", replica=lease.replica)


def _runner(experts: FakeExperts, fallbacks: dict[str, str | None] | None = None,
            records: list | None = None) -> TaskRunner:
    notify: Callable = (lambda task, record: records.append(record)) if records is not None \
        else (lambda task, record: None)
    return TaskRunner(experts, FAST, fallbacks or {}, notify)


def _task(timeout_s: float = 5.0) -> ExpertTask:
    return ExpertTask(id="t", expert="a", prompt="p", role="primary", timeout_s=timeout_s)


async def test_success_on_the_first_attempt() -> None:
    experts, records = FakeExperts({"a": ["hello"]}), []
    result = await _runner(experts, records=records).run(TaskRun(_task()))
    assert result.status is TaskStatus.SUCCESS and result.result == "hello"
    assert (result.attempts, result.served_by, result.replicas) == (1, ["a"], ["a#0"])
    assert (result.tokens, result.prompt_tokens, result.finish_reason) == (3, 2, "stop")
    assert records == [Dispatched("t", 1, "a", "a#0", "t:1")]
    assert experts.slots_held == 0


async def test_transient_error_then_success_is_retried_with_backoff() -> None:
    experts, records = FakeExperts({"a": [EngineError("a: CUDA"), "ok"]}), []
    runner = _runner(experts, records=records)
    result = await runner.run(TaskRun(_task()))
    assert result.ok and result.attempts == 2 and result.retry_waits == [0.001]
    assert [type(r).__name__ for r in records] == ["Dispatched", "Retrying", "Dispatched"]
    assert records[1] == Retrying("t", 1, "a", 0.001, "a: CUDA")
    assert [key for _, key in experts.calls] == ["t:1", "t:2"]
    assert runner.counters == {"dispatched": 2, "retried": 1, "succeeded": 1}


async def test_the_deadline_covers_the_whole_answer_and_starts_nothing_after_it() -> None:
    experts = FakeExperts({"a": ["hang", "hang", "hang"], "b": ["never"]})
    runner = _runner(experts, {"a": "b"})
    result = await runner.run(TaskRun(_task(timeout_s=0.05)))
    assert result.status is TaskStatus.TIMEOUT and result.attempts == 1
    assert experts.cancelled == ["t:1"]  # the deadline reached the call ...
    assert experts.calls == [("a", "t:1")]  # ... and nothing was retried, no fallback
    assert "deadline of 0.05s" in result.error and result.error_code == "timeout"
    assert runner.counters["dispatched"] == 1 and runner.counters["timed_out"] == 1


async def test_no_retry_starts_once_the_deadline_has_passed() -> None:
    slow = RetryConfig(attempts=3, initial_wait_s=0.2, jitter=0)  # the wait outlasts it
    experts = FakeExperts({"a": [EngineError("a: CUDA"), "never"]})
    runner = TaskRunner(experts, slow, {})
    result = await runner.run(TaskRun(_task(timeout_s=0.1)))
    assert result.status is TaskStatus.TIMEOUT and result.attempts == 1
    assert runner.counters["dispatched"] == 1 and experts.calls == [("a", "t:1")]


async def test_a_stalled_attempt_goes_to_another_replica_never_the_same() -> None:
    stalled = StalledError("a: no new token for 2s after 5 tokens (attempt 1)")
    experts = FakeExperts({"a": [stalled, "ok"]}, replicas=2)
    result = await _runner(experts).run(TaskRun(_task()))
    assert result.ok and result.replicas == ["a#0", "a#1"]


async def test_a_stalled_attempt_with_no_other_replica_goes_to_the_fallback() -> None:
    stalled = StalledError("a: no first token within 2s (attempt 1)")
    experts = FakeExperts({"a": [stalled, "never"], "b": ["from b"]})
    result = await _runner(experts, {"a": "b"}).run(TaskRun(_task()))
    assert result.ok and result.served_by == ["a", "b"]
    alone = FakeExperts({"a": [stalled, "never"]})
    failed = await _runner(alone).run(TaskRun(_task()))
    assert failed.status is TaskStatus.TIMEOUT and failed.error_code == "stalled"
    assert "no other replica" in failed.error and failed.attempts == 1


async def test_bad_input_is_neither_retried_nor_sent_to_the_fallback() -> None:
    experts = FakeExperts({"a": [BadRequestError("prompt: too long", field="prompt")], "b": []})
    result = await _runner(experts, {"a": "b"}).run(TaskRun(_task()))
    assert result.status is TaskStatus.ERROR and result.attempts == 1
    assert result.error_code == "invalid_request" and experts.calls == [("a", "t:1")]


async def test_exhausted_retries_go_to_the_fallback_which_restarts() -> None:
    down = ExpertUnavailableError("a: expert process died or is restarting")
    experts, records = FakeExperts({"a": [down, down, down], "b": ["from b"]}), []
    result = await _runner(experts, {"a": "b"}, records).run(TaskRun(_task()))
    assert result.ok and result.result == "from b"
    assert result.served_by == ["a", "a", "a", "b"] and result.attempts == 4
    assert records[-1] == Dispatched("t", 4, "b", "b#0", "t:4")


async def test_cancelling_the_request_ends_the_task_without_any_new_dispatch() -> None:
    experts = FakeExperts({"a": ["hang", "never"], "b": ["never"]})
    runner = _runner(experts, {"a": "b"})
    job = asyncio.ensure_future(runner.run(TaskRun(_task())))
    while not experts.calls:
        await asyncio.sleep(0)  # until the first attempt is in flight (no clock involved)
    job.cancel()
    result = await job
    assert result.status is TaskStatus.CANCELLED and result.attempts == 1
    assert experts.calls == [("a", "t:1")] and experts.cancelled == ["t:1"]
    assert runner.counters["retried"] == 0 and runner.counters["cancelled"] == 1


async def test_a_call_cancelled_by_ray_is_a_cancellation_not_a_failure() -> None:
    # Ray cancels the expert calls of a cancelled request (recursive ray.cancel); the
    # boundary turns its TaskCancelledError into ours: never retried, no fallback.
    experts = FakeExperts({"a": [TaskCancelledError("a: call cancelled")], "b": ["x"]})
    runner = _runner(experts, {"a": "b"})
    result = await runner.run(TaskRun(_task()))
    assert result.status is TaskStatus.CANCELLED and experts.calls == [("a", "t:1")]
    assert runner.counters == {"dispatched": 1, "cancelled": 1}


@pytest.mark.parametrize("error", [EngineError("a: boom"), ExpertUnavailableError("a: gone")])
async def test_transient_errors_exhaust_to_an_error_result_with_the_last_reason(error) -> None:
    experts = FakeExperts({"a": [error, error, error]})
    result = await _runner(experts).run(TaskRun(_task()))
    assert result.status is TaskStatus.ERROR and result.attempts == 3
    assert result.error == error.message and result.error_code == error.code


# --------------------------------------------------------------------------- continuation


def _failed(generated: str | None) -> EngineError:
    error = EngineError("a: CUDA")
    error.generated = generated
    return error


async def test_an_attempt_continues_what_the_failed_one_generated() -> None:
    experts = FakeExperts({"a": [_failed("The cap"), _failed("ital of"), " France"]})
    runner = _runner(experts)
    result = await runner.run(TaskRun(_task()))
    assert result.ok and result.result == "The capital of France"
    assert experts.prefixes == ["", "The cap", "The capital of"]
    assert result.continued_from == [0, 7, 14]
    assert runner.continued == {"a": 2}


async def test_a_process_that_died_with_its_text_is_continued_from_what_the_caller_has() -> None:
    down = ExpertUnavailableError("a: expert process died or is restarting")
    experts = FakeExperts({"a": [down], "b": ["rest"]}, caller=["Half an ans"])
    records: list = []
    result = await TaskRunner(experts, RetryConfig(attempts=1), {"a": "b"},
                              lambda task, record: records.append(record)).run(TaskRun(_task()))
    assert result.ok and result.result == "Half an ansrest"  # the fallback continued it
    assert Handoff("t", 1, None) in records  # the caller was asked what it has
    assert experts.prefixes == ["", "Half an ans"] and result.served_by == ["a", "b"]


async def test_a_known_answer_is_handed_to_a_live_caller_without_asking() -> None:
    experts, records = FakeExperts({"a": [_failed("abc"), "def"]}, caller=[]), []
    result = await _runner(experts, records=records).run(TaskRun(_task()))
    assert result.result == "abcdef" and Handoff("t", 1, "abc") in records


def _structured() -> ExpertTask:
    sampling = Sampling.model_validate({"response_format": {"type": "json_object"}})
    return _task().model_copy(update={"sampling": sampling})


async def test_a_structured_answer_seen_in_part_ends_with_a_clear_error() -> None:
    experts = FakeExperts({"a": [_failed('{"a": 1'), "never"], "b": ["never"]},
                          caller=['{"a": 1'])
    result = await _runner(experts, {"a": "b"}).run(TaskRun(_structured()))
    assert result.status is TaskStatus.ERROR and result.error_code == "answer_interrupted"
    assert "7 characters had reached the caller" in result.error
    assert experts.calls == [("a", "t:1")]  # no retry, no fallback


async def test_a_structured_answer_nobody_saw_starts_over() -> None:
    experts = FakeExperts({"a": [_failed('{"a": 1'), '{"a": 2}']}, caller=[""])
    result = await _runner(experts).run(TaskRun(_structured()))
    assert result.ok and result.result == '{"a": 2}' and experts.prefixes == ["", ""]


async def test_a_caller_that_never_says_what_it_has_ends_the_task_at_its_deadline() -> None:
    down = ExpertUnavailableError("a: expert process died or is restarting")
    experts = FakeExperts({"a": [down, "never"]}, caller=[])  # live, and silent
    runner = _runner(experts)
    result = await runner.run(TaskRun(_task(timeout_s=0.1)))
    assert result.status is TaskStatus.TIMEOUT and result.attempts == 1
    assert "did not say what it had received" in result.error
    assert runner.counters["dispatched"] == 1  # nothing was started after the deadline
