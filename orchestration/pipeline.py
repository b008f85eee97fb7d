"""Pipeline: the executor's raw events in, the caller's events out (guarded, fused, final).

Shared by the Serve ingress and `Client.local`, so HTTP and Python callers see the same
sequence: plan, primary deltas, expert results, fusion, then exactly one done or error.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

from orchestration.budget import left_s
from orchestration.call import Call
from orchestration.config import ChorusConfig, GuardConfig
from orchestration.errors import BadRequestError, UnsupportedParameterError
from orchestration.fusion import (
    FusionOutcome,
    build_synthesis_task,
    fuse,
    should_synthesize,
    synthesis_outcome,
)
from orchestration.guard import ResponseGuard
from orchestration.models import (
    DoneEvent,
    ErrorEvent,
    ExpertDelta,
    ExpertEvent,
    ExpertTask,
    FusionDelta,
    FusionEvent,
    PlanEvent,
    PrimaryDelta,
    TaskResult,
)

Synthesize = Callable[[ExpertTask], AsyncIterator[Any]]
# Error codes of the caller's input (never retried): the request ends with their status.
_INPUT_ERRORS = {BadRequestError.code: BadRequestError.status,
                 UnsupportedParameterError.code: UnsupportedParameterError.status}


def primary_failure(request_id: str, primary: TaskResult) -> ErrorEvent:
    """A clear terminal error for a primary that failed for good with nobody to stand in."""
    served = " -> ".join(primary.served_by) or primary.expert
    if primary.error_code in _INPUT_ERRORS:  # the engine refused the caller's input
        return ErrorEvent(request_id=request_id, code=primary.error_code,
                          message=primary.error or "", status=_INPUT_ERRORS[primary.error_code],
                          param=primary.error_field)
    if primary.error_code == "expert_unavailable":
        code, status = "no_healthy_expert", 503
    else:
        code, status = f"primary_{primary.status.value}", 504 if primary.status.value == "timeout" else 502
    return ErrorEvent(
        request_id=request_id,
        code=code,
        message=(
            f"primary expert {primary.expert!r} failed with status {primary.status.value} "
            f"after {primary.attempts} attempt(s) on {served}: {primary.error}"
        ),
        status=status,
    )


@functools.lru_cache(maxsize=8)
def _guard(config_json: str) -> ResponseGuard:
    """One guard per guard config: its patterns are parsed once, not per request."""
    return ResponseGuard(GuardConfig.model_validate_json(config_json))


class _Finisher:
    """Per-request guard and fusion state (the request's clock is its `Call`'s)."""

    def __init__(self, call: Call, first: PlanEvent, config: ChorusConfig,
                 synthesize: Synthesize | None) -> None:
        self.call = call
        self.plan = first.plan
        self.request_id = first.request_id
        self.config = config
        self.synthesize = synthesize
        self.guard = _guard(config.guard.model_dump_json())

    def clean(self, result: TaskResult) -> TaskResult:
        """The result with every text the caller will see guarded: the answer, the other
        choices, and the arguments of tool calls."""
        sanitize = self.guard.sanitize
        update: dict[str, Any] = {}
        if result.result is not None and (clean := sanitize(result.result)) != result.result:
            update["result"] = clean
        if result.samples:
            update["samples"] = [s.model_copy(update={
                "text": sanitize(s.text), "tool_calls": self.clean_calls(s.tool_calls)})
                for s in result.samples]
        if result.tool_calls:
            update["tool_calls"] = self.clean_calls(result.tool_calls)
        return result.model_copy(update=update) if update else result

    def clean_calls(self, calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if not calls:
            return calls
        sanitize = self.guard.sanitize
        return [{**c, "function": {**c["function"],
                                   "arguments": sanitize(c["function"]["arguments"])}}
                for c in calls]

    async def synthesized(
        self, primary: TaskResult, experts: list[TaskResult], fallback: FusionOutcome
    ) -> AsyncIterator[FusionDelta | FusionOutcome]:
        """Stream the synthesizer's answer as fusion deltas, then yield the outcome."""
        fusion = self.config.fusion
        assert self.synthesize is not None and fusion.synthesizer is not None
        timeout_s = self.plan.primary.timeout_s
        if (left := left_s(self.call.budget_s, self.call.elapsed_s())) is not None:
            timeout_s = min(timeout_s, left)  # what the budget kept for it (budget_share)
        task = build_synthesis_task(self.plan, primary, experts, fusion.synthesizer,
                                    fusion.max_tokens, timeout_s)
        live = self.guard.stream()
        result: TaskResult | None = None
        async for event in self.synthesize(task):
            if isinstance(event, PrimaryDelta) and (safe := live.feed(event.delta)):
                yield FusionDelta(request_id=self.request_id, delta=safe)
            elif isinstance(event, DoneEvent):
                result = event.primary
        if tail := live.flush():
            yield FusionDelta(request_id=self.request_id, delta=tail)
        assert result is not None
        yield synthesis_outcome(self.clean(result), fallback)

    async def finish(self, done: DoneEvent) -> AsyncIterator[Any]:
        assert done.primary is not None
        primary, experts = self.clean(done.primary), [self.clean(r) for r in done.experts]
        strategy = self.config.fusion.strategy
        outcome = fuse(strategy, primary, experts)
        left = left_s(self.call.budget_s, self.call.elapsed_s())
        if (strategy == "synthesize" and self.synthesize and should_synthesize(primary, experts)
                and (left is None or left > 0)):
            async for item in self.synthesized(primary, experts, outcome):
                if isinstance(item, FusionOutcome):
                    outcome = item
                else:
                    yield item
        if outcome.source is None:
            yield primary_failure(self.request_id, primary)
            return
        yield FusionEvent(request_id=self.request_id, strategy=strategy,
                          content=outcome.content, failed=outcome.failed)
        timings = {"total_s": self.call.elapsed_s()}
        if self.call.ttft_s is not None:  # only a live stream has one
            timings["ttft_s"] = self.call.ttft_s
        if self.call.budget_s is not None:  # how much of its latency budget it used
            timings["budget_s"] = self.call.budget_s
            timings["budget_used"] = round(timings["total_s"] / self.call.budget_s, 3)
        yield DoneEvent(request_id=self.request_id, primary=primary, experts=experts,
                        content=outcome.content, timings=timings)


