"""The caller's side of one plan: executor records and streamed text in, events out.

Text and control travel on two paths (docs/token-path.md): the executor's records
say which attempt of which task runs where and how each task ended; the replica's
session carries the text of every streamed attempt, keyed by attempt. The two paths
race: an attempt's first text may come before the record that dispatched it, and its
last text after the record that ended its task. `Assembly` merges them into the
caller's event sequence, and tells its driver (the Ray layer, `actors/caller.py`)
which replicas to open a session with. No I/O, no Ray.

Rules, per streamed task (the primary, a synthesis, or any task with `stream_experts`):
- text counts only from the task's *current* attempt; text of an earlier attempt is
  ignored, and text of a later one waits for its `Dispatched` record;
- a hedge (`Dispatched.hedged`) does not replace the current attempt: of the two, only
  the one that won sends text (docs/hedging.md), so the hedge's first text, or its
  hand-off, makes it current;
- one answer per task: every attempt after the first continues the text the caller
  has (a retry, another replica, the fallback expert alike; docs/failover.md), so its
  text is appended, and its deltas carry the new `attempt` (and expert);
- a `Handoff` record ends the failed attempt's text here: with the answer so far, the
  caller sends what it lacks of it; without, it tells the executor what it has
  (`Step.replies`), which is what the next attempt continues;
- when the task's result arrives, whatever part of its text had not been delivered is
  sent from the result, then the result itself: nothing is lost or sent twice,
  whichever path was faster.
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
from orchestration.wire import (
    Admitted,
    Closed,
    Dispatched,
    Finished,
    Handoff,
    Record,
    Retrying,
    attempt_of,
    task_of,
)


@dataclass
class Step:
    """What the driver does after feeding records: emit events, open replica sessions."""

    events: list[Any] = field(default_factory=list)
    read: list[str] = field(default_factory=list)  # actor names of replicas to read from
    # (task id, attempt, the text the caller has of its answer): for `executor.delivered`
    replies: list[tuple[str, int, str]] = field(default_factory=list)
    done: bool = False


@dataclass
class _Stream:
    """The caller's view of one streamed task."""

    task: ExpertTask
    expert: str | None = None  # expert of the current attempt
    attempt: int = 0
    key: str | None = None  # the attempt whose text counts (None: between attempts)
    actor: str = ""  # the replica actor the current attempt's text comes from
    sent: list[str] = field(default_factory=list)  # the answer sent so far, in pieces
    emitted: int = 0  # its length
    early: dict[str, list[str]] = field(default_factory=dict)  # text of later attempts
    # A hedge of the current attempt: only the winner of the two sends text, so its
    # first text (or its hand-off) makes it current; `blind`: its text session broke.
    hedge: Dispatched | None = None
    blind: bool = False

    def switch(self, record: Dispatched) -> None:
        """Attempt `record` is the one whose text counts from now on (none of a hedge
        whose text session broke: its result fills the answer)."""
        blind = self.blind and record is self.hedge
        self.expert, self.attempt, self.actor = record.expert, record.attempt, record.actor
        self.key = None if blind else record.key
        self.hedge, self.blind = None, False

    def text(self) -> str:
        if len(self.sent) > 1:
            self.sent[:] = ["".join(self.sent)]
        return self.sent[0] if self.sent else ""


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
            elif isinstance(record, Handoff):
                self._handoff(record, step)
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

    def on_text(self, key: str, text: str) -> list[Any]:
        stream = self.streams.get(task_of(key))
        if stream is None or not text:
            return []  # not streamed here, or the task already ended
        if key != stream.key and stream.hedge is not None and key == stream.hedge.key:
            stream.switch(stream.hedge)  # the hedge won: it sends text, the other never will
        if key != stream.key:
            if attempt_of(key) > stream.attempt:  # its `Dispatched` is still on its way
                stream.early.setdefault(key, []).append(text)
            return []  # an earlier attempt's text (its task moved on)
        return self._accept(stream, text)

    def text_lost(self, actor: str) -> None:
        """The text session of replica `actor` broke: what it had in flight may be lost,
        so later text of the attempts it carried would leave a gap. None of it is taken;
        the attempt's hand-off or its result fills the answer from what was taken."""
        for stream in self.streams.values():
            if stream.key is not None and stream.actor == actor:
                stream.key = None
            if stream.hedge is not None and stream.hedge.actor == actor:
                stream.blind = True

    def done(self) -> DoneEvent:
        primary = self.results.get(self.plan.primary.id)
        experts = [self.results[t.id] for t in self.plan.experts if t.id in self.results]
        return DoneEvent(request_id=self.request_id, primary=primary, experts=experts)

    # ------------------------------------------------------------------ internals

    def _dispatched(self, record: Dispatched, step: Step) -> None:
        task = self.tasks[record.task_id]
        step.events.append(TaskEvent(
            request_id=self.request_id, task_id=task.id, expert=record.expert, role=task.role,
            state="running", attempt=record.attempt, replica=record.replica,
            hedged=record.hedged))
        stream = self.streams.get(task.id)
        if stream is None:
            return
        step.read.append(record.actor)
        if record.hedged and record.key not in stream.early:
            stream.hedge, stream.blind = record, False  # current only once it sends text
            return
        stream.switch(record)
        for key in [k for k in stream.early if attempt_of(k) <= record.attempt]:
            pieces = stream.early.pop(key)
            if key == record.key:
                for text in pieces:
                    step.events += self._accept(stream, text)

    def _handoff(self, record: Handoff, step: Step) -> None:
        stream = self.streams.get(record.task_id)
        if stream is not None and stream.hedge is not None \
                and record.attempt == stream.hedge.attempt:
            stream.switch(stream.hedge)  # the hedge won, and broke off before its text came
        if stream is None or record.attempt != stream.attempt:
            return  # not streamed here (the executor thinks otherwise: nothing to say)
        stream.key = None  # the failed attempt's late text is not part of the answer
        for key in [k for k in stream.early if attempt_of(k) <= record.attempt]:
            del stream.early[key]
        if record.answer is None:
            step.replies.append((record.task_id, record.attempt, stream.text()))
        elif (rest := record.answer[stream.emitted:]) and record.answer.startswith(stream.text()):
            step.events += self._accept(stream, rest)

    def _accept(self, stream: _Stream, text: str) -> list[Any]:
        """Text of the current attempt: appended to the answer."""
        stream.sent.append(text)
        stream.emitted += len(text)
        return [self._delta(stream, text)]

    def _finished(self, result: TaskResult, step: Step) -> None:
        self.results[result.task_id] = result
        stream = self.streams.get(result.task_id)
        if stream is not None:
            if stream.hedge is not None and result.hedges[-1:] == ["won"]:
                stream.switch(stream.hedge)  # the rest below is the hedge's
            stream.key, stream.early, stream.hedge = None, {}, None
            if result.ok and result.result is not None:
                stream.expert = (result.served_by or [result.expert])[-1]
                if rest := result.result[stream.emitted:]:
                    step.events += self._accept(stream, rest)
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
