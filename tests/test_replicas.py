"""Experts with several replicas on a local Ray instance: dispatch and failure."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from orchestration.client import Client
from tests.conftest import make_config, until

pytestmark = pytest.mark.usefixtures("ray_session")


def _three_generals(**mock: Any) -> Any:
    return make_config(
        experts={"general": {"replicas": {"min": 3, "max": 3}, "max_concurrency": 10,
                             "mock": {"ttft_s": 0.0, **mock}}},
        executor={"max_in_flight": 40, "max_queue": 256},
        # Long enough that a killed replica stays "suspect" in the executor for the
        # whole test: its tasks' retries must go to the others, not wait for it.
        supervision={"check_interval_s": 30.0})


async def _replica_stats(client: Client) -> dict[str, dict[str, Any]]:
    replicas = client.team.replicas["general"]
    answers = await asyncio.gather(*(h.stats.remote() for h in replicas.values()))
    return dict(zip(replicas, answers, strict=True))


async def test_each_task_goes_to_the_least_loaded_replica() -> None:
    config = _three_generals(tokens=3, token_latency_s=0.4)
    async with Client.local(config) as client:
        results = await asyncio.gather(*(
            client.run(f"hello {i}", primary="general", experts=[]) for i in range(6)))
        stats = await _replica_stats(client)
    # Six tasks at once on three idle replicas: two each, never three on one.
    assert {label: s["requests"] for label, s in stats.items()} == {
        "general#0": 2, "general#1": 2, "general#2": 2}
    assert all(s["peak_active"] == 2 for s in stats.values())
    served = sorted(r.primary.replicas[0] for r in results)
    assert served == ["general#0"] * 2 + ["general#1"] * 2 + ["general#2"] * 2


async def test_killing_one_of_three_replicas_mid_flight_loses_no_request() -> None:
    config = _three_generals(tokens=20, token_latency_s=0.05)
    async with Client.local(config) as client:
        jobs = [asyncio.ensure_future(client.run(f"long {i}", primary="general", experts=[]))
                for i in range(30)]

        async def all_running() -> bool:
            stats = await _replica_stats(client)
            return [s["active"] for s in stats.values()] == [10, 10, 10]

        await until(all_running, what="30 tasks in flight, 10 on each replica")
        victim = (await _replica_stats(client))["general#1"]["pid"]
        os.kill(victim, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)
    primaries = [r.primary for r in results]
    assert all(p.ok for p in primaries)
    moved = [p for p in primaries if p.replicas[0] == "general#1"]
    assert len(moved) == 10
    for primary in moved:  # retried on a healthy replica, not on the restarted one
        assert primary.attempts == 2 and primary.replicas[1] in ("general#0", "general#2")
        assert primary.served_by == ["general", "general"]
    assert all(p.attempts == 1 for p in primaries if p.replicas[0] != "general#1")
