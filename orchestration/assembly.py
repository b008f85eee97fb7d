"""The caller's side of one plan: executor records and streamed text in, events out.

Text and control travel on two paths (docs/token-path.md): the executor's records
say which attempt of which task runs where and how each task ended; the expert's
channel carries the text of a streamed attempt. `Assembly` merges them into the
caller's event sequence, and tells its driver (the Ray layer, `actors/caller.py`)
which channel to read from. A reader of an attempt that no longer counts is not
stopped: its channel closed when the attempt ended, and its text is ignored here.
No I/O, no Ray.

Rules, per streamed task (the primary, a synthesis, or any task with `stream_experts`):
- text counts only from the task's *current* attempt; a lagging reader of an earlier
  attempt is ignored;
- a retry on the same expert replays the same text (same seed), so its reader starts
  after what the caller already has; a fallback expert's answer differs, so it
  restarts from the beginning, and its deltas carry the new `attempt`;
- when the task's result arrives, whatever part of its text the reader had not yet
  delivered is sent from the result, then the result itself: nothing is lost or
  sent twice, whichever path was faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestration.models import (
    DoneEvent,
    ExecutionPlan,
    ExpertDelta,
    ExpertEvent,
    ExpertTask,
    PrimaryDelta,
    TaskEvent,
    TaskResult,
)
from orchestration.wire import Admitted, Closed, Dispatched, Finished, Record, Retrying


@dataclass(frozen=True)
class ReadOrder:
    """Start reading attempt `key` of a task from `replica`, from character `offset`."""

    task_id: str
    replica: str
    key: str
    offset: int


@dataclass
class Step:
    """What the driver does after feeding records: emit events, start readers."""

    events: list[Any] = field(default_factory=list)
    read: list[ReadOrder] = field(default_factory=list)
    done: bool = False


@dataclass
class _Stream:
    """The caller's view of one streamed task."""

    task: ExpertTask
    expert: str | None = None  # expert of the current attempt
    attempt: int = 0
    key: str | None = None  # the attempt whose text counts
    emitted: int = 0  # characters of the current expert's answer already sent


class Assembly:
    """Per-request state on the caller's side."""

    def __init__(self, plan: ExecutionPlan, live: bool = True) -> None:
        self.plan = plan
        self.request_id = plan.request_id
        self.tasks = {task.id: task for task in plan.tasks}
        self.streams = {t.id: _Stream(t) for t in plan.tasks if live and t.stream}
        self.results: dict[str, TaskResult] = {}

    def on_records(self, records: list[Record]) -> Step:
        step = Step()
        for record in records:
            if isinstance(record, Dispatched):
                self._dispatched(record, step)
            elif isinstance(record, Retrying):
                task = self.tasks[record.task_id]
                step.events.append(TaskEvent(
                    request_id=self.request_id, task_id=task.id, expert=record.expert,
                    role=task.role, state="retrying", attempt=record.attempt,
                    reason=record.reason))
            elif isinstance(record, Finished):
                self._finished(record.result, step)
            elif isinstance(record, Closed):
                step.events.append(self.done())
                step.done = True
            elif not isinstance(record, Admitted):
                raise TypeError(f"unexpected record {record!r}")
        return step

    def on_text(self, task_id: str, key: str, text: str) -> list[Any]:
        stream = self.streams.get(task_id)
        if stream is None or key != stream.key or not text:
            return []  # an earlier attempt's reader, or the task already ended
        stream.emitted += len(text)
        return [self._delta(stream, text)]

    def done(self) -> DoneEvent:
        primary = self.results.get(self.plan.primary.id)
        experts = [self.results[t.id] for t in self.plan.experts if t.id in self.results]
        return DoneEvent(request_id=self.request_id, primary=primary, experts=experts)

    # ------------------------------------------------------------------ internals

    def _dispatched(self, record: Dispatched, step: Step) -> None:
        task = self.tasks[record.task_id]
        step.events.append(TaskEvent(
            request_id=self.request_id, task_id=task.id, expert=record.expert, role=task.role,
            state="running", attempt=record.attempt, replica=record.replica))
        stream = self.streams.get(task.id)
        if stream is None:
            return
        if record.expert != stream.expert:  # first attempt, or a fallback: restart
            stream.expert, stream.emitted = record.expert, 0
        stream.attempt, stream.key = record.attempt, record.key
        step.read.append(ReadOrder(task.id, record.replica, record.key, stream.emitted))

    def _finished(self, result: TaskResult, step: Step) -> None:
        self.results[result.task_id] = result
        stream = self.streams.get(result.task_id)
        if stream is not None:
            stream.key = None
            if result.ok and result.result is not None:
                if stream.expert != (result.served_by or [result.expert])[-1]:
                    stream.expert, stream.emitted = result.served_by[-1], 0
                rest = result.result[stream.emitted:]
                if rest:
                    stream.emitted += len(rest)
                    step.events.append(self._delta(stream, rest))
        if self.tasks[result.task_id].role == "expert":
            step.events.append(ExpertEvent(request_id=self.request_id, result=result))

    def _delta(self, stream: _Stream, text: str) -> Any:
        task = stream.task
        if task.role == "expert":
            return ExpertDelta(request_id=self.request_id, task_id=task.id,
                               expert=stream.expert or task.expert, delta=text,
                               attempt=stream.attempt)
        return PrimaryDelta(request_id=self.request_id, expert=stream.expert or task.expert,
                            delta=text, attempt=stream.attempt)
