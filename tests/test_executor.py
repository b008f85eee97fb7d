"""The actor core on a real local Ray instance, with mock experts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from actors.team import Team
from orchestration.client import Client
from orchestration.errors import QueueFullError
from orchestration.models import (
    DoneEvent,
    ExecutionPlan,
    ExecutionStrategy,
    ExpertEvent,
    ExpertTask,
    OrchestrateRequest,
    PrimaryDelta,
    TaskStatus,
)
from tests.conftest import make_config, until

pytestmark = pytest.mark.usefixtures("ray_session")


async def _expert_stats(team: Team, name: str) -> dict[str, Any]:
    return await team.experts[name].stats.remote()


async def _collect(team: Team, plan: ExecutionPlan) -> list[Any]:
    _admitted, results = await team.executor.run.remote(plan)
    return results


def _single(expert: str, rank: int, request: str, timeout_s: float = 30) -> ExecutionPlan:
    task = ExpertTask(expert=expert, prompt=request, role="primary", weight=rank,
                      rank=rank, request_id=request, timeout_s=timeout_s)
    return ExecutionPlan(request_id=request, strategy=ExecutionStrategy.SERIAL, primary=task)


async def test_rank_orders_dispatch_across_plans() -> None:
    # The blocker hangs on `code` and holds the only in-flight slot; the rest queue behind.
    config = make_config(executor={"max_in_flight": 1},
                         experts={"code": {"mock": {"hang_every": 1}}})
    team = await Team.start(config, f"prio-{uuid.uuid4().hex[:6]}")
    try:
        blocker = asyncio.ensure_future(_collect(team, _single("code", 10, "blocker")))
        await until(lambda: _active(team, "code", 1), what="blocker running")
        queued = [("a-low", 1), ("b-high", 30), ("c-mid", 5), ("d-high", 30), ("e-low", 1),
                  ("f-top", 40), ("g-mid", 5)]
        plans = [_single("general", p, name) for name, p in queued]
        jobs = []
        for count, plan in enumerate(plans, start=1):
            jobs.append(asyncio.ensure_future(_collect(team, plan)))
            await until(lambda n=count: _queued(team, n), what="task queued")
        await team.executor.cancel.remote("blocker")
        await asyncio.gather(blocker, *jobs)
        seen = await team.experts["general"].history.remote()
        order = [req.split(":")[0] for req, _ in seen]
        by_task = {p.primary.id: p.request_id for p in plans}
        assert [by_task[t] for t in order] == [
            "f-top", "b-high", "d-high", "c-mid", "g-mid", "a-low", "e-low"]
        assert [prio for _, prio in seen] == [40, 30, 30, 5, 5, 1, 1]
    finally:
        team.shutdown()


async def test_a_caller_that_stops_right_after_the_plan_cancels_every_task() -> None:
    # The consumer closes the stream before it ever read past `plan`: the events
    # generator never started, so only the driver's own cleanup can cancel the plan.
    config = make_config(experts={"general": {"mock": {"hang_every": 1}}})
    team = await Team.start(config, f"hangup-{uuid.uuid4().hex[:6]}")
    try:
        stream = team.stream(OrchestrateRequest(prompt="hi", experts=[], timeout_s=300))
        first = await stream.__anext__()
        assert first.type == "plan"
        await until(lambda: _active(team, "general", 1), what="the task running")
        await stream.aclose()

        async def drained() -> bool:
            load = await team.executor.load.remote()
            return (load.active, load.queued) == (0, 0)

        await until(drained, what="the executor empty")
        assert (await _expert_stats(team, "general"))["cancelled"] == 1
    finally:
        team.shutdown()


async def _active(team: Team, expert: str, n: int) -> bool:
    return (await _expert_stats(team, expert))["active"] == n


async def _queued(team: Team, n: int) -> bool:
    return (await team.executor.load.remote()).queued == n


async def test_fifty_plans_respect_every_bound() -> None:
    limits = {"general": 3, "code": 2, "math": 2, "critic": 1}
    config = make_config(
        executor={"max_in_flight": 6},
        experts={name: {"max_concurrency": n, "mock": {"ttft_s": 0.02, "tokens": 6}}
                 for name, n in limits.items()},
    )
    strategies = list(ExecutionStrategy)
    async with Client.local(config) as client:
        results = await asyncio.gather(*(
            client.run("review python code and calculate the sum", strategy=strategies[i % 3],
                       experts=["code", "math", "critic"])
            for i in range(50)
        ))
        stats = await client.stats()
    assert all(r.primary.ok and len(r.experts) == 3 for r in results)
    executor = stats["executor"]
    assert executor["peak_in_flight"] == 6  # reached, never exceeded
    assert executor["outstanding_refs"] == 0 and executor["active"] == 0
    for name, limit in limits.items():
        assert 1 <= stats["experts"][name]["peak_active"] <= limit, name
    peaks = executor["peak_plan_in_flight"]
    assert peaks["SERIAL"] == 1 and peaks["PARALLEL_LIMITED"] <= 2
    assert peaks["PARALLEL_FULL"] <= 4
    assert executor["counters"]["dispatched"] == 200 == executor["counters"]["succeeded"]


async def test_a_silent_attempt_is_cancelled_at_its_ttft_limit_and_never_retried_there() -> None:
    config = make_config(experts={"general": {"mock": {"hang_every": 1}}},
                         executor={"ttft_timeout_s": 0.3})
    async with Client.local(config) as client:
        events = [e async for e in client.stream("hello")]
        error = events[-1]
        assert error.type == "error" and error.code == "primary_timeout"
        assert "no first token within 0.3s" in error.message
        assert "no other replica" in error.message and "after 1 attempt(s)" in error.message
        team = client.team
        await until(lambda: _active(team, "general", 0), what="engine idle")
        stats = await _expert_stats(team, "general")
        assert stats["cancelled"] == 1 and stats["requests"] == 1  # the engine freed it
        executor = await team.executor.stats.remote()
        assert executor["counters"]["timed_out"] == 1 and executor["outstanding_refs"] == 0


async def test_the_deadline_cancels_and_no_retry_starts_after_it() -> None:
    config = make_config(experts={"general": {"mock": {"hang_every": 1}}})
    async with Client.local(config) as client:
        team = client.team
        before = (await team.executor.stats.remote())["counters"].get("dispatched", 0)
        _, results = await team.executor.run.remote(_single("general", 10, "r2", timeout_s=0.3))
        assert results[0].status is TaskStatus.TIMEOUT and results[0].attempts == 1
        assert "deadline of 0.3s" in results[0].error
        after = (await team.executor.stats.remote())["counters"]["dispatched"]
        assert after - before == 1


async def test_engine_errors_are_retried_with_the_seeds_waits() -> None:
    config = make_config(experts={"general": {"mock": {"fail_every": 1}}},
                         executor={"retry": {"jitter": 0}})  # the seeds' exact waits
    async with Client.local(config) as client:
        _, results = await client.team.executor.run.remote(_single("general", 10, "r3"))
    assert results[0].status is TaskStatus.ERROR and results[0].attempts == 3
    assert results[0].retry_waits == [0.2, 0.4]


async def test_chaos_schedule_of_the_seeds() -> None:
    async with Client.local("config/chaos.yaml") as client:
        prompts = ["review python code", "calculate the sum", "hello", "check this bug"]
        streams = await asyncio.gather(*(
            _events(client, prompts[i % 4]) for i in range(30)
        ))
        stats = await client.stats()
    for events in streams:
        terminal = [e for e in events if e.type in ("done", "error")]
        assert len(terminal) == 1 and events[-1] is terminal[0]
        plan = events[0].plan
        expert_results = [e.result for e in events if isinstance(e, ExpertEvent)]
        assert sorted(r.task_id for r in expert_results) == sorted(t.id for t in plan.experts)
        if isinstance(terminal[0], DoneEvent):
            primary = terminal[0].primary
            # A failed primary is stood in for by a specialist (fusion), never lost.
            assert primary.ok or (primary.attempts == 3 and primary.error) or (
                primary.error_code == "stalled")
            assert [r.task_id for r in terminal[0].experts] == [t.id for t in plan.experts]
        else:  # engine errors, retried 3 times; or a stall, on its only replica
            message = terminal[0].message
            assert ("after 3 attempt(s)" in message and "CUDA" in message) or (
                "no first token within 3s" in message and "no other replica" in message)
        for result in expert_results:
            assert result.ok or (result.attempts == 3 and result.error) or (
                result.error_code == "stalled")
            # The seeds' 0.2 s / 0.4 s, each scaled by 1 ± 0.5 (the default jitter).
            assert len(result.retry_waits) == result.attempts - 1
            for wait, centre in zip(result.retry_waits, [0.2, 0.4], strict=False):
                assert centre * 0.5 <= wait <= centre * 1.5
    counters = stats["executor"]["counters"]
    assert counters["retried"] > 0 and counters.get("timed_out", 0) + counters["succeeded"] > 0


async def _events(client: Client, prompt: str, **options: Any) -> list[Any]:
    return [e async for e in client.stream(prompt, **options)]


async def test_crashed_expert_is_restarted_and_the_task_retried() -> None:
    config = make_config(experts={"code": {"max_restarts": 2, "mock": {"crash_every": 2}}})
    async with Client.local(config) as client:
        first = await client.run("python code", experts=["code"])
        assert first.experts[0].ok and first.experts[0].attempts == 1
        second = await client.run("python code", experts=["code"])
        # Not streamed, the plan is replayed after it ended: the request's total still
        # counts from its arrival, so it covers the task (a crash and a retry).
        assert second.timings["total_s"] >= second.experts[0].latency_s > 0
        code = second.experts[0]
        # The retry waited for the restarted process (it is the only replica): one attempt
        # lost to the crash, whatever the time the restart takes.
        assert code.ok and code.attempts == 2 and code.served_by == ["code", "code"]

        async def restart_seen() -> bool:  # the supervisor reads Ray's table when it sees it
            stats = await client.stats()
            return stats["experts"]["code"]["replicas"]["code#0"]["ray_restarts"] == 1

        await until(restart_seen, what="the supervisor seeing Ray's restart")
        stats = await client.stats()
    assert stats["experts"]["code"]["reconstructed"] is True
    assert stats["experts"]["code"]["requests"] == 1  # a fresh process served the retry


async def _exported_retries(expert: str) -> float:
    """`ray_chorus_retries_total` for `expert` (summed over workers) on this node."""
    import httpx
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_chorus_retries_total{") and f'expert="{expert}"' in line)


async def test_failed_expert_does_not_fail_the_plan() -> None:
    config = make_config(experts={"math": {"mock": {"fail_every": 1}}})
    async with Client.local(config) as client:
        events = await _events(client, "calculate the sum", primary="general")
        async def retries_exported() -> bool:
            return await _exported_retries("math") >= 2

        await until(retries_exported, timeout=60,
                    what="the two retries on Ray's Prometheus endpoint")
    kinds = [e.type for e in events]
    assert kinds[0] == "plan" and kinds[-2:] == ["fusion", "done"]
    assert kinds.count("primary") >= 2
    math = next(e.result for e in events if isinstance(e, ExpertEvent))
    assert math.status is TaskStatus.ERROR and math.attempts == 3
    assert "CUDA kernel overload" in math.error
    assert events[-1].primary.ok and math in events[-1].experts


async def test_first_delta_arrives_before_the_engine_produces_its_second_token() -> None:
    config = make_config(experts={"general": {"mock": {"tokens": 6, "token_latency_s": 0.3}}})
    async with Client.local(config) as client:
        team = client.team
        deltas: list[str] = []
        at_first_delta = None
        async for event in client.stream("hello"):
            if isinstance(event, PrimaryDelta):
                if not deltas:
                    at_first_delta = await _expert_stats(team, "general")
                deltas.append(event.delta)
            elif isinstance(event, DoneEvent):
                final = event.primary.result
    # The engine had produced one token (five more were due, 0.3 s apart) when the
    # first delta reached us: coalescing never holds back the first delta.
    assert (at_first_delta["tokens_out"], at_first_delta["active"]) == (1, 1)
    assert "".join(deltas) == final and len(deltas) >= 2


async def test_queue_bound_refuses_at_once_and_keeps_serving() -> None:
    config = make_config(executor={"max_in_flight": 1, "max_queue": 3},
                         experts={"general": {"mock": {"ttft_s": 0.5, "tokens": 2}}})
    async with Client.local(config) as client:
        accepted, refused = [], 0
        for i in range(8):
            stream = client.stream(f"hello {i}")
            try:
                first = await stream.__anext__()
            except QueueFullError as exc:
                assert "max_queue=3" in exc.message
                refused += 1
                continue
            assert first.type == "plan"
            accepted.append(asyncio.ensure_future(_drain(first, stream)))
        assert 3 <= len(accepted) <= 4 and refused == 8 - len(accepted)
        finished = await asyncio.gather(*accepted)
        assert all(events[-1].type == "done" for events in finished)
        again = await client.run("after the flood")
        assert again.primary.ok
        stats = await client.stats()
        assert stats["executor"]["counters"]["refused"] == refused


async def _drain(first: Any, stream: Any) -> list[Any]:
    return [first] + [e async for e in stream]


async def test_synthesize_fusion_streams_the_synthesizers_answer() -> None:
    config = make_config(fusion={"strategy": "synthesize", "synthesizer": "critic"},
                         experts={"math": {"mock": {"fail_every": 1}}})
    async with Client.local(config) as client:
        events = await _events(client, "review the python code and calculate the sum")
    kinds = [e.type for e in events]
    assert kinds.count("fusion_delta") >= 2 and kinds[-2:] == ["fusion", "done"]
    assert kinds.index("fusion_delta") > max(i for i, k in enumerate(kinds) if k == "expert")
    fusion = events[-2]
    streamed = "".join(e.delta for e in events if e.type == "fusion_delta")
    assert fusion.content == streamed and fusion.content.startswith("[critic]")
    assert [(r.expert, r.status.value) for r in fusion.failed] == [("math", "error")]
    assert events[-1].content == fusion.content


async def test_dead_primary_with_no_restarts_left_is_a_clear_503() -> None:
    config = make_config(experts={"general": {"max_restarts": 0, "mock": {"crash_every": 1}}})
    async with Client.local(config) as client:
        events = await _events(client, "hello")
        stats = await client.stats()
    error = events[-1]
    assert error.type == "error" and error.code == "no_healthy_expert" and error.status == 503
    assert "'general'" in error.message and "died or is restarting" in error.message
    assert "after 3 attempt(s)" in error.message
    assert "error" in stats["experts"]["general"]  # its stats say it is gone, not a hang


async def test_a_stalled_primary_is_continued_by_its_fallback() -> None:
    # general sends 3 tokens of 40, then no more: cancelled after the stall limit; it has
    # no other replica, so critic continues the same answer.
    config = make_config(experts={"general": {
        "fallback": "critic",
        "mock": {"tokens": 40, "ttft_s": 0.0, "hang_every": 1, "fault_after_tokens": 3}},
        "critic": {"mock": {"tokens": 24}}}, executor={"stall_timeout_s": 0.3})
    async with Client.local(config) as client:
        events = await _events(client, "hello")
        stats = await _expert_stats(client.team, "general")
    done = events[-1]
    assert done.type == "done" and done.primary.ok
    assert done.primary.served_by == ["general", "critic"]
    streamed = "".join(e.delta for e in events if e.type == "primary")
    assert streamed == done.primary.result  # one answer, every piece once
    assert streamed.startswith("[general]") and "[critic]" not in streamed
    cut = done.primary.continued_from[1]
    assert len(streamed[:cut].split()) == 3  # where general stalled
    assert len(streamed.split()) == 24  # critic's mock: 24 tokens in all
    assert stats["cancelled"] == 1  # the stalled request was cancelled in the engine


async def test_an_engine_that_cannot_start_is_named() -> None:
    config = make_config(experts={"math": {"backend": "vllm", "model": "/nonexistent/model",
                                           "num_gpus": 0}},
                         server={"startup_timeout_s": 120})
    from orchestration.errors import NoHealthyExpertError

    with pytest.raises(NoHealthyExpertError) as info:
        async with Client.local(config):
            pass
    assert info.value.message.startswith("math failed to start:")
    assert info.value.field == "experts.math"


async def test_router_actor_reads_load_and_degrades_the_plan() -> None:
    from orchestration.models import ExecutorLoad, OrchestrateRequest

    async with Client.local(make_config(router={"method": "keywords"})) as client:
        router = client.team.router
        request = OrchestrateRequest(prompt="review the python code and calculate the sum",
                                     primary="general")
        idle = await router.plan.remote(request)
        await router.set_load_override.remote(ExecutorLoad(active=16, queued=40))
        swamped = await router.plan.remote(request)
    assert idle.strategy is ExecutionStrategy.PARALLEL_FULL and len(idle.experts) == 3
    assert swamped.strategy is ExecutionStrategy.SERIAL
    assert [t.expert for t in swamped.experts] == ["code"]


async def test_executor_crash_ends_the_request_clearly_and_the_service_comes_back() -> None:
    import ray

    config = make_config(experts={"general": {"mock": {"tokens": 30, "token_latency_s": 0.1}}})
    async with Client.local(config) as client:
        events: list[Any] = []
        async for event in client.stream("hello"):
            events.append(event)
            if event.type == "primary" and sum(e.type == "primary" for e in events) == 1:
                ray.kill(client.team.executor, no_restart=False)  # as a crash would
        error = events[-1]
        assert error.type == "error" and error.code == "unavailable" and error.status == 503
        assert "executor" in error.message

        async def back() -> bool:
            try:
                return (await client.run("hello again")).primary.ok
            except Exception:  # still restarting
                return False

        await until(back, timeout=60, what="the restarted executor serving again")
