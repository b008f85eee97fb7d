"""One task's life: attempts, retries, fallback and deadlines, with no Ray.

`TaskRunner.run(state)` drives a task to exactly one `TaskResult`:

    within the task's deadline (`timeout_s`: the whole answer, retries included):
    for the task's expert, then its fallback (if any):
        up to `retry.attempts` attempts, backing off (jittered) between them:
            wait for a slot -> dispatch -> await the Completion
        transient failure (engine error, expert down): hand off, next attempt
        stalled (no first token, or no new token, in time; the expert says): hand off,
            next attempt on another replica — none left: the fallback
    the deadline passes: ends `timeout` at once (no new attempt, no fallback)
    under a latency budget (`budget_until`): a retry or a fallback whose expert's recent
        p50 latency does not fit what is left is not started; the task ends `budget`
        (a primary falls back early when its fallback fits; docs/budget.md)
    hedging (`executor.hedge`): an attempt without a first token after `after_s` is
        held and copied to another ready replica; the first of the two to claim its
        first token wins, the other is cancelled (docs/hedging.md)
    bad input: ends at once (no retry, no fallback)
    cancellation (the request was cancelled, or Ray cancelled the expert's call):
        ends `cancelled` at once: never retried, never sent to a fallback; a task its
        plan cut (`TaskRun.cut`: the budget, a quorum) ends with that reason

Every attempt after the first *continues* the answer so far (`TaskRun.answer`, sent as
the task's `prefix`), whether it runs on the same replica, another, or the fallback
(docs/failover.md). The hand-off after a failure settles that answer: the text the
failed attempt generated when the expert said (`TransientError.generated`), else —
when a caller reads the task live — the text the caller has (`Dispatcher.delivered`).
An answer that cannot be continued (`cannot_continue`) starts over while nobody has
seen any of it, and otherwise ends the task with `AnswerInterruptedError`.

The runner reaches experts only through a `Dispatcher` (the executor's Ray boundary
implements it; tests pass a fake), keeps each task's state in its `TaskRun`
(`orchestration.task_run`), and tells the caller what happens through `notify` (the
`Dispatched` / `Handoff` / `Retrying` records of `orchestration.wire`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from orchestration.config import HedgeConfig, RetryConfig
from orchestration.errors import (
    AnswerInterruptedError,
    BudgetError,
    ChorusError,
    DeadlineError,
    StalledError,
    TaskCancelledError,
    TransientError,
)
from orchestration.hedging import HedgePolicy, Race
from orchestration.latency import RecentLatency
from orchestration.models import ExpertTask, TaskResult, TaskStatus
from orchestration.scheduling import build_retrying
from orchestration.task_run import Dispatcher, Lease, TaskRun, status_of
from orchestration.tools import json_constraint
from orchestration.wire import Completion, Dispatched, Handoff, Record, Retrying, attempt_of

__all__ = ["Dispatcher", "Lease", "TaskRun", "TaskRunner", "cannot_continue", "status_of"]


def cannot_continue(task: ExpertTask) -> str | None:
    """Why an answer of `task` cannot be continued from a prefix, or None (it can).

    A constrained answer (JSON schema, forced tool call) is generated under a grammar
    from its first token; tool calls are parsed from the whole text; choices 2..n and
    logprobs exist only in the attempt that produced them."""
    sampling = task.sampling
    if json_constraint(sampling) is not None:
        return "a structured answer (response_format or a forced tool call)"
    if sampling.tools:
        return "an answer that may call tools"
    if sampling.n > 1:
        return f"an answer of {sampling.n} choices"
    if sampling.logprobs:
        return "an answer with logprobs"
    return None


class TaskRunner:
    """Runs tasks to one result each, under one retry policy and fallback map."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        retry: RetryConfig,
        fallbacks: dict[str, str | None],
        notify: Callable[[ExpertTask, Record], None] = lambda task, record: None,
        hedge: HedgeConfig | None = None,
        on_hedge: Callable[[str, str], None] = lambda expert, outcome: None,
    ) -> None:
        self.dispatcher = dispatcher
        self.retry = retry
        self.fallbacks = fallbacks
        self.notify = notify
        self.on_hedge = on_hedge  # (expert, "won" | "lost") of each hedge dispatched
        self.counters: Counter[str] = Counter()
        self.continued: Counter[str] = Counter()  # expert -> attempts that continued
        self.latency = RecentLatency()  # per expert: its recent successful attempts
        self.hedging = HedgePolicy(hedge or HedgeConfig(), self.latency)
        self.races: dict[str, Race] = {}  # attempt key -> the race it is held in

    async def run(self, state: TaskRun) -> TaskResult:
        """Always returns (never raises): cancellation becomes a `cancelled` result."""
        task = state.task
        candidates = [task.expert]
        if (fallback := self.fallbacks.get(task.expert)) is not None:
            candidates.append(fallback)
        try:
            for expert in candidates:
                try:
                    state.completion = await self._on(expert, state)
                    break
                except (TransientError, _NoOtherReplica, BudgetError) as exc:
                    # (a retry that cannot fit the budget: its fallback may still fit)
                    state.error = exc.error if isinstance(exc, _NoOtherReplica) else exc
        except asyncio.CancelledError:
            # The request was cancelled (caller gone), or its plan cut this task: end
            # now, whatever was pending.
            state.error = state.cut or TaskCancelledError(f"{task.expert}: request cancelled")
        except ChorusError as exc:
            state.error = exc  # bad input, Ray-cancelled call: neither retried nor passed on
        outcome = "succeeded" if state.completion else _COUNTER[status_of(state.error)]
        self.counters[outcome] += 1
        return state.result()

    def unrun(self, state: TaskRun, error: ChorusError) -> TaskResult:
        """The result, ending with `error`, of a task whose job never ran `run` to its
        end (cancelled before its first step, or a bug); counted like every other."""
        state.error = error
        self.counters[_COUNTER[status_of(state.error)]] += 1
        return state.result()

    async def _on(self, expert: str, state: TaskRun) -> Completion:
        """Attempts on one expert under the retry policy; raises its last error."""

        def waited(seconds: float) -> None:
            state.waits.append(seconds)
            self.counters["retried"] += 1
            reason = state.error.message if state.error else "transient failure"
            self.notify(state.task, Retrying(state.task.id, state.attempts, expert,
                                             seconds, reason))

        refused: list[BudgetError] = []

        def no_room(wait_s: float) -> bool:  # tenacity's stop: the budget left no room
            if (why := self._no_room(expert, state, wait_s)) is not None:
                refused.append(why)
            return why is not None

        try:
            async for attempt in build_retrying(self.retry, waited, no_room):
                with attempt:
                    try:
                        return await self._attempt(expert, state)
                    except TransientError as exc:
                        state.error = exc
                        await self._hand_off(expert, state, exc)
                        if isinstance(exc, StalledError):  # never the same replica again
                            state.stalled.add(state.replicas[state.current - 1])
                            if not self.dispatcher.others(expert, frozenset(state.stalled)):
                                raise _NoOtherReplica(exc) from None
                        raise
        except TransientError:
            if refused:
                raise refused[0] from None
            raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _no_room(self, expert: str, state: TaskRun, wait_s: float = 0.0) -> BudgetError | None:
        """Why another attempt on `expert` (after `wait_s`) cannot finish within the
        budget, by the expert's recent p50 latency; None when it can (or no budget)."""
        if state.budget_until is None:
            return None
        left = state.budget_until - time.monotonic() - wait_s
        p50 = self.latency.latency(expert)
        if left > 0 and (p50 is None or p50 <= left):
            return None
        needs = f", its recent p50 latency is {p50:.2f}s" if p50 is not None else ""
        last = f"; the last attempt: {state.error.message}" if state.error else ""
        return BudgetError(f"{expert}: no attempt started: {max(left, 0):.2f}s of the "
                           f"latency budget left{needs}{last}")

    async def _attempt(self, expert: str, state: TaskRun) -> Completion:
        task, left = state.task, state.remaining_s()
        if state.attempts and (why := self._no_room(expert, state)) is not None:
            raise why  # a retry or a fallback that cannot finish in the budget
        if left <= 0:  # nothing is started after the deadline
            raise DeadlineError(f"{expert}: no complete answer within the deadline of "
                                f"{task.timeout_s:g}s ({state.attempts} attempt(s) made)")
        try:
            async with asyncio.timeout(left):
                return await self._dispatch(expert, state)
        except TimeoutError:
            raise DeadlineError(f"{expert}: no complete answer within the deadline of "
                                f"{task.timeout_s:g}s (attempt {state.attempts})") from None

    async def _dispatch(self, expert: str, state: TaskRun) -> Completion:
        """One attempt; hedged when its first token is late (docs/hedging.md)."""
        slot = self.dispatcher.slot(expert, state.task, frozenset(state.stalled))
        after = self.hedging.after_s(expert)
        if after is None:
            return await self._run_attempt(expert, state, slot)
        launched: asyncio.Future[tuple[Lease, str]] = asyncio.get_running_loop().create_future()
        main = asyncio.ensure_future(self._run_attempt(expert, state, slot, launched))
        hedge: asyncio.Future[Completion] | None = None
        try:
            await asyncio.wait([main, launched], return_when=asyncio.FIRST_COMPLETED)
            if not main.done():
                await asyncio.wait([main], timeout=after)
            if main.done():
                return await main
            lease, key = launched.result()
            avoid = frozenset(state.stalled | {lease.replica})
            if not (self.hedging.allows(expert) and self.dispatcher.spare(expert, state.task,
                                                                          avoid)):
                return await main
            race = self.races[key] = Race(key)
            try:
                if not await self.dispatcher.hold(lease, key):
                    return await main  # its first token came meanwhile
                hedge = asyncio.ensure_future(self._run_attempt(
                    expert, state, self.dispatcher.slot(expert, state.task, avoid, spare=True),
                    race=race))
                return await self._race(expert, state, race, main, hedge)
            finally:
                for held in (race.first, race.second):
                    self.races.pop(held or "", None)
        finally:
            jobs = [job for job in (main, hedge) if job is not None]
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)

    async def _race(self, expert: str, state: TaskRun, race: Race,
                    main: asyncio.Future[Completion], hedge: asyncio.Future[Completion]
                    ) -> Completion:
        """The held attempt and its hedge until one wins: the first to claim its first
        token, or to finish, or the only one left. The loser is cancelled at once."""
        while race.winner is None:
            live = [job for job in (main, hedge) if not job.done()]
            if not live:
                return await main  # neither made a token: the held attempt's error
            await asyncio.wait([*live, race.decided], return_when=asyncio.FIRST_COMPLETED)
            for key, job in ((race.first, main), (race.second, hedge)):
                if key is not None and job.done() and not job.cancelled() \
                        and job.exception() is None:
                    race.decide(key)  # an answer without a token (nothing to claim)
        won = race.winner == race.second
        loser = main if won else hedge
        loser.cancel()
        await asyncio.gather(loser, return_exceptions=True)
        if race.second is not None:  # a hedge was dispatched (else nothing was hedged)
            outcome = "won" if won else "lost"
            state.hedges.append(outcome)
            self.counters[f"hedges_{outcome}"] += 1
            self.on_hedge(expert, outcome)
            if won:
                state.current = attempt_of(race.second)
        return await (hedge if won else main)

    def claim(self, key: str) -> bool:
        """A held attempt has its first token: may it send it? (`Race.claim`; an attempt
        no race knows any more lost it.)"""
        race = self.races.get(key)
        return race is not None and race.claim(key)

    async def _run_attempt(self, expert: str, state: TaskRun,
                           slot: AbstractAsyncContextManager[Lease],
                           launched: asyncio.Future[tuple[Lease, str]] | None = None,
                           race: Race | None = None) -> Completion:
        """One attempt: its slot, its record, its call; a hedge (in `race`) is held
        from its start."""
        task = state.task
        async with slot as lease:
            state.served_by.append(expert)
            state.replicas.append(lease.replica)
            key = state.key()
            if race is not None:
                race.second, self.races[key] = key, race
            else:
                state.current = state.attempts
            attempt_task = task.model_copy(update={"attempt": state.attempts,
                                                   "prefix": state.answer})
            state.continued_from.append(len(state.answer))
            if state.answer:
                self.continued[expert] += 1
            self.counters["dispatched"] += 1
            self.hedging.attempted(expert, race is not None)
            self.notify(task, Dispatched(task.id, state.attempts, expert, lease.replica, key,
                                          lease.actor, hedged=race is not None))
            if launched is not None:
                launched.set_result((lease, key))
            began = time.monotonic()
            try:
                completion = await (self.dispatcher.invoke(lease, attempt_task, key, gated=True)
                                    if race is not None else
                                    self.dispatcher.invoke(lease, attempt_task, key))
                self.latency.add(expert, time.monotonic() - began, completion.ttft_s)
                return completion
            except StalledError:
                lease.outcome = "failed"  # a replica that stalls is not healthy
                raise

    async def _delivered(self, expert: str, state: TaskRun) -> str:
        """The live caller's text, waited for within the task's deadline."""
        try:
            async with asyncio.timeout(max(state.remaining_s(), 0)):
                return await self.dispatcher.delivered(state.task, state.current)
        except TimeoutError:
            raise DeadlineError(
                f"{expert}: the answer broke off and its caller did not say what it had "
                f"received within the deadline of {state.task.timeout_s:g}s "
                f"(attempt {state.current})") from None

    async def _hand_off(self, expert: str, state: TaskRun, exc: TransientError) -> None:
        """Settle the answer the next attempt continues (see the module's docstring)."""
        task, why = state.task, cannot_continue(state.task)
        known = None if why or exc.generated is None else state.answer + exc.generated
        if self.dispatcher.live(task):
            self.notify(task, Handoff(task.id, state.current, known))
            answer = known if known is not None else await self._delivered(expert, state)
            if why and answer:
                raise AnswerInterruptedError(
                    f"{expert}: the answer broke off after {len(answer)} characters had "
                    f"reached the caller, and {why} cannot be continued "
                    f"(attempt {state.current}: {exc.message})")
        else:  # nobody has seen any of it: continue what is known, or start over
            answer = "" if why else known if known is not None else state.answer
        state.answer = answer


class _NoOtherReplica(Exception):
    """An attempt stalled and its expert has no other replica: try the fallback."""

    def __init__(self, error: StalledError) -> None:
        super().__init__(error.message)
        self.error = StalledError(f"{error.message}; no other replica of it to continue on")


_COUNTER = {TaskStatus.ERROR: "failed", TaskStatus.TIMEOUT: "timed_out",
            TaskStatus.CANCELLED: "cancelled", TaskStatus.BUDGET: "budget"}
