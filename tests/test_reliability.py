"""Trustworthy under real traffic, against the served app (issue 8).

One Serve instance for the module, two apps: `sturdy` (the mock team, a slow `math`)
takes client storms, shared X-Request-IDs, disconnects and a soak of the stats body;
`fragile` (a generalist with one Ray restart, fast supervision) is killed beyond its
restarts and must come back. Hostile input is in tests/test_hostile_input.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from typing import Any

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from tests.conftest import config_dict, until

pytestmark = pytest.mark.usefixtures("ray_session")


def _deploy(name: str, data: dict[str, Any], tmp_path_factory: Any, port: int) -> str:
    from ray import serve

    from serve_app import build_app

    path = tmp_path_factory.mktemp(name) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture(scope="module")
def sturdy(serve_port: int, tmp_path_factory) -> str:
    data = config_dict("mock")
    for expert in data["experts"]:
        if expert["name"] == "math":  # answers take ~4 s: still running when callers leave
            expert["mock"].update(tokens=200, token_latency_s=0.02)
    return _deploy("sturdy", data, tmp_path_factory, serve_port)


@pytest.fixture(scope="module")
def fragile(serve_port: int, tmp_path_factory) -> str:
    data = config_dict("mock")
    data["experts"] = [e for e in data["experts"] if e["name"] in ("general", "critic")]
    data["experts"][0]["max_restarts"] = 1
    data["supervision"] = {"check_interval_s": 0.2, "ping_timeout_s": 1.0,
                           "readiness_timeout_s": 1.0, "initial_backoff_s": 1.5, "jitter": 0.3}
    return _deploy("fragile", data, tmp_path_factory, serve_port)


async def _stats(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await http.get(f"{url}/v1/stats")
    assert response.status_code == 200, response.text
    return response.json()


async def _idle(http: httpx.AsyncClient, url: str) -> bool:
    stats = await _stats(http, url)
    executor = stats["executor"]
    engines = [e.get("active", 0) for e in stats["experts"].values()]
    return executor["active"] == 0 and executor["queued"] == 0 and not any(engines)


# --------------------------------------------------------------------------- storms


async def test_storms_of_hangups_and_client_timeouts_leave_no_slot_behind(sturdy: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        async def hang_up_after_plan(i: int) -> None:
            body = {"prompt": f"review this python code and calculate the sum {i}"}
            async with http.stream("POST", f"{sturdy}/v1/orchestrate", json=body) as response:
                # A storm may overflow the queue: refused (429) at once is fine, lost is not.
                assert response.status_code in (200, 429)
                async for line in response.aiter_lines():
                    if line == "event: plan":
                        return  # leaving the block closes the connection

        async def impatient(i: int) -> None:
            body = {"prompt": f"check this python bug {i}", "stream": False}
            # The client gives up: the server must cancel and free everything.
            with contextlib.suppress(httpx.ReadTimeout):
                await http.post(f"{sturdy}/v1/orchestrate", json=body,
                                timeout=httpx.Timeout(60, read=0.15))

        for _ in range(3):
            await asyncio.gather(*(hang_up_after_plan(i) for i in range(100)))
        await asyncio.gather(*(impatient(i) for i in range(60)))
        await until(lambda: _idle(http, sturdy), timeout=60, what="every slot returned")
        stats = await _stats(http, sturdy)
        assert stats["executor"]["requests"] == 0 and stats["executor"]["outstanding_refs"] == 0
        again = await http.post(f"{sturdy}/v1/orchestrate", timeout=30,
                                json={"prompt": "hello", "stream": False})
        assert again.status_code == 200 and again.json()["primary"]["status"] == "success"


async def test_two_callers_with_the_same_request_id_do_not_touch_each_other(sturdy: str) -> None:
    headers = {"X-Request-ID": "same-id"}
    body = {"prompt": "review this python code", "max_tokens": 24}
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        async def leaver() -> None:
            async with http.stream("POST", f"{sturdy}/v1/orchestrate", json=body) as response:
                async for line in response.aiter_lines():
                    if line == "event: primary":
                        return

        async def stayer() -> list[tuple[str, dict[str, Any]]]:
            async with http.stream("POST", f"{sturdy}/v1/orchestrate", json=body) as response:
                return list(iter_sse([line async for line in response.aiter_lines()]))

        _, events = await asyncio.gather(leaver(), stayer())
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and "error" not in kinds
    assert events[-1][1]["primary"]["status"] == "success"
    plan = events[0][1]
    assert plan["request_id"] != "same-id" and plan["plan"]["request_id"] == plan["request_id"]


async def test_a_disconnect_dispatches_nothing_more_and_retries_nothing(sturdy: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        await until(lambda: _idle(http, sturdy), timeout=60, what="idle before")
        before = (await _stats(http, sturdy))["executor"]["counters"]
        # SERIAL: the critic waits behind the (slow) math primary when the caller leaves.
        body = {"prompt": "long", "primary": "math", "experts": ["critic"], "strategy": "SERIAL"}
        async with http.stream("POST", f"{sturdy}/v1/orchestrate", json=body) as response:
            async for line in response.aiter_lines():
                if line == "event: primary":
                    break
        await until(lambda: _idle(http, sturdy), timeout=60, what="the request cancelled")
        after = (await _stats(http, sturdy))["executor"]["counters"]

    def grew(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    assert grew("dispatched") == 1  # the primary only: the waiting critic never went out
    assert (grew("retried"), grew("failed"), grew("timed_out")) == (0, 0, 0)
    assert grew("cancelled") == 2 and grew("succeeded") == 0


def _shape(value: Any) -> Any:
    """The structure of a JSON value: keys and list lengths, not the numbers in it."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