async def finish_stream(
    call: Call,
    first: PlanEvent,
    events: AsyncIterator[Any],
    config: ChorusConfig,
    synthesize: Synthesize | None = None,
) -> AsyncIterator[Any]:
    """Guard every text that leaves, fuse at the end, and close with done or error.

    `call` is the request's state: `done.timings` count from its arrival, and the
    first primary text that leaves marks its TTFT (once), also when `events` replays a
    plan that had already ended (then there is no TTFT)."""
    state = _Finisher(call, first, config, synthesize)
    live = state.guard.stream()
    specialists: dict[str, Any] = {}  # task id -> guard window of a streamed specialist
    last: PrimaryDelta | None = None  # the guard's held tail is of its attempt and expert
    yield first
    async for event in events:
        if isinstance(event, PrimaryDelta):
            last = event
            if safe := live.feed(event.delta):
                call.first_token()
                yield event if safe == event.delta else event.model_copy(update={"delta": safe})
        elif isinstance(event, ExpertDelta):
            window = specialists.setdefault(event.task_id, state.guard.stream())
            if safe := window.feed(event.delta):
                yield event if safe == event.delta else event.model_copy(update={"delta": safe})
        elif isinstance(event, ExpertEvent):
            window = specialists.pop(event.result.task_id, None)
            if window is not None and (tail := window.flush()):
                yield ExpertDelta(request_id=state.request_id, task_id=event.result.task_id,
                                  expert=event.result.expert, delta=tail)
            clean = state.clean(event.result)
            yield event if clean is event.result else event.model_copy(update={"result": clean})
        elif isinstance(event, DoneEvent):
            if tail := live.flush():
                call.first_token()
                yield PrimaryDelta(request_id=state.request_id, delta=tail,
                                   expert=last.expert if last else first.plan.primary.expert,
                                   attempt=last.attempt if last else 1)
            async for final in state.finish(event):
                yield final
            return
        else:
            yield event
