"""The caller's sessions and routing under every interleaving, with fake actors (no Ray).

A stateful property test: calls are submitted, dispatched, streamed, finished, hung up,
and the executor's or the replica's session breaks, in any order. After every step:
each call's events are a prefix of one answer and end with at most one terminal event;
a call closed before its plan ended cancelled it exactly once, and one that ended
cancelled nothing; a broken executor session ends every call on it with its error; and
once every call is closed the caller keeps no state about any of them.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import actors.caller as caller_module
from actors.caller import Caller
from orchestration.call import Call
from orchestration.config import StreamConfig
from orchestration.errors import ChorusError
from orchestration.models import ExecutionPlan, ExpertTask, TaskResult, TaskStatus
from orchestration.wire import Admitted, Closed, Dispatched, Finished, Handoff

ANSWER = "one two three four"


class _Ref:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        return self.value


class _Stream:
    """A session's streaming generator: what the test puts, or the failure it raises."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> _Ref:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return _Ref(item)


class _Method:
    def __init__(self, call: Any) -> None:
        self.call = call

    def options(self, **_options: Any) -> _Method:
        return self

    def remote(self, *args: Any) -> Any:
        return self.call(*args)


class _Id:
    def __init__(self, name: str) -> None:
        self.name = name

    def hex(self) -> str:
        return self.name


class FakeExecutor:
    def __init__(self, name: str) -> None:
        self._actor_id = _Id(name)
        self.streams: list[_Stream] = []
        self.cancels: list[str] = []
        self.replies: dict[tuple[str, int], str] = {}  # the caller's answers to hand-offs
        self.session = _Method(self._session)
        self.submit = _Method(self._submit)
        self.cancel = _Method(self.cancels.append)
        self.delivered = _Method(self._delivered)

    def _delivered(self, task_id: str, attempt: int, text: str) -> None:
        self.replies[(task_id, attempt)] = text

    def _session(self, _caller: str) -> _Stream:
        self.streams.append(_Stream())
        return self.streams[-1]

    async def _submit(self, _plan: Any, _caller: str) -> Admitted:
        await asyncio.sleep(0)
        return Admitted(0, 0)


class FakeReplica:
    def __init__(self) -> None:
        self.streams: list[_Stream] = []
        self.session = _Method(self._session)

    def _session(self, _caller: str, _hold: float) -> _Stream:
        self.streams.append(_Stream())
        return self.streams[-1]


def _plan(n: int) -> ExecutionPlan:
    primary = ExpertTask(id=f"t{n}", expert="a", prompt="p", role="primary", stream=True)
    return ExecutionPlan(request_id=f"r{n}", strategy="SERIAL", primary=primary)


class CallerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.cancels: list[Any] = []  # generators the caller cancelled (fakes: not Ray's)
        self._ray_cancel = caller_module.ray.cancel
        caller_module.ray.cancel = self.cancels.append  # type: ignore[assignment]
        self.replica = FakeReplica()
        self.executor = FakeExecutor("x1")
        self.caller = Caller("me", StreamConfig(), lambda name: self.replica)
        self.calls: dict[int, dict[str, Any]] = {}
        self.numbers = itertools.count()

    def teardown(self) -> None:
        for state in self.calls.values():
            state["consumer"].cancel()
        self.caller.shutdown()
        self._settle()
        self.loop.close()
        caller_module.ray.cancel = self._ray_cancel  # type: ignore[assignment]

    def _settle(self) -> None:
        for _ in range(6):
            self.loop.run_until_complete(asyncio.sleep(0))

    def _open(self) -> list[dict[str, Any]]:
        return [s for s in self.calls.values() if not s["closed"]]

    async def _consume(self, state: dict[str, Any]) -> None:
        try:
            async for event in self.caller.events(state["call"]):
                state["events"].append(event)
        except ChorusError as exc:
            state["lost"] = exc
        finally:
            self.caller.close(state["call"])
            state["closed"] = True

    # ------------------------------------------------------------------ rules

    @rule()
    def submit(self) -> None:
        n = next(self.numbers)
        call = Call(None, plan=_plan(n))
        self.loop.run_until_complete(self.caller.submit(call, self.executor))
        state = {"call": call, "events": [], "closed": False, "lost": None, "sent": 0,
                 "attempt": 0, "finished": False, "session": self.executor.streams[-1],
                 "orphaned": False}
        state["consumer"] = self.loop.create_task(self._consume(state))
        self.calls[n] = state
        self._settle()

    @precondition(lambda self: self._open())
    @rule(data=st.data())
    def dispatch(self, data: Any) -> None:
        state = data.draw(st.sampled_from(self._open()))
        plan = state["call"].plan
        if state["attempt"]:  # a retry: the hand-off settles what it continues
            known = data.draw(st.booleans())  # the expert said what it had generated
            answer = ANSWER[:state["sent"]] if known else None
            self._records(plan.request_id, [Handoff(plan.primary.id, state["attempt"], answer)])
            if not known:  # the caller said what it has; gone, it said nothing
                reply = self.executor.replies.get((plan.primary.id, state["attempt"]))
                if reply is not None:
                    assert ANSWER.startswith(reply)
                    state["sent"] = len(reply)
        state["attempt"] += 1  # it continues from ANSWER[sent:]
        record = Dispatched(plan.primary.id, state["attempt"], "a", "a#0",
                            f"{plan.primary.id}:{state['attempt']}", "replica-a")
        self._records(plan.request_id, [record])

    @precondition(lambda self: self._open())
    @rule(data=st.data(), size=st.integers(1, 5))
    def text(self, data: Any, size: int) -> None:
        state = data.draw(st.sampled_from(self._open()))
        if not self.replica.streams or state["attempt"] == 0:
            return  # no session yet (it opens on the first Dispatched)
        start = state["sent"]
        piece = ANSWER[start:start + size]
        state["sent"] += len(piece)
        key = f"{state['call'].plan.primary.id}:{state['attempt']}"
        self.replica.streams[-1].queue.put_nowait([(key, piece, 1)])
        self._settle()

    @precondition(lambda self: self._open())
    @rule(data=st.data())
    def finish(self, data: Any) -> None:
        state = data.draw(st.sampled_from(self._open()))
        plan = state["call"].plan
        result = TaskResult(task_id=plan.primary.id, expert="a", role="primary",
                            status=TaskStatus.SUCCESS, result=ANSWER, served_by=["a"],
                            attempts=max(1, state["attempt"]))
        state["finished"] = True
        self._records(plan.request_id, [Finished(result), Closed()])

    @precondition(lambda self: self._open())
    @rule(data=st.data())
    def hang_up(self, data: Any) -> None:
        state = data.draw(st.sampled_from(self._open()))
        state["consumer"].cancel()
        self._settle()

    @precondition(lambda self: self.executor.streams)
    @rule()
    def executor_dies(self) -> None:
        dying = self.executor.streams[-1]
        for state in self._open():
            state["orphaned"] |= state["session"] is dying
        dying.queue.put_nowait(RuntimeError("executor died"))
        self._settle()

    @precondition(lambda self: self.replica.streams)
    @rule()
    def replica_dies(self) -> None:
        self.replica.streams[-1].queue.put_nowait(RuntimeError("replica died"))
        self._settle()

    def _records(self, request_id: str, records: list[Any]) -> None:
        if self.executor.streams:
            self.executor.streams[-1].queue.put_nowait([(request_id, r) for r in records])
        self._settle()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def each_call_is_one_answer_with_at_most_one_end(self) -> None:
        for state in self.calls.values():
            events = state["events"]
            text = "".join(e.delta for e in events if e.type == "primary")
            assert ANSWER.startswith(text)
            ends = [e for e in events if e.type == "done"]
            assert len(ends) <= 1 and (not ends or events[-1] is ends[0])
            if ends:
                assert text == ANSWER  # the result filled what the text path missed
            if state["lost"] is not None:
                assert not ends

    @invariant()
    def a_plan_is_cancelled_once_and_only_if_its_caller_left_first(self) -> None:
        for state in self.calls.values():
            rid = state["call"].request_id
            cancels = self.executor.cancels.count(rid)
            if not state["closed"]:
                assert cancels == 0
            elif any(e.type == "done" for e in state["events"]) or state["lost"] is not None:
                assert cancels == 0  # its plan had ended: nothing to cancel
            else:
                assert cancels == 1

    @invariant()
    def a_broken_executor_session_ends_every_call_on_it(self) -> None:
        for state in self.calls.values():
            if state["orphaned"] and not any(e.type == "done" for e in state["events"]):
                assert state["closed"] and (state["lost"] is not None
                                            or state["consumer"].cancelled())

    @invariant()
    def nothing_is_kept_about_closed_calls(self) -> None:
        live = {s["call"].request_id for s in self._open()}
        assert set(self.caller.calls) <= live
        assert {c.request_id for c in self.caller.tasks.values()} <= live


TestCaller = CallerMachine.TestCase
TestCaller.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)


def test_text_after_a_replica_session_broke_is_not_taken_across_the_gap() -> None:
    """The interleaving a CI run found: a replica's text session breaks while a piece of
    an attempt is in flight, and the attempt's next piece comes on a new session. The
    caller takes nothing after the gap; the attempt's result fills the answer."""
    machine = CallerMachine()
    try:
        def dispatched(n: int) -> None:
            state = machine.calls[n]
            state["attempt"] = 1
            task = state["call"].plan.primary.id
            machine._records(f"r{n}", [Dispatched(task, 1, "a", "a#0", f"{task}:1", "replica-a")])

        def text(n: int, piece: str) -> None:
            machine.replica.streams[-1].queue.put_nowait([(f"t{n}:1", piece, 1)])
            machine._settle()

        machine.submit()
        dispatched(0)
        text(0, "one ")
        machine.replica_dies()
        text(0, "two ")  # on the broken session: never read
        machine.submit()
        dispatched(1)  # opens a new session on the same replica
        text(0, "three ")  # the same attempt's next piece: after a gap
        machine.each_call_is_one_answer_with_at_most_one_end()
        shown = "".join(e.delta for e in machine.calls[0]["events"] if e.type == "primary")
        assert shown == "one "
        result = TaskResult(task_id="t0", expert="a", role="primary", status=TaskStatus.SUCCESS,
                            result=ANSWER, served_by=["a"], attempts=1)
        machine._records("r0", [Finished(result), Closed()])
        events = machine.calls[0]["events"]
        assert "".join(e.delta for e in events if e.type == "primary") == ANSWER
        assert events[-1].type == "done"
    finally:
        machine.teardown()

