"""The caller's side of every live request a process runs on one team: Ray moves only.

One `Caller` per process and team (the Serve ingress replica, or a driver using
`Client.local`). It opens one session with the executor and one with each expert
replica its attempts run on, and routes what they send to each request's `Call`
(`orchestration/call.py`) as typed items; `Assembly` (no Ray) turns them into events.
Per request, in Ray calls:

    router.plan(request)             1 call (none when the caller can plan it itself)
    executor.submit(plan, caller)    1 call: `Admitted`, or the admission error (429)
    executor.cancel(request id)      1 call, only if the caller leaves before the end
    executor.delivered(task, ...)    1 call per failed attempt whose text died with its
                                     process (what the caller has: the next attempt
                                     continues it; docs/failover.md)

Everything else travels on the shared sessions: `executor.session(caller)` carries the
records of all its plans, `replica.session(caller)` the text of all its attempts on
that replica, each batch an object shared by every request in it (docs/token-path.md).
A session that breaks (its actor died) ends every request on it with an `error` event
(the executor's), or loses nothing (a replica's: the executor retries, the final result
fills any gap).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.boundary import translate
from orchestration.assembly import Assembly
from orchestration.call import Call, Lost, Records, Text, TextLost
from orchestration.config import StreamConfig
from orchestration.models import ExecutionPlan, ExecutorLoad
from orchestration.wire import Admitted, Closed, Finished, task_of


class _Session:
    """One open streaming call to an actor, and its pump task."""

    def __init__(self, handle: ActorHandle) -> None:
        self.handle = handle
        self.pump: asyncio.Task[None] | None = None
        self.calls: set[str] = set()  # request ids (executor sessions only)


class Caller:
    """Sessions with the team's actors, and the routing of what they send to calls."""

    def __init__(self, caller_id: str, stream: StreamConfig,
                 resolve: Callable[[str], ActorHandle | None]) -> None:
        self.id = caller_id
        self.stream = stream
        self.resolve = resolve  # actor name -> handle, from the team's view
        self.calls: dict[str, Call] = {}  # request id -> call
        self.tasks: dict[str, Call] = {}  # task id -> call (text is keyed by attempt)
        self._executors: dict[str, _Session] = {}  # executor actor id -> session
        self._replicas: dict[str, _Session] = {}  # replica actor name -> session

    # ------------------------------------------------------------------ one call

    async def submit(self, call: Call, executor: ActorHandle) -> ExecutorLoad:
        """Admit the call's plan; from now on its records and text reach its inbox.
        Raises the admission error (QueueFullError, the executor down) as ours."""
        plan = call.plan
        assert plan is not None
        call.assembly = Assembly(plan)
        call.executor = executor
        session = self._executor_session(executor)
        self.calls[plan.request_id] = call
        for task in plan.tasks:
            self.tasks[task.id] = call
        session.calls.add(plan.request_id)
        try:
            admitted = await executor.submit.remote(plan, self.id)
        except BaseException as exc:
            self._forget(call)
            call.closed = True  # never admitted: nothing to cancel
            if isinstance(exc, Exception):
                raise translate(exc, actor="executor") from None
            raise
        call.ratelimit = admitted.ratelimit
        return ExecutorLoad(active=admitted.active, queued=admitted.queued)

    async def events(self, call: Call) -> AsyncIterator[Any]:
        """The call's events until its plan closed (raises if the executor died)."""
        assembly = call.assembly
        assert assembly is not None
        while True:
            item = await call.inbox.get()
            if isinstance(item, Text):
                for event in assembly.on_text(item.key, item.text):
                    yield event
                continue
            if isinstance(item, TextLost):
                assembly.text_lost(item.actor)
                continue
            if isinstance(item, Lost):
                call.closed = True
                raise item.error
            step = assembly.on_records(item.records)
            for name in step.read:
                self._replica_session(name)
                call.reading[name] = self._replicas.get(name)
            for task_id, attempt, text in step.replies:  # what a continuation continues
                call.executor.delivered.remote(task_id, attempt, text)
            call.closed = step.done  # set before yielding `done`: the consumer may stop
            for event in step.events:
                yield event
            if step.done:
                return

    def close(self, call: Call) -> None:
        """The call is over for its caller; a plan still running is cancelled (every
        task of it ends `cancelled`, without a retry or a new dispatch)."""
        self._forget(call)
        if not call.closed and call.executor is not None:
            call.closed = True
            call.executor.cancel.remote(call.request_id)

    def _forget(self, call: Call) -> None:
        if self.calls.get(call.request_id) is call:
            del self.calls[call.request_id]
        if call.plan is not None:
            for task in call.plan.tasks:
                if self.tasks.get(task.id) is call:
                    del self.tasks[task.id]
        for session in self._executors.values():
            session.calls.discard(call.request_id)

    # ------------------------------------------------------------------ sessions

    def _executor_session(self, executor: ActorHandle) -> _Session:
        key = executor._actor_id.hex()
        session = self._executors.get(key)
        if session is None:
            session = self._executors[key] = _Session(executor)
            session.pump = asyncio.ensure_future(self._records(key, session))
        return session

    async def _records(self, key: str, session: _Session) -> None:
        gen = session.handle.session.options(
            num_returns="streaming",
            _generator_backpressure_num_objects=self.stream.backpressure_objects,
        ).remote(self.id)
        try:
            async for ref in gen:
                self._route_records(await ref)
            raise RuntimeError("the executor ended its session")
        except asyncio.CancelledError:
            ray.cancel(gen)
            raise
        except Exception as exc:  # the executor died mid-plan: its calls end with an error
            error = translate(exc, actor="executor")
            for request_id in list(session.calls):
                call = self.calls.get(request_id)
                if call is not None:
                    call.inbox.put_nowait(Lost(error))
        finally:
            if self._executors.get(key) is session:
                del self._executors[key]

    def _route_records(self, batch: list[tuple[str, Any]]) -> None:
        """(request id, record) pairs, in order: one `Records` item per call and run."""
        current: Call | None = None
        records: list[Any] = []
        for request_id, record in batch:
            call = self.calls.get(request_id)
            if call is not current:
                if current is not None and records:
                    current.inbox.put_nowait(Records(records))
                current, records = call, []
            if call is not None:
                records.append(record)
        if current is not None and records:
            current.inbox.put_nowait(Records(records))

    def _replica_session(self, name: str) -> None:
        if not name or name in self._replicas:
            return
        handle = self.resolve(name)
        if handle is None:
            return  # gone from the team already: its tasks' results carry the text
        session = self._replicas[name] = _Session(handle)
        session.pump = asyncio.ensure_future(self._text(name, session))

    async def _text(self, name: str, session: _Session) -> None:
        gen = session.handle.session.options(
            num_returns="streaming",
            _generator_backpressure_num_objects=self.stream.backpressure_objects,
        ).remote(self.id, self.stream.max_hold_s)
        try:
            async for ref in gen:
                for key, text, _tokens in await ref:
                    call = self.tasks.get(task_of(key))
                    if call is not None:
                        call.inbox.put_nowait(Text(key, text))
        except asyncio.CancelledError:
            ray.cancel(gen)
            raise
        except Exception:  # the replica died (its attempts are retried by the executor), or
            # only its session broke: either way text in flight may be lost, so no call
            # takes more text from its attempts; their hand-offs or results fill the gap.
            for call in list(self.calls.values()):
                if call.reading.get(name) is session:  # (not a session opened since)
                    call.inbox.put_nowait(TextLost(name))
        finally:
            if self._replicas.get(name) is session:
                del self._replicas[name]

    def keep_replicas(self, names: set[str]) -> None:
        """Close the sessions of replicas that left the team (the view changed)."""
        for name in [n for n in self._replicas if n not in names]:
            session = self._replicas.pop(name)
            if session.pump is not None:
                session.pump.cancel()

    def shutdown(self) -> None:
        for call in list(self.calls.values()):
            self.close(call)
        for session in [*self._executors.values(), *self._replicas.values()]:
            if session.pump is not None:
                session.pump.cancel()
        self._executors.clear()
        self._replicas.clear()


async def settled_plan(plan: ExecutionPlan, executor: ActorHandle
                       ) -> tuple[Admitted, list[Any]]:
    """The executor's admission (load, rate limits), and the events of a plan run to the
    end before anything is returned (no live text)."""
    ref = executor.run.remote(plan)
    try:
        admitted, results = await ref
    except asyncio.CancelledError:
        ray.cancel(ref)  # the caller went away: the executor cancels every task
        raise
    except Exception as exc:  # admission refused or the executor died: raised to the caller
        raise translate(exc, actor="executor") from None
    assembly = Assembly(plan, live=False)
    step = assembly.on_records([*(Finished(result) for result in results), Closed()])
    return admitted, step.events

