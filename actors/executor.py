"""ExecutorActor: plans in, expert tasks dispatched by priority, events and results out.

One actor serves every plan, so one `SlotScheduler` orders dispatch across all
requests. Each task is a coroutine: tenacity drives its attempts, the scheduler grants
each attempt a slot (one outstanding ObjectRef), and the attempt's deadline is enforced
on that ref with `ray.cancel`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from actors.metrics import metrics
from orchestration.config import ChorusConfig
from orchestration.errors import (
    ChorusError,
    EngineError,
    ExpertUnavailableError,
    QueueFullError,
    TaskCancelledError,
    TaskTimeoutError,
    TransientError,
)
from orchestration.models import (
    DoneEvent,
    ExecutionPlan,
    ExecutorLoad,
    ExpertEvent,
    ExpertTask,
    PlanEvent,
    PrimaryDelta,
    TaskResult,
    TaskStatus,
)
from orchestration.scheduling import SlotScheduler, build_retrying, strategy_concurrency

OnDelta = Callable[[str, str, int], None]  # (expert, delta, attempt)


def classify(exc: BaseException, expert: str) -> ChorusError:
    """Map what Ray raised to our error vocabulary (which decides retry or not)."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, ChorusError):
            return cause
        return EngineError(f"{expert}: {type(cause).__name__}: {cause}")
    if isinstance(exc, RayActorError):  # died, or restarting (ActorUnavailableError)
        return ExpertUnavailableError(f"{expert}: expert process died or is restarting")
    if isinstance(exc, ChorusError):
        return exc
    return EngineError(f"{expert}: {type(exc).__name__}: {exc}")


_COUNTER = {TaskStatus.ERROR: "failed", TaskStatus.TIMEOUT: "timed_out",
            TaskStatus.CANCELLED: "cancelled"}


def status_of(exc: BaseException) -> TaskStatus:
    if isinstance(exc, TaskTimeoutError):
        return TaskStatus.TIMEOUT
    if isinstance(exc, TaskCancelledError | asyncio.CancelledError):
        return TaskStatus.CANCELLED
    return TaskStatus.ERROR


async def _next_delta(gen: Any) -> str | None:
    try:
        ref = await gen.__anext__()
    except StopAsyncIteration:
        return None
    return await ref


