"""Stopping drains (issue 17): SIGTERM of `serve run` and of `chorus serve`, mid-stream.

Each test starts the server as a subprocess on this session's Ray, opens 8 long
streams, sends SIGTERM, and keeps asking until the port closes: `/readyz` turns 503
first, new requests get 503 JSON with Retry-After (never Serve's plain-text 404), the
8 streams end with `done`, and afterwards no process of the team is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from tests.conftest import ROOT, alive, config_dict, free_port, until, until_gone

pytestmark = pytest.mark.usefixtures("ray_session")
LONG = {"prompt": "long", "primary": "math", "experts": []}


def _config(tmp_path: Path) -> Path:
    data = config_dict("mock")
    for expert in data["experts"]:
        expert["mock"].update(ttft_s=0.0, token_latency_s=0.005, tokens=6)
        if expert["name"] == "math":  # ~4 s answers: in flight when the signal comes
            expert["mock"].update(tokens=200, token_latency_s=0.02)
    data["server"] = {"drain_s": 30}
    path = tmp_path / "stop.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _serve_gone() -> None:
    """Wait until this module's Serve instance is gone (the next test starts its own)."""
    import time

    import ray

    deadline = time.monotonic() + 60
    while any(a["name"] == "SERVE_CONTROLLER_ACTOR"
              for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, "Serve's controller did not go away"
        time.sleep(0.2)  # an external actor's exit: nothing to await


@pytest.fixture
def serve_port() -> Any:
    """Serve for one test, on a free port; shut down (if the test did not) and gone after."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    _serve_gone()


def _start(command: list[str]) -> tuple[subprocess.Popen[str], deque[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("CHORUS_CONFIG", "CHORUS_API_KEY")}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail: deque[str] = deque(maxlen=300)  # drained all along: a full pipe would block it
    threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True).start()
    return proc, tail


async def _ready(url: str, proc: subprocess.Popen[str], tail: deque[str]) -> None:
    async def up() -> bool:
        assert proc.poll() is None, "".join(tail)
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(f"{url}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    await until(up, timeout=120, what="the server ready")


async def _team_pids(url: str) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as http:
        stats = (await http.get(f"{url}/v1/stats")).json()
    pids = [r["pid"] for e in stats["experts"].values() for r in e["replicas"].values()]
    return [*pids, stats["executor"]["pid"], stats["router"]["pid"]]


async def _stop_mid_stream(url: str, proc: subprocess.Popen[str], tail: deque[str]) -> None:
    await _ready(url, proc, tail)
    pids = await _team_pids(url)
    started = asyncio.Event()
    streaming = [0]

    async def long_stream() -> list[tuple[str, dict[str, Any]]]:
        async with httpx.AsyncClient(timeout=120) as http, \
                http.stream("POST", f"{url}/v1/orchestrate", json=LONG) as response:
            assert response.status_code == 200
            lines = []
            async for line in response.aiter_lines():
                lines.append(line)
                if line == "event: primary" and lines.count(line) == 1:
                    streaming[0] += 1
                    if streaming[0] == 8:
                        started.set()
            return list(iter_sse(lines))

    streams = [asyncio.ensure_future(long_stream()) for _ in range(8)]
    await asyncio.wait_for(started.wait(), 60)
    proc.send_signal(signal.SIGTERM)
    readyz: list[int] = []
    refused: list[tuple[int, dict[str, Any], str | None]] = []
    deadline = asyncio.get_running_loop().time() + 120
    async with httpx.AsyncClient(timeout=10) as http:
        while True:  # until the port closes
            assert asyncio.get_running_loop().time() < deadline, "the port never closed"
            try:
                readyz.append((await http.get(f"{url}/readyz")).status_code)
                answer = await http.post(f"{url}/v1/orchestrate",
                                         json={"prompt": "hello", "stream": False})
            except httpx.TransportError:
                break
            if answer.status_code != 200:
                refused.append((answer.status_code, answer.json(), answer.headers.get(
                    "retry-after")))
            await asyncio.sleep(0.05)  # the probing rate of a load balancer, not a wait
    ended = await asyncio.gather(*streams)
    assert await asyncio.to_thread(proc.wait, 60) == 0, "".join(tail)
    assert 503 in readyz and 404 not in readyz  # unready before the port closed
    assert refused, "no request was refused while draining"
    for status, body, retry_after in refused:
        assert (status, body["error"]["code"]) == (503, "shutting_down"), body
        assert retry_after is not None
    assert [events[-1][0] for events in ended] == ["done"] * 8

    await until_gone(pids, what="every process of the team gone")


async def test_sigterm_of_serve_run_drains_before_the_port_closes(
        tmp_path: Path, serve_port: int) -> None:
    import ray

    port = serve_port  # `serve run` attaches to this Serve instance, and shuts it down
    serve_cli = Path(sys.executable).parent / "serve"
    proc, tail = _start([str(serve_cli), "run", "--address",
                         ray.get_runtime_context().gcs_address, "--name", "chorus",
                         "serve_app:build_app", f"config={_config(tmp_path)}"])
    try:
        await _stop_mid_stream(f"http://127.0.0.1:{port}", proc, tail)
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigterm_of_chorus_serve_drains_before_the_port_closes(tmp_path: Path) -> None:
    import ray

    port = free_port()
    chorus = Path(sys.executable).parent / "chorus"
    proc, tail = _start([str(chorus), "serve", str(_config(tmp_path)), "--port", str(port),
                         "--address", ray.get_runtime_context().gcs_address])
    try:
        await _stop_mid_stream(f"http://127.0.0.1:{port}", proc, tail)
    finally:
        if proc.poll() is None:
            proc.kill()
        _serve_gone()  # `chorus serve` started this Serve instance and shut it down


# --------------------------------------------------------------------------- nothing leaks


def _deploy(name: str, tmp_path: Path) -> str:
    from ray import serve

    from serve_app import build_app

    serve.run(build_app({"config": str(_config(tmp_path))}), name=name, route_prefix=f"/{name}")
    return name


async def test_serve_shutdown_leaves_no_process_of_the_team(
        tmp_path: Path, serve_port: int) -> None:
    from ray import serve

    pids = await _team_pids(f"http://127.0.0.1:{serve_port}/{_deploy('gone', tmp_path)}")
    serve.shutdown()

    await until_gone(pids, what="every process of the team gone")


async def test_an_app_deleted_while_its_ingress_is_dead_leaks_no_team(
        tmp_path: Path, serve_port: int) -> None:
    from ray import serve

    url = f"http://127.0.0.1:{serve_port}/{_deploy('orphan', tmp_path)}"
    pids = await _team_pids(url)
    async with httpx.AsyncClient(timeout=30) as http:
        ingress = (await http.get(f"{url}/v1/stats")).json()["ingress"]["pid"]
    os.kill(ingress, signal.SIGKILL)  # no replica left to see the deletion ...
    serve.delete("orphan")

    await until_gone(pids, what="the orphaned team removed")  # the controller saw it go


async def test_a_dead_controller_takes_its_team_and_a_new_one_starts(
        tmp_path: Path, serve_port: int) -> None:
    import ray

    from actors.team import controller_name

    url = f"http://127.0.0.1:{serve_port}/{_deploy('phoenix', tmp_path)}"
    pids = await _team_pids(url)
    ray.kill(ray.get_actor(controller_name("chorus-phoenix"), namespace="chorus"))

    async def replaced() -> bool:
        if [pid for pid in pids if alive(pid)]:
            return False  # the old team goes with its owner
        try:
            fresh = await _team_pids(url)
        except (httpx.HTTPError, KeyError, ValueError):
            return False
        return not set(fresh) & set(pids)

    await until(replaced, timeout=90, what="a new controller and team")
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(f"{url}/v1/orchestrate",
                                 json={"prompt": "hello", "stream": False})
    assert answer.status_code == 200 and answer.json()["primary"]["status"] == "success"
