"""ExecutorActor: plans in; tasks dispatched by priority; control records out.

One actor serves every plan, so one `SlotScheduler` orders dispatch across all
requests. Each task is driven by the Ray-free `TaskRunner` (retries, fallback,
deadlines) over `RayDispatcher` (slots, replicas, `ray.cancel`). The executor never
relays generated text: callers read it from the expert (docs/token-path.md). What a
caller gets from `stream(plan)` is a few records per task — `Admitted` first, then
`Dispatched` / `Retrying` / `Finished`, then `Closed` — merged into one object
whenever the caller is slower than the records come.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.dispatch import RayDispatcher
from actors.metrics import metrics
from orchestration.config import ChorusConfig
from orchestration.errors import QueueFullError
from orchestration.models import ExecutionPlan, ExecutorLoad, ExpertTask, TaskResult, TaskStatus
from orchestration.replicas import ReplicaPool
from orchestration.scheduling import strategy_concurrency
from orchestration.slots import SlotScheduler
from orchestration.task_runner import TaskRun, TaskRunner
from orchestration.wire import Admitted, Closed, Finished, Record, Retrying


class RequestRun:
    """One admitted plan: its task jobs, its outbox of records, its results."""

    def __init__(self, plan: ExecutionPlan, live: bool) -> None:
        self.plan = plan
        self.live = live  # a caller reads records (and streamed text) as they come
        self.jobs: list[asyncio.Task[TaskResult]] = []
        self.results: dict[str, TaskResult] = {}
        self.outbox: list[Record] = []
        self._changed = asyncio.Event()
        self.closed = False

    def put(self, record: Record) -> None:
        if self.live:
            self.outbox.append(record)
            self._changed.set()

    async def batches(self) -> AsyncIterator[list[Record]]:
        """Everything queued since the last batch, until `Closed` has been sent."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            batch, self.outbox = self.outbox, []
            yield batch
            if batch and isinstance(batch[-1], Closed):
                return

    def cancel(self) -> int:
        pending = [job for job in self.jobs if not job.done()]
        for job in pending:
            job.cancel()
        return len(pending)


def _actor(name: str, namespace: str) -> ActorHandle | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # no actor of that name (any more)
        return None