@ray.remote
class ExecutorActor:
    """Runs every plan's tasks under priorities, bounds, deadlines and retries."""

    def __init__(self, config: ChorusConfig, experts: dict[str, ActorHandle]) -> None:
        self.config = config
        self.experts = experts
        self.fallbacks = {e.name: e.fallback for e in config.experts}
        self.scheduler = SlotScheduler(
            config.executor.max_in_flight, {e.name: e.max_concurrency for e in config.experts}
        )
        self.counters: Counter[str] = Counter()
        self.restarts_seen: Counter[str] = Counter()
        self._suspect: set[str] = set()  # experts whose actor failed and has not served since
        self._unfinished = 0  # accepted tasks without a result yet
        self._outstanding: dict[str, Any] = {}  # attempt key -> ObjectRef / ObjectRefGenerator
        self._requests: dict[str, list[asyncio.Task[TaskResult]]] = {}

    # ------------------------------------------------------------------ public API

    def load(self) -> ExecutorLoad:
        active = self.scheduler.occupancy.total
        return ExecutorLoad(active=active, queued=self._unfinished - active)

    async def stream(self, plan: ExecutionPlan) -> AsyncIterator[Any]:
        """Yield plan, primary deltas as they come, each expert's result, then done."""
        self._admit(plan)
        events: asyncio.Queue[Any] = asyncio.Queue()
        # Launched before the first yield: admission and queueing are one atomic step,
        # so concurrent submissions cannot both pass the `max_queue` check.
        outcomes = self._launch(plan, events.put_nowait)
        try:
            yield PlanEvent(request_id=plan.request_id, plan=plan)
            results: dict[str, TaskResult] = {}
            while len(results) < len(outcomes):
                event = await events.get()
                if isinstance(event, TaskResult):
                    results[event.task_id] = event
                    if event.role == "primary":
                        continue  # the primary's result travels in `done`
                    event = ExpertEvent(request_id=plan.request_id, result=event)
                yield event
            ordered = [results[t.id] for t in plan.tasks]
            yield DoneEvent(request_id=plan.request_id, primary=ordered[0], experts=ordered[1:])
        finally:
            # Normal end: no-op. Caller gone (ray.cancel / generator dropped): cancel all.
            self.cancel(plan.request_id)

    async def run(self, plan: ExecutionPlan) -> list[TaskResult]:
        """All of a plan's results, primary first (no streaming)."""
        self._admit(plan)
        return list(await asyncio.gather(*self._launch(plan, lambda _event: None)))

    async def run_task(self, task: ExpertTask) -> AsyncIterator[Any]:
        """One extra task (e.g. fusion's synthesis) as its own one-task plan, streamed."""
        plan = ExecutionPlan(
            request_id=task.request_id or task.id, strategy="SERIAL", primary=task
        )
        async for event in self.stream(plan):
            yield event

    def cancel(self, request_id: str) -> int:
        """Cancel every task of a request; each still ends with a `cancelled` result."""
        tasks = [t for t in self._requests.get(request_id, []) if not t.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    def stats(self) -> dict[str, Any]:
        load = self.load()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "active": load.active,
            "queued": load.queued,
            "outstanding_refs": len(self._outstanding),
            "max_in_flight": self.scheduler.max_in_flight,
            "peak_in_flight": self.scheduler.peak_in_flight,
            "peak_plan_in_flight": dict(self.scheduler.peak_by_group),
            "in_flight_per_expert": {
                k: v for k, v in self.scheduler.occupancy.per_expert.items() if v
            },
            "requests": len(self._requests),
            "counters": dict(self.counters),
            "restarts_seen": dict(self.restarts_seen),
        }

    # ------------------------------------------------------------------ plan life

    def _report_load(self) -> None:
        load = self.load()
        metrics().queue_depth.set(load.queued)
        metrics().in_flight.set(load.active)

    def _admit(self, plan: ExecutionPlan) -> None:
        queued = self.load().queued
        limit = self.config.executor.max_queue
        if queued + len(plan.tasks) > limit:
            self.counters["refused"] += 1
            raise QueueFullError(
                f"executor queue is full ({queued} queued, max_queue={limit}); retry later"
            )
        self.counters["accepted_plans"] += 1

    def _launch(
        self, plan: ExecutionPlan, emit: Callable[[Any], None]
    ) -> list[asyncio.Future[TaskResult]]:
        """Start one coroutine per task; each outcome future always gets one result."""
        self.scheduler.open_plan(
            plan.id, strategy_concurrency(plan.strategy, self.config.executor), plan.strategy
        )
        self._unfinished += len(plan.tasks)
        loop = asyncio.get_running_loop()

        def on_delta(expert: str, delta: str, attempt: int) -> None:
            emit(PrimaryDelta(request_id=plan.request_id, expert=expert, delta=delta, attempt=attempt))

        running, outcomes = [], []
        for task in plan.tasks:
            outcome: asyncio.Future[TaskResult] = loop.create_future()
            coro = self._run_task(plan, task, on_delta if task.role != "expert" else None)
            job = asyncio.ensure_future(coro)
            job.add_done_callback(lambda job, t=task, o=outcome: self._finish(t, job, o, emit))
            running.append(job)
            outcomes.append(outcome)
        self._requests.setdefault(plan.request_id, []).extend(running)

        def closed(_: Any) -> None:
            self.scheduler.close_plan(plan.id)
            left = [j for j in self._requests.pop(plan.request_id, []) if not j.done()]
            if left:
                self._requests[plan.request_id] = left

        asyncio.gather(*outcomes).add_done_callback(closed)
        return outcomes

    def _finish(
        self, task: ExpertTask, job: asyncio.Task[TaskResult],
        outcome: asyncio.Future[TaskResult], emit: Callable[[Any], None],
    ) -> None:
        # A job cancelled before its first step never ran its own handlers, and a bug
        # must not leave a plan waiting forever: both still end with one result here.
        if job.cancelled():
            self.counters["cancelled"] += 1
            result = self._result(task, TaskStatus.CANCELLED, time.monotonic(), [], [],
                                  error=f"{task.expert}: request cancelled before dispatch")
        elif (exc := job.exception()) is not None:
            self.counters["failed"] += 1
            result = self._result(task, TaskStatus.ERROR, time.monotonic(), [], [],
                                  error=f"{task.expert}: internal error: {exc!r}")
        else:
            result = job.result()
        outcome.set_result(result)
        emit(result)

    # ------------------------------------------------------------------ one task

    async def _run_task(
        self, plan: ExecutionPlan, task: ExpertTask, on_delta: OnDelta | None
    ) -> TaskResult:
        """Attempts on the expert, then on its fallback; always returns one result."""
        started = time.monotonic()
        waits: list[float] = []
        served_by: list[str] = []
        outcome: dict[str, Any] = {}
        emitted = [0]  # characters of the primary already sent: retries resume after them

        def waited(seconds: float) -> None:
            waits.append(seconds)
            self.counters["retried"] += 1
            metrics().retries.inc(tags={"expert": task.expert})

        def forward(expert: str, text: str, attempt: int) -> None:
            if on_delta is not None and len(text) > emitted[0]:
                on_delta(expert, text[emitted[0] :], attempt)
                emitted[0] = len(text)

        error: BaseException | None = None
        candidates = [task.expert] + ([fb] if (fb := self.fallbacks.get(task.expert)) else [])
        try:
            for expert in candidates:
                # Retries on one expert replay the same text (same seed), so the stream
                # resumes after what was sent; a fallback's answer differs, so it restarts
                # (its deltas carry a new `attempt`, which tells the caller).
                emitted[0] = 0
                try:
                    async for attempt in build_retrying(self.config.executor.retry, waited):
                        with attempt:
                            served_by.append(expert)
                            attempt_task = task.model_copy(update={"attempt": len(served_by)})
                            text = await self._attempt(plan, attempt_task, expert, forward, outcome)
                    return self._result(task, TaskStatus.SUCCESS, started, served_by, waits,
                                        result=text, **outcome)
                except TransientError as exc:
                    error = exc
        except asyncio.CancelledError:
            error = TaskCancelledError(f"{task.expert}: request cancelled")
        except ChorusError as exc:
            error = exc  # bad input and the like: not retried, not sent to a fallback
        assert error is not None
        status = status_of(error)
        self.counters[_COUNTER[status]] += 1
        return self._result(task, status, started, served_by, waits, error=str(error),
                            error_code=getattr(error, "code", None))

    def _result(
        self, task: ExpertTask, status: TaskStatus, started: float, served_by: list[str],
        waits: list[float], **fields: Any,
    ) -> TaskResult:
        self._unfinished -= 1
        if status is TaskStatus.SUCCESS:
            self.counters["succeeded"] += 1
        metrics().tasks.inc(tags={"expert": task.expert, "status": status.value})
        self._report_load()
        return TaskResult(
            task_id=task.id, expert=task.expert, role=task.role, status=status,
            attempts=len(served_by), latency_s=time.monotonic() - started,
            served_by=served_by, retry_waits=waits, **fields,
        )

    async def _attempt(
        self, plan: ExecutionPlan, task: ExpertTask, expert: str,
        forward: OnDelta, outcome: dict[str, Any],
    ) -> str:
        """One dispatch: wait for a slot, call the expert, enforce the deadline."""
        await self.scheduler.acquire(expert, plan.id, task.effective_priority)
        loop = asyncio.get_running_loop()
        dispatched = loop.time()
        deadline = dispatched + task.timeout_s
        handle = self.experts[expert]
        key = f"{task.id}:{task.attempt}"
        ref: Any = None
        self.counters["dispatched"] += 1
        self._report_load()
        try:
            if task.role == "expert":
                # One ObjectRef for the whole answer: experts are not streamed to anyone.
                ref = handle.generate.remote(task)
                self._outstanding[key] = ref
                text = await asyncio.wait_for(ref, timeout=task.timeout_s)
            else:
                ref = handle.stream.options(num_returns="streaming").remote(task)
                self._outstanding[key] = ref
                text = ""
                while (delta := await asyncio.wait_for(
                    _next_delta(ref), timeout=max(deadline - loop.time(), 0.0)
                )) is not None:
                    if not text:
                        outcome["ttft_s"] = loop.time() - dispatched
                    text += delta
                    outcome["tokens"] = outcome.get("tokens", 0) + 1
                    forward(expert, text, task.attempt)
        except TimeoutError:
            ray.cancel(ref)  # the expert sees CancelledError; its engine frees the slot
            raise TaskTimeoutError(
                f"{expert}: no complete answer within {task.timeout_s:g}s (attempt {task.attempt})"
            ) from None
        except asyncio.CancelledError:
            if ref is not None:
                ray.cancel(ref)
            raise
        except Exception as exc:
            error = classify(exc, expert)
            if isinstance(error, ExpertUnavailableError):
                self._suspect.add(expert)
            raise error from None
        finally:
            self._outstanding.pop(key, None)
            self.scheduler.release(expert, plan.id)
        if expert in self._suspect:
            self._suspect.discard(expert)
            self.restarts_seen[expert] += 1  # it failed, and now it serves again
        return text