async def test_the_stats_body_does_not_grow_with_requests_served(sturdy: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        async def requests(n: int) -> None:
            async def one(i: int) -> None:
                response = await http.post(f"{sturdy}/v1/orchestrate", json={
                    "prompt": f"review python {i}", "stream": False, "max_tokens": 4})
                assert response.status_code == 200

            for start in range(0, n, 25):
                await asyncio.gather(*(one(i) for i in range(start, start + 25)))

        await requests(50)
        await until(lambda: _idle(http, sturdy), timeout=60, what="idle")
        first = (await http.get(f"{sturdy}/v1/stats")).text
        await requests(300)
        await until(lambda: _idle(http, sturdy), timeout=60, what="idle")
        second = (await http.get(f"{sturdy}/v1/stats")).text
    assert _shape(json.loads(second)) == _shape(json.loads(first))
    # Only counters' digits may widen (the old mock history grew ~53 bytes per request).
    assert len(second) - len(first) <= 120, (len(first), len(second))


# --------------------------------------------------------------------------- supervision


async def test_an_expert_killed_beyond_its_restarts_comes_back(fragile: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        async def general() -> dict[str, Any]:
            return (await _stats(http, fragile))["experts"]["general"]

        async def readyz() -> httpx.Response:
            return await http.get(f"{fragile}/readyz")

        assert (await readyz()).status_code == 200
        first_pid = (await general())["pid"]
        os.kill(first_pid, signal.SIGKILL)  # Ray restarts it (max_restarts: 1) ...

        async def restarted() -> bool:
            return (await general()).get("pid") not in (None, first_pid)

        await until(restarted, timeout=60, what="Ray's restart of general")
        os.kill((await general())["pid"], signal.SIGKILL)  # ... but not twice

        seen_down: list[dict[str, Any]] = []

        async def reported_down() -> bool:
            response = await readyz()
            if response.status_code == 503:
                seen_down.append(response.json())
            return bool(seen_down)

        await until(reported_down, timeout=30, what="/readyz saying 503")
        down = seen_down[0]
        assert down["status"] == "unavailable" and "'general'" in " ".join(down["problems"])
        assert down["actors"]["general#0"].split(" ")[0] in ("dead", "restarting", "starting")

        async def ready_again() -> bool:
            return (await readyz()).status_code == 200

        await until(ready_again, timeout=60, what="/readyz 200 again")
        answer = await http.post(f"{fragile}/v1/orchestrate",
                                 json={"prompt": "hello", "stream": False})
        assert answer.status_code == 200 and answer.json()["primary"]["status"] == "success"
        supervision = (await general())["replicas"]["general#0"]["supervision"]
        assert supervision["recreated"] == 1 and supervision["state"] == "ready"
        assert (await http.get(f"{fragile}/healthz")).json() == {"status": "ok"}