@ray.remote
class ExecutorActor:
    """Runs every plan's tasks under priorities, bounds, deadlines and retries."""

    def __init__(self, config: ChorusConfig, replicas: dict[str, dict[str, str]],
                 router: str | None = None) -> None:
        # Actors are passed by name, not handle: constructor arguments stay inline (a
        # Ray restart re-runs this with them), and the supervisor pushes fresh handles
        # (`set_replicas`, `set_router`) whenever it re-creates an actor.
        namespace = config.server.namespace
        self.config = config
        # After a Ray restart these are the names of the first start: some may be gone
        # (re-created under a new name, scaled down). Skip them; the supervisor tells a
        # restarted executor the actors of now.
        self.router = _actor(router, namespace) if router else None
        scaling = config.scaling
        self.pools = {e.name: ReplicaPool(e.name, e.max_concurrency, scaling.cooldown_failures,
                                          scaling.cooldown_s) for e in config.experts}
        now = time.monotonic()
        for expert, group in replicas.items():
            found = {label: _actor(name, namespace) for label, name in group.items()}
            self.pools[expert].update(
                {label: (handle, "ready") for label, handle in found.items() if handle}, now)
        self.slots = SlotScheduler(config.executor.max_in_flight,
                                   {name: pool.capacity(now) for name, pool in self.pools.items()})
        self.requests: dict[str, RequestRun] = {}
        self._task_runs: dict[str, RequestRun] = {}  # task id -> its request
        self.dispatcher = RayDispatcher(self.slots, self.pools, self._plan_of, self._streams,
                                        self._refresh_limit)
        self._cooling_timers: dict[str, asyncio.TimerHandle] = {}
        self.runner = TaskRunner(self.dispatcher, config.executor.retry,
                                 {e.name: e.fallback for e in config.experts}, self._notify)
        self.counters: Counter[str] = Counter()
        self._unfinished = 0  # accepted tasks without a result yet
        self._publisher: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()

    # ------------------------------------------------------------------ public API

    def load(self) -> ExecutorLoad:
        active, queued = self._load()
        return ExecutorLoad(active=active, queued=queued)

    def _load(self) -> tuple[int, int]:
        """(active, queued): tasks holding a slot, and accepted tasks still waiting."""
        return self.slots.total, self._unfinished - self.slots.total

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    async def stream(self, plan: ExecutionPlan) -> AsyncIterator[list[Record]]:
        """`Admitted`, then the plan's records in batches, ending with `Closed`."""
        run = self._admit(plan, live=True)
        try:
            # One loop step lets tasks with a free slot dispatch, so their `Dispatched`
            # records travel with `Admitted` (one object less, and the caller opens its
            # reader sooner).
            await asyncio.sleep(0)
            first, run.outbox = run.outbox, []
            yield [Admitted(*self._load()), *first]
            async for batch in run.batches():
                yield batch
        finally:
            run.cancel()  # a no-op when finished; the caller went away otherwise

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    async def run(self, plan: ExecutionPlan) -> tuple[Admitted, list[TaskResult]]:
        """The load at admission and all of a plan's results (primary first), for a
        caller that needs no stream."""
        run = self._admit(plan, live=False)
        admitted = Admitted(*self._load())
        try:
            return admitted, list(await asyncio.gather(*run.jobs))
        finally:
            run.cancel()  # cancelled caller (ray.cancel): cancel every task

    def cancel(self, request_id: str) -> int:
        """Cancel every task of a request; each still ends with a `cancelled` result."""
        run = self.requests.get(request_id)
        return run.cancel() if run is not None else 0

    def set_router(self, router: ActorHandle) -> None:
        """Where to publish load (a re-created router)."""
        self.router = router

    def set_replicas(self, expert: str, members: dict[str, tuple[ActorHandle, str]]) -> None:
        """The supervisor's view of an expert's replicas: label -> (handle, state), state
        "ready", "down" (restarting or being re-created) or "draining" (scaled down)."""
        self.pools[expert].update(members, time.monotonic())
        self._refresh_limit(expert)

    def pool_stats(self) -> dict[str, Any]:
        """Per expert: tasks queued and in flight (the autoscaler's input), each replica's
        health and load, and the draining replicas with nothing left in flight."""
        now = time.monotonic()
        return {name: {"queued": self.slots.waiting_per_expert[name],
                       "in_flight": self.slots.per_expert[name],
                       "capacity": pool.capacity(now), "replicas": pool.stats(now),
                       "drained": pool.drained()}
                for name, pool in self.pools.items()}

    def probe(self) -> dict[str, Any]:
        """Readiness: can a slot be granted now, or have slots moved recently?"""
        live = [g for g in self.slots.live() if g.state.value == "granted"]
        idle_for = time.monotonic() - self._last_progress
        wedged = (self.slots.waiting > 0 and self.slots.total >= self.slots.max_in_flight
                  and idle_for > self.config.supervision.wedged_after_s)
        return {
            "pid": os.getpid(),
            "ok": not wedged and len(live) == self.slots.total,
            "active": self.slots.total, "queued": self._load()[1],
            "waiting": self.slots.waiting, "free_slots": self.slots.max_in_flight - self.slots.total,
            "seconds_since_progress": round(idle_for, 3), "wedged": wedged,
            "accounting_ok": len(live) == self.slots.total,
        }

    def stats(self) -> dict[str, Any]:
        load = self.load()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "active": load.active,
            "queued": load.queued,
            "outstanding_refs": len(self.dispatcher.outstanding),
            "max_in_flight": self.slots.max_in_flight,
            "peak_in_flight": self.slots.peak_in_flight,
            "peak_plan_in_flight": dict(self.slots.peak_by_group),
            "in_flight_per_expert": {k: v for k, v in self.slots.per_expert.items() if v},
            "replicas": {name: pool.stats(time.monotonic()) for name, pool in self.pools.items()},
            "requests": len(self.requests),
            "counters": {**self.counters, **self.runner.counters},
        }

    # ------------------------------------------------------------------ plan life

    def _refresh_limit(self, expert: str) -> None:
        """The expert's bound follows its dispatchable replicas (health, draining,
        cool-downs); a cool-down's end is a change too, so it gets a timer."""
        pool, now = self.pools[expert], time.monotonic()
        self.slots.set_limit(expert, pool.capacity(now))
        ends = [r.cooling_until for r in pool.replicas.values() if r.cooling_until > now]
        if ends and expert not in self._cooling_timers:
            def expired() -> None:
                del self._cooling_timers[expert]
                self._refresh_limit(expert)

            self._cooling_timers[expert] = asyncio.get_running_loop().call_later(
                min(ends) - now + 0.001, expired)

    def _plan_of(self, task_id: str) -> str:
        return self._task_runs[task_id].plan.id

    def _streams(self, task_id: str) -> bool:
        run = self._task_runs[task_id]
        return run.live and next(t.stream for t in run.plan.tasks if t.id == task_id)

    def _notify(self, task: ExpertTask, record: Record) -> None:
        self._last_progress = time.monotonic()
        if isinstance(record, Retrying):
            metrics().retries.inc(tags={"expert": record.expert})
        run = self._task_runs.get(task.id)
        if run is not None:
            run.put(record)
        self._load_changed()

    def _admit(self, plan: ExecutionPlan, live: bool) -> RequestRun:
        queued = self._load()[1]
        limit = self.config.executor.max_queue
        if queued + len(plan.tasks) > limit:
            self.counters["refused"] += 1
            raise QueueFullError(
                f"executor queue is full ({queued} queued, max_queue={limit}); retry later")
        if plan.request_id in self.requests:  # ids are server-unique: a caller bug
            raise QueueFullError(f"request {plan.request_id} is already running")
        self.counters["accepted_plans"] += 1
        run = self.requests[plan.request_id] = RequestRun(plan, live)
        self.slots.open_plan(plan.id, strategy_concurrency(plan.strategy, self.config.executor),
                             plan.strategy)
        self._unfinished += len(plan.tasks)
        for task in plan.tasks:
            self._task_runs[task.id] = run
            job = asyncio.ensure_future(self.runner.run(TaskRun(task)))
            job.add_done_callback(lambda job, t=task: self._finished(run, t, job))
            run.jobs.append(job)
        self._load_changed()
        return run

    def _finished(self, run: RequestRun, task: ExpertTask, job: asyncio.Task[TaskResult]) -> None:
        # A job cancelled before its first step never ran the runner, and a bug must
        # not leave a plan waiting forever: both still end with one result here.
        if job.cancelled():
            self.runner.counters["cancelled"] += 1
            result = TaskResult(task_id=task.id, expert=task.expert, role=task.role,
                                status=TaskStatus.CANCELLED,
                                error=f"{task.expert}: request cancelled before dispatch")
        elif (exc := job.exception()) is not None:
            self.runner.counters["failed"] += 1
            result = TaskResult(task_id=task.id, expert=task.expert, role=task.role,
                                status=TaskStatus.ERROR,
                                error=f"{task.expert}: internal error: {exc!r}")
        else:
            result = job.result()
        self._unfinished -= 1
        self._last_progress = time.monotonic()
        metrics().tasks.inc(tags={"expert": task.expert, "status": result.status.value})
        del self._task_runs[task.id]
        run.results[task.id] = result
        run.put(Finished(result))
        if len(run.results) == len(run.plan.tasks):
            run.closed = True
            run.put(Closed())
            self.slots.close_plan(run.plan.id)
            self.requests.pop(run.plan.request_id, None)
        self._load_changed()

    # ------------------------------------------------------------------ load publishing

    def _load_changed(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.ensure_future(self._publish_load())

    async def _publish_load(self) -> None:
        """Push the load to the router and the gauges at most every `publish_s`."""
        sent: tuple[int, int] | None = None
        while True:
            load = self._load()
            if load == sent:
                return  # nothing changed since the last push: stop until the next change
            metrics().in_flight.set(load[0])
            metrics().queue_depth.set(load[1])
            if self.router is not None:
                self.router.set_load.remote(*load)  # fire and forget: a stale load is fine
            sent = load
            await asyncio.sleep(self.config.router.load_publish_s)
