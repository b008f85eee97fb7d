"""One request end to end, from the caller's process: plan, records, text, events.

The caller (the Serve ingress, or a driver using `Client.local`) asks the router
for a plan, hands it to the executor, and reads streamed text straight from the
expert replica that serves each attempt (`ExpertActor.read`). `Assembly` (no Ray)
turns both into the caller's events; this module only moves objects:

    router.plan(request)               1 call
    executor.stream(plan)              1 call, then a few record batches per plan
    replica.read(key)                  1 call per streamed attempt, coalesced text batches

Errors before the executor admitted the plan (bad input, full queue, an actor down)
are raised, so a server can still answer 4xx/429/503; after it, the driver ends the
stream with an `error` event (see `Team.stream`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.boundary import translate
from orchestration.assembly import Assembly, ReadOrder
from orchestration.config import StreamConfig
from orchestration.models import ExecutionPlan, ExecutorLoad
from orchestration.wire import Admitted, Closed, Finished


class LivePlan:
    """Events of one admitted plan whose text the caller reads as it is generated."""

    def __init__(self, plan: ExecutionPlan, executor: ActorHandle, gen: Any,
                 replica: Callable[[str], ActorHandle], stream: StreamConfig) -> None:
        self.plan = plan
        self.executor = executor
        self.gen = gen  # the executor's ObjectRefGenerator of record batches
        self.replica = replica
        self.config = stream
        self.assembly = Assembly(plan)
        self.finished = False
        self.first: list[Any] = []  # the records that came with `Admitted`
        self.admitted: ExecutorLoad | None = None  # the executor's load at admission
        self._pump: asyncio.Future[None] | None = None
        self._readers: list[asyncio.Future[None]] = []
        self._closed = False

    @classmethod
    async def open(cls, plan: ExecutionPlan, executor: ActorHandle,
                   replica: Callable[[str], ActorHandle], stream: StreamConfig) -> LivePlan:
        """Submit the plan and wait for admission (raises QueueFullError and the like)."""
        gen = executor.stream.options(
            num_returns="streaming",
            _generator_backpressure_num_objects=stream.backpressure_objects,
        ).remote(plan)
        try:
            first = await (await gen.__anext__())  # [Admitted, ...] or the admission error
        except BaseException as exc:
            ray.cancel(gen)
            if isinstance(exc, Exception):
                raise translate(exc, actor="executor") from None
            raise
        live = cls(plan, executor, gen, replica, stream)
        live.first = first
        if first and isinstance(first[0], Admitted):
            live.admitted = ExecutorLoad(active=first[0].active, queued=first[0].queued)
        return live

    async def events(self) -> AsyncIterator[Any]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        queue.put_nowait(("records", self.first))
        self._pump = asyncio.ensure_future(self._records(queue))
        try:
            while True:
                kind, item = await queue.get()
                if kind == "text":
                    for event in self.assembly.on_text(*item):
                        yield event
                    continue
                if kind == "error":
                    raise item
                step = self.assembly.on_records(item)
                # Readers of attempts whose text no longer counts are left to end: their
                # channels closed when the attempt ended, and the assembly ignores what
                # they still deliver. Cancelling them would cost a call per attempt and
                # stop nothing that would not stop anyway.
                self._readers += [asyncio.ensure_future(self._read(order, queue))
                                  for order in step.read]
                # Set before yielding `done`: the consumer may stop right after it.
                self.finished = step.done
                for event in step.events:
                    yield event
                if step.done:
                    return
        finally:
            await self.close()

    async def close(self) -> None:
        """End the plan's Ray work; idempotent. `events()` calls it on the way out, and
        its driver must too: a consumer that stops before `events()` ever ran (right
        after the `plan` event) closes a generator whose `finally` never runs."""
        if self._closed:
            return
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
        readers = self._readers
        if self.finished and readers:
            # Their attempts ended, so they end within a batch; wait (briefly) so no
            # task outlives the request, then stop any that still waits (an attempt
            # cancelled before it reached its replica never writes).
            await asyncio.wait(readers, timeout=self.config.max_hold_s + 1.0)
        for reader in readers:
            reader.cancel()
        if not self.finished:
            # The caller went away (or failed): nothing of this request may keep
            # running. Cancelling the stream cancels every task of the plan (the
            # executor's `stream` cancels its run on the way out), and each reader
            # stops its replica-side generator.
            ray.cancel(self.gen)

    async def _records(self, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        try:
            async for ref in self.gen:
                queue.put_nowait(("records", await ref))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the executor died mid-plan: the driver ends the stream
            queue.put_nowait(("error", translate(exc, actor="executor")))

    async def _read(self, order: ReadOrder, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        gen = self.replica(order.replica).read.options(
            num_returns="streaming",
            _generator_backpressure_num_objects=self.config.backpressure_objects,
        ).remote(order.key, order.offset, self.config.max_hold_s)
        ended = False
        try:
            async for ref in gen:
                text, _tokens = await ref
                queue.put_nowait(("text", (order.task_id, order.key, text)))
            ended = True
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: S110 - a reader that fails (replica died) loses nothing:
            pass  # the executor retries the attempt, and the final result fills any gap
        finally:
            if not ended:
                ray.cancel(gen)  # stop the replica-side reader we no longer listen to


async def settled_plan(plan: ExecutionPlan, executor: ActorHandle
                       ) -> tuple[ExecutorLoad, list[Any]]:
    """The executor's load at admission, and the events of a plan run to the end before
    anything is returned (no live text)."""
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
    return ExecutorLoad(active=admitted.active, queued=admitted.queued), step.events
