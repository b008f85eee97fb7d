"""The team outlives its ingress (issue 17), against real processes.

One Serve instance for the module. App `fleet` runs two ingress replicas on one team;
app `rolling` is redeployed (unchanged, then changed under load); app `tight` holds
the session's only `chorus-test-slot`, so a roll has no room for one more replica; app
`vigil` supervises slowly (a 30 s round), so a fast `/readyz` 503 can only come from
the vigil. PIDs are read from `/v1/stats` (each actor reports its own).
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from typing import Any

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from tests.conftest import alive, config_dict, until

pytestmark = pytest.mark.usefixtures("ray_session")
FAST = {"ttft_s": 0.0, "token_latency_s": 0.005, "tokens": 6}


def _deploy(name: str, data: dict[str, Any], tmp_path_factory: Any, port: int) -> str:
    from ray import serve

    from serve_app import build_app

    path = tmp_path_factory.mktemp(name) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}"


def _team(**changes: Any) -> dict[str, Any]:
    data = config_dict("mock")
    for expert in data["experts"]:
        expert["mock"].update(FAST)
    return {**data, **changes}


async def _stats(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await http.get(f"{url}/v1/stats")
    assert response.status_code == 200, response.text
    return response.json()


def _pids(stats: dict[str, Any]) -> dict[str, int]:
    """label -> pid of every actor of the team (replicas, executor, router)."""
    pids = {label: replica["pid"] for expert in stats["experts"].values()
            for label, replica in expert["replicas"].items()}
    return {**pids, "executor": stats["executor"]["pid"], "router": stats["router"]["pid"]}


async def _stream(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[tuple]:
    async with http.stream("POST", f"{url}/v1/orchestrate", json=body) as response:
        assert response.status_code == 200, await response.aread()
        return list(iter_sse([line async for line in response.aiter_lines()]))


# --------------------------------------------------------------------------- two ingresses


@pytest.fixture(scope="module")
def fleet(serve_port: int, tmp_path_factory) -> str:
    data = _team(server={"ingress": {"replicas": 2}},
                 supervision={"check_interval_s": 0.2, "initial_backoff_s": 0.3, "jitter": 0})
    for expert in data["experts"]:
        if expert["name"] == "critic":
            expert["max_restarts"] = 0  # killed: only Chorus's supervisor brings it back
        if expert["name"] == "math":  # answers of ~4 s: still running when callers leave
            expert["mock"].update(tokens=200, token_latency_s=0.02)
    return _deploy("fleet", data, tmp_path_factory, serve_port)


async def _ingress_pids(http: httpx.AsyncClient, url: str) -> set[int]:
    stats = await _stats(http, url)
    return {replica["pid"] for replica in stats["ingress"]["replicas"]}


async def test_two_ingress_replicas_serve_one_team_and_count_its_work_once(fleet: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        await until(lambda: _two(http, fleet), timeout=30, what="both ingress replicas reporting")
        before = await _stats(http, fleet)
        busy: set[int] = set()

        async def long(i: int) -> list[tuple]:
            async with httpx.AsyncClient(timeout=120) as own:  # HAProxy: least connections
                return await _stream(own, fleet, {"prompt": f"long {i}", "primary": "math",
                                                  "experts": []})

        async def both_busy() -> bool:  # each replica reports its own requests in flight
            stats = await _stats(http, fleet)
            busy.update(r["pid"] for r in stats["ingress"]["replicas"] if r["in_flight"] > 1)
            return len(busy) == 2

        streams: list[asyncio.Future] = []

        async def both_streaming() -> bool:  # HAProxy may add the second replica late:
            running = [s for s in streams if not s.done()]  # keep 8 long streams going
            streams.extend(asyncio.ensure_future(long(len(streams) + i))
                           for i in range(8 - len(running)))
            return await both_busy()

        await until(both_streaming, timeout=90, what="both replicas streaming")
        short = await asyncio.gather(*(
            http.post(f"{fleet}/v1/orchestrate", json={"prompt": f"hi {i}", "stream": False})
            for i in range(22)))
        ended = await asyncio.gather(*streams)
        assert [events[-1][0] for events in ended] == ["done"] * len(streams)
        assert all(r.status_code == 200 and r.json()["primary"]["status"] == "success"
                   for r in short)

        async def counted() -> bool:  # reported by both replicas, counted once
            after = await _stats(http, fleet)
            ok = after["requests"]["outcomes"]["ok"] - before["requests"]["outcomes"]["ok"]
            return ok == len(streams) + 22

        await until(counted, timeout=30, what="every request counted once, team-wide")
        after = await _stats(http, fleet)
    plans = after["executor"]["counters"]["accepted_plans"]
    assert plans - before["executor"]["counters"].get("accepted_plans", 0) == len(streams) + 22


async def _two(http: httpx.AsyncClient, url: str) -> bool:
    return len(await _ingress_pids(http, url)) == 2


async def test_a_hang_up_on_either_replica_cancels_its_tasks(fleet: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        before = (await _stats(http, fleet))["executor"]["counters"]

        async def leave(i: int) -> None:
            async with httpx.AsyncClient(timeout=60) as own:  # its own connection
                body = {"prompt": f"long {i}", "primary": "math", "experts": []}
                async with own.stream("POST", f"{fleet}/v1/orchestrate", json=body) as response:
                    async for line in response.aiter_lines():
                        if line == "event: primary":
                            return

        await asyncio.gather(*(leave(i) for i in range(8)))

        async def idle() -> bool:
            stats = await _stats(http, fleet)
            return stats["executor"]["active"] == 0 and stats["executor"]["requests"] == 0

        await until(idle, timeout=60, what="every hung-up request cancelled")
        after = (await _stats(http, fleet))["executor"]["counters"]
    assert after["cancelled"] - before.get("cancelled", 0) == 8
    assert after.get("succeeded", 0) == before.get("succeeded", 0)


async def test_one_supervisor_for_two_replicas_recreates_a_dead_expert_once(fleet: str) -> None:
    import ray

    async with httpx.AsyncClient(timeout=60) as http:
        critic = (await _stats(http, fleet))["experts"]["critic"]["replicas"]["critic#0"]
        os.kill(critic["pid"], signal.SIGKILL)  # max_restarts 0: Ray gives up at once

        async def back() -> bool:
            entry = (await _stats(http, fleet))["experts"]["critic"]["replicas"]["critic#0"]
            return entry["supervision"]["state"] == "ready" and entry.get("pid") not in (
                None, critic["pid"])

        await until(back, timeout=60, what="critic#0 re-created and ready")
        entry = (await _stats(http, fleet))["experts"]["critic"]["replicas"]["critic#0"]
    assert entry["supervision"]["recreated"] == 1
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("chorus-fleet.") and ".expert.critic#" in a["name"]]
    assert len(names) == 1  # one supervisor made one new actor


async def test_killing_an_ingress_replica_restarts_no_actor_of_the_team(fleet: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        await until(lambda: _two(http, fleet), timeout=30, what="both ingress replicas reporting")
        stats = await _stats(http, fleet)
        team = _pids(stats)
        victim = stats["ingress"]["pid"]
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            try:
                pids = await _ingress_pids(http, fleet)
            except (httpx.HTTPError, AssertionError):
                return False  # the killed replica's connections fail until HAProxy knows
            return len(pids) == 2 and victim not in pids

        await until(replaced, timeout=90, what="Serve's new ingress replica reporting")
        answer = await http.post(f"{fleet}/v1/orchestrate",
                                 json={"prompt": "hello again", "stream": False})
        assert answer.status_code == 200, answer.text
        assert _pids(await _stats(http, fleet)) == team  # the same actors, untouched


# --------------------------------------------------------------------------- redeploys


@pytest.fixture(scope="module")
def rolling(serve_port: int, tmp_path_factory) -> tuple[str, dict[str, Any], Any]:
    data = _team()
    for expert in data["experts"]:
        if expert["name"] == "math":  # long answers: streams that span the redeploy
            expert["mock"].update(tokens=300, token_latency_s=0.02)
    url = _deploy("rolling", data, tmp_path_factory, serve_port)
    return url, data, lambda new: _deploy("rolling", new, tmp_path_factory, serve_port)


async def test_a_redeploy_of_the_same_config_restarts_no_actor(rolling) -> None:
    url, data, redeploy = rolling
    async with httpx.AsyncClient(timeout=60) as http:
        before = _pids(await _stats(http, url))
        await asyncio.to_thread(redeploy, data)  # a new ingress version: Serve replaces it
        after = _pids(await _stats(http, url))
    assert after == before


async def test_a_changed_redeploy_rolls_only_what_changed_and_fails_no_request(rolling) -> None:
    url, data, redeploy = rolling
    new = copy.deepcopy(data)
    writer = copy.deepcopy(next(e for e in new["experts"] if e["name"] == "general"))
    writer.update(name="writer", importance="normal", keywords=["poem"], routes=[],
                  description="Writes poems.")
    new["experts"] = [e for e in new["experts"] if e["name"] != "critic"] + [writer]
    for expert in new["experts"]:
        if expert["name"] == "code":
            expert["mock"]["tokens"] = 9  # its actor changes: its replica rolls
    failures: list[str] = []
    progress = [0]
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=120) as http:
        before = _pids(await _stats(http, url))

        async def load(n: int) -> int:
            done = 0
            while not stop.is_set():
                try:
                    events = await _stream(http, url, {"prompt": f"review this python {n}"})
                    if events[-1][0] != "done":
                        failures.append(f"ended with {events[-1]}")
                except (AssertionError, httpx.HTTPError) as exc:
                    failures.append(repr(exc))
                done += 1
                progress[0] += 1
            return done

        async def under_way() -> bool:
            return progress[0] >= 3

        long = [asyncio.ensure_future(_stream(http, url, {"prompt": f"long {i}",
                                                          "primary": "math", "experts": []}))
                for i in range(3)]
        loops = [asyncio.ensure_future(load(n)) for n in range(3)]
        await until(under_way, timeout=30, what="the load under way")
        await asyncio.to_thread(redeploy, new)
        stop.set()
        served = sum(await asyncio.gather(*loops))
        streams = await asyncio.gather(*long)

        async def settled() -> bool:  # the removed expert and the old code replica drained
            pids = _pids(await _stats(http, url)).values()
            return before["critic#0"] not in pids and before["code#0"] not in pids

        await until(settled, timeout=60, what="the removed and the rolled replicas gone")
        after = _pids(await _stats(http, url))
        answer = await http.post(f"{url}/v1/orchestrate", json={
            "prompt": "a poem", "primary": "writer", "experts": [], "stream": False})
    assert failures == [] and served > 0
    assert all(events[-1][0] == "done" for events in streams)  # begun before, ended whole
    assert answer.status_code == 200 and answer.json()["primary"]["expert"] == "writer"
    assert [label for label in after if label.startswith("code#")] == ["code#1"]
    assert "critic#0" not in after and "writer#0" in after
    for label in ("general#0", "math#0", "executor", "router"):
        assert after[label] == before[label], label

    async def gone() -> bool:
        return not alive(before["critic#0"]) and not alive(before["code#0"])

    await until(gone, timeout=30, what="the removed processes exited")


@pytest.fixture(scope="module")
def tight(serve_port: int, tmp_path_factory) -> tuple[str, dict[str, Any], Any]:
    data = _team()
    data["experts"] = [e for e in data["experts"] if e["name"] == "general"]
    data["experts"][0]["resources"] = {"resources": {"chorus-test-slot": 1}}
    data["server"] = {"drain_s": 10}
    url = _deploy("tight", data, tmp_path_factory, serve_port)
    return url, data, lambda new: _deploy("tight", new, tmp_path_factory, serve_port)


async def test_a_roll_without_room_for_one_more_replica_drains_first(tight) -> None:
    url, data, redeploy = tight
    new = copy.deepcopy(data)
    new["experts"][0]["mock"]["tokens"] = 7
    async with httpx.AsyncClient(timeout=60) as http:
        before = _pids(await _stats(http, url))
        await asyncio.to_thread(redeploy, new)
        stats = await _stats(http, url)
        answer = await http.post(f"{url}/v1/orchestrate",
                                 json={"prompt": "hello", "stream": False})
    history = stats["experts"]["general"]["scaling"]["history"]
    rolled = [h["reason"] for h in history if h["direction"] == "rolled"]
    assert rolled and "no room for one more replica: drained it first" in rolled[-1]
    assert _pids(stats)["general#0"] != before["general#0"]
    assert answer.status_code == 200 and answer.json()["primary"]["status"] == "success"


# --------------------------------------------------------------------------- readiness


@pytest.fixture(scope="module")
def vigil(serve_port: int, tmp_path_factory) -> str:
    data = _team(supervision={"check_interval_s": 30.0})  # rounds too rare to explain it
    data["experts"] = [e for e in data["experts"] if e["name"] in ("general", "critic")]
    data["experts"][0]["max_restarts"] = 5
    data["experts"][0]["mock"]["startup_s"] = 3  # a restart takes a model's load
    return _deploy("vigil", data, tmp_path_factory, serve_port)


async def test_readyz_follows_the_default_primarys_death_at_once_and_its_return(vigil) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.get(f"{vigil}/readyz")).status_code == 200
        pid = (await _stats(http, vigil))["experts"]["general"]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        seen: list[tuple[float, dict[str, Any]]] = []

        async def unready() -> bool:
            response = await http.get(f"{vigil}/readyz")
            if response.status_code == 503:
                seen.append((time.monotonic() - killed, response.json()))
            return bool(seen)

        await until(unready, timeout=20, what="/readyz 503")
        down_after, body = seen[0]
        print(f"/readyz said 503 {down_after:.3f} s after the SIGKILL")
        assert "general#0" in " ".join(body["problems"])
        down = (await _stats(http, vigil))["experts"]["general"]["replicas"]["general#0"]
        assert down["supervision"]["state"] != "ready"  # never ready and down at once
        # Not from a supervision round (every 30 s here): Ray's actor table, within a poll.
        assert down_after < 15

        async def ready() -> bool:
            return (await http.get(f"{vigil}/readyz")).status_code == 200

        await until(ready, timeout=25, what="/readyz 200 again, before the next round")
        stats = await _stats(http, vigil)
        entry = stats["experts"]["general"]["replicas"]["general#0"]
        assert entry["supervision"]["state"] == "ready" and entry["pid"] != pid
        assert "error" not in entry
