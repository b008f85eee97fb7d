"""ExecutorActor: plans in; tasks dispatched by priority; control records out.

One actor serves every plan, so one `SlotScheduler` orders dispatch across all
requests. Each task is driven by the Ray-free `TaskRunner` (retries, fallback,
deadlines) over `RayDispatcher` (slots, replicas, `ray.cancel`). The executor never
relays generated text: callers read it from the expert (docs/token-path.md).

A caller process opens one `session(caller)` and `submit`s each plan to it: the
submission answers `Admitted` (or raises QueueFullError: a 429), and every record of
every plan of that caller — `Dispatched` / `Retrying` / `Finished`, then `Closed` —
travels on the session, merged into one object whenever the caller is slower than
the records come. When a session ends (the caller closed it, or died), its plans are
cancelled.
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

from actors.accounts import TenantAccounts
from actors.dispatch import RayDispatcher
from actors.metrics import metrics
from orchestration.config import ChorusConfig
from orchestration.errors import (
    InternalError,
    QueueFullError,
    TaskCancelledError,
)
from orchestration.models import ExecutionPlan, ExecutorLoad, ExpertTask, TaskResult
from orchestration.replicas import ReplicaPool
from orchestration.runs import RequestRun, Session
from orchestration.scheduling import strategy_concurrency
from orchestration.slots import SlotScheduler
from orchestration.task_runner import TaskRunner
from orchestration.wire import Admitted, Closed, Finished, Record, Retrying


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
        self.pools = {e.name: self._pool(e.name, e.max_concurrency) for e in config.experts}
        now = time.monotonic()
        for expert, group in replicas.items():
            found = {label: (_actor(name, namespace), name) for label, name in group.items()}
            self.pools[expert].update({label: (handle, "ready", name)
                                       for label, (handle, name) in found.items() if handle}, now)
        self.slots = SlotScheduler(config.executor.max_in_flight,
                                   {name: pool.capacity(now) for name, pool in self.pools.items()})
        self.accounts = TenantAccounts(config, self.slots)  # limits, usage, fair share
        self.requests: dict[str, RequestRun] = {}
        self.sessions: dict[str, Session] = {}  # caller -> its records
        self._task_runs: dict[str, RequestRun] = {}  # task id -> its request
        self.dispatcher = RayDispatcher(self.slots, self.pools, self._claim, self._streams,
                                        self._refresh_limit, self._granted)
        self._cooling_timers: dict[str, asyncio.TimerHandle] = {}
        self.dispatcher.gate = ray.get_runtime_context().current_actor  # `first_token`
        self.runner = TaskRunner(self.dispatcher, config.executor.retry,
                                 {e.name: e.fallback for e in config.experts}, self._notify,
                                 config.executor.hedge, self._hedged)
        self._hedging(config)
        self.counters: Counter[str] = Counter()
        self._unfinished = 0  # accepted tasks without a result yet
        self._publisher: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()

    # ------------------------------------------------------------------ public API

    def delivered(self, task_id: str, attempt: int, text: str) -> None:
        """A caller's answer to a `Handoff`: the text it has of that task's answer."""
        self.dispatcher.on_delivered(task_id, attempt, text)

    @ray.method(enable_task_events=False)
    def first_token(self, key: str) -> bool:
        """A held attempt's first token: whether it won its race (docs/hedging.md)."""
        return self.runner.claim(key)

    def load(self) -> ExecutorLoad:
        active, queued = self._load()
        return ExecutorLoad(active=active, queued=queued)

    def _load(self) -> tuple[int, int]:
        """(active, queued): tasks holding a slot, and accepted tasks still waiting."""
        return self.slots.total, self._unfinished - self.slots.total

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    async def session(self, caller: str) -> AsyncIterator[list[tuple[str, Record]]]:
        """Every record of `caller`'s plans, in batches of (request id, record), until
        the caller closes it; then (or if the caller dies) its plans are cancelled."""
        session = self._session(caller)
        try:
            async for batch in session.batches():
                yield batch
        finally:
            for run in list(session.runs.values()):
                run.cancel()
            if self.sessions.get(caller) is session:
                del self.sessions[caller]

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    def submit(self, plan: ExecutionPlan, caller: str) -> Admitted:
        """Admit a plan whose records go to `caller`'s session (raises QueueFullError,
        or RateLimitedError: its tenant is over a limit)."""
        run = self._admit(plan, self._session(caller))
        return Admitted(*self._load(), run.ratelimit)

    def drop_caller(self, caller: str) -> int:
        """A caller that is gone (its process died): cancel its plans, forget its session."""
        session = self.sessions.pop(caller, None)
        if session is None:
            return 0
        return sum(run.cancel() for run in list(session.runs.values()))

    def _session(self, caller: str) -> Session:
        session = self.sessions.get(caller)
        if session is None:
            session = self.sessions[caller] = Session(caller)
        return session

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    async def run(self, plan: ExecutionPlan) -> tuple[Admitted, list[TaskResult]]:
        """The load at admission and all of a plan's results (primary first), for a
        caller that needs no stream."""
        run = self._admit(plan, None)
        admitted = Admitted(*self._load(), run.ratelimit)
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

    def set_replicas(self, expert: str,
                     members: dict[str, tuple[ActorHandle, str, str]]) -> None:
        """The supervisor's view of an expert's replicas: label -> (handle, state, actor
        name), state "ready", "down" (restarting or being re-created) or "draining"."""
        pool = self.pools.get(expert)
        if pool is None:  # an expert a redeploy adds, published before `reconfigure`
            each = next((e.max_concurrency for e in self.config.experts if e.name == expert), 1)
            pool = self.pools[expert] = self._pool(expert, each)
        pool.update(members, time.monotonic())
        self._refresh_limit(expert)

    def reconfigure(self, config: ChorusConfig) -> None:
        """A redeploy's settings, in place: bounds, queue, retry policy, fallbacks, pools
        of added experts. Pools of removed experts stay until `forget_expert` (their
        replicas drain first); accepted work is untouched."""
        self.config = config
        for expert in config.experts:
            pool = self.pools.get(expert.name)
            if pool is None:
                self.pools[expert.name] = self._pool(expert.name, expert.max_concurrency)
            else:
                pool.capacity_each = expert.max_concurrency  # for replicas that join later
                pool.cooldown_failures = config.scaling.cooldown_failures
                pool.cooldown_s = config.scaling.cooldown_s
            self._refresh_limit(expert.name)
        self.slots.set_max_in_flight(config.executor.max_in_flight)
        self.accounts.configure(config)
        self.runner.retry = config.executor.retry
        self._hedging(config)
        self.runner.fallbacks = {e.name: e.fallback for e in config.experts}

    def forget_expert(self, expert: str) -> None:
        """An expert that left the config and whose replicas are gone: its tasks (of
        plans made before) fail at once as having no replica."""
        self.pools.pop(expert, None)
        self._refresh_limit(expert)

    async def vigil(self) -> None:
        """Never returns: the supervisor learns of this process's death when it fails."""
        await asyncio.Event().wait()

    def _pool(self, expert: str, capacity_each: int) -> ReplicaPool:
        scaling = self.config.scaling
        return ReplicaPool(expert, capacity_each, scaling.cooldown_failures, scaling.cooldown_s)

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
            "sessions": len(self.sessions),
            "counters": {**self.counters, **self.runner.counters},
            "continued": dict(self.runner.continued),  # expert -> attempts that continued
            "hedged": {e: self.runner.hedging.fraction(e) for e in self.pools},  # recent share
            "tenants": self.accounts.stats(),
        }

    # ------------------------------------------------------------------ plan life

    def _refresh_limit(self, expert: str) -> None:
        """The expert's bound follows its dispatchable replicas (health, draining,
        cool-downs); a cool-down's end is a change too, so it gets a timer."""
        pool, now = self.pools.get(expert), time.monotonic()
        # An expert with nothing to dispatch to (all drained, or forgotten) still grants
        # one slot at a time: its tasks then fail at once for want of a replica (and go
        # to their fallback) instead of waiting for a slot that never comes.
        self.slots.set_limit(expert, (pool.capacity(now) if pool is not None else 0) or 1)
        if pool is None:
            return
        ends = [r.cooling_until for r in pool.replicas.values() if r.cooling_until > now]
        if ends and expert not in self._cooling_timers:
            def expired() -> None:
                del self._cooling_timers[expert]
                self._refresh_limit(expert)

            self._cooling_timers[expert] = asyncio.get_running_loop().call_later(
                min(ends) - now + 0.001, expired)

    def _claim(self, task_id: str) -> tuple[str, str]:
        """(plan id, tenant) of a task: the scheduler's per-plan bound and fair share."""
        plan = self._task_runs[task_id].plan
        return plan.id, plan.tenant

    def _granted(self, task: ExpertTask, expert: str, waited_s: float) -> None:
        self.accounts.queued(self._task_runs[task.id].plan.tenant, expert, waited_s)

    def _streams(self, task_id: str) -> str | None:
        """The caller that reads this task's text live, if any."""
        run = self._task_runs[task_id]
        if run.session is None or not next(t.stream for t in run.plan.tasks if t.id == task_id):
            return None
        return run.session.caller

    def _hedging(self, config: ChorusConfig) -> None:
        self.runner.hedging.config = config.executor.hedge
        self.runner.hedging.exempt = frozenset(e.name for e in config.experts if not e.hedge)

    def _hedged(self, expert: str, outcome: str) -> None:
        metrics().hedges.inc(tags={"expert": expert, "outcome": outcome})

    def _notify(self, task: ExpertTask, record: Record) -> None:
        self._last_progress = time.monotonic()
        if isinstance(record, Retrying):
            metrics().retries.inc(tags={"expert": record.expert})
        run = self._task_runs.get(task.id)
        if run is not None:
            run.put(record)
        self._load_changed()

    def _admit(self, plan: ExecutionPlan, session: Session | None) -> RequestRun:
        queued = self._load()[1]
        limit = self.config.executor.max_queue
        if plan.request_id in self.requests:  # ids are server-unique: a caller bug
            raise QueueFullError(f"request {plan.request_id} is already running")
        if queued + len(plan.tasks) > limit and not plan.follow_up:
            self.counters["refused"] += 1
            self.accounts.refused(plan, "queue_full")
            raise QueueFullError(
                f"executor queue is full ({queued} queued, max_queue={limit}); retry later")
        ratelimit = self.accounts.admit(plan)  # (raises RateLimitedError)
        self.counters["accepted_plans"] += 1
        run = self.requests[plan.request_id] = RequestRun(plan, session, ratelimit)
        if session is not None:
            session.runs[plan.request_id] = run
        self.slots.open_plan(plan.id, strategy_concurrency(plan.strategy, self.config.executor),
                             plan.strategy)
        self._unfinished += len(plan.tasks)
        for task, state in run.start(time.monotonic()):
            self._task_runs[task.id] = run
            job = asyncio.ensure_future(self.runner.run(state))
            job.add_done_callback(lambda job, t=task: self._finished(run, t, job))
            run.jobs.append(job)
        if plan.cut_s is not None and plan.experts:
            run.timer = asyncio.get_running_loop().call_later(plan.cut_s, self._budget_cut, run)
        self._load_changed()
        return run

    def _budget_cut(self, run: RequestRun) -> None:
        run.timer = None
        self.counters["budget_cuts"] += run.cut_at_budget()

    def _finished(self, run: RequestRun, task: ExpertTask, job: asyncio.Task[TaskResult]) -> None:
        # A job cancelled before its first step never ran the runner, and a bug must
        # not leave a plan waiting forever: both still end with one result here.
        if job.cancelled():
            state = run.states[task.id]  # (cut by its plan before its first step, maybe)
            result = self.runner.unrun(state, state.cut or TaskCancelledError(
                f"{task.expert}: request cancelled before dispatch"))
        elif (exc := job.exception()) is not None:
            result = self.runner.unrun(run.states[task.id], InternalError(
                f"{task.expert}: internal error: {exc!r}"))
        else:
            result = job.result()
        self.accounts.charge(run.plan.tenant, task.expert, result)
        self._unfinished -= 1
        self._last_progress = time.monotonic()
        metrics().tasks.inc(tags={"expert": task.expert, "status": result.status.value})
        del self._task_runs[task.id]
        run.results[task.id] = result
        run.put(Finished(result))
        if len(run.results) == len(run.plan.tasks):
            run.cancel()  # (its budget's timer)
            run.closed = True
            run.put(Closed())
            self.slots.close_plan(run.plan.id)
            self.requests.pop(run.plan.request_id, None)
            if run.session is not None:
                run.session.runs.pop(run.plan.request_id, None)
        else:
            self.counters["quorum_cuts"] += run.cut_at_quorum()
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
