"""Shared fixtures: one local Ray instance per session, Serve per module, config builders,
polling."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestration.config import ChorusConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
# address="local": always a fresh instance of our own, never another session's cluster.
RAY_INIT = {"address": "local", "num_cpus": 8, "include_dashboard": False,
            "namespace": "chorus-tests",
            "log_to_driver": False,
            # One slot of a custom resource: an expert that reserves it fills the cluster
            # (tests/test_fleet.py rolls it with no room for a second replica).
            "resources": {"chorus-test-slot": 1},
            # Export metrics every second (default 10 s) so the metrics test waits less.
            "_system_config": {"metrics_report_interval_ms": 1000}}

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
# The HTTP path Chorus runs on (`chorus serve` sets the same): Ray Serve's HAProxy ingress,
# each ingress replica serving HTTP itself (docs/operations.md, "The HTTP path"). Set
# before the session's Ray starts, so Serve's controller and proxies see it.
from orchestration.serve_env import serve_env  # noqa: E402

for _key, _value in serve_env().items():
    os.environ.setdefault(_key, _value)
# A tenant's key held in the ingress's environment (tests/test_tenants.py, `key_env`):
# set before Ray starts, so every worker process has it.
os.environ.setdefault("CHORUS_TEST_TENANT_KEY", "sk-beta-from-env-0123")
# LiteLLM fetches a model cost map at import unless told to use its bundled copy: the
# tests never rely on the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_dict(name: str = "mock") -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())


def make_config(base: str = "mock", experts: dict[str, dict[str, Any]] | None = None,
                **sections: Any) -> ChorusConfig:
    """A shipped config with patches: `experts={"code": {"mock": {"hang_every": 1}}}`."""
    data = _merge(config_dict(base), sections)
    for expert in data["experts"]:
        if experts and expert["name"] in experts:
            expert.update(_merge(expert, experts[expert["name"]]))
    return parse_config(data)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0,
                what: str = "condition") -> None:
    """Poll an async predicate until true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(**RAY_INIT)
    yield ray


def team_actor(team: str, label: str, namespace: str = "chorus") -> Any:
    """The live actor of replica `label` ("general#0") of team `team` ("chorus-<app>"),
    whatever its incarnation (names: `<team>.<controller token>.expert.<label>~<n>`)."""
    import ray

    prefix = f"{team}."
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and a["name"].startswith(prefix)
             and a["name"].rsplit("~", 1)[0].endswith(f".expert.{label}")]
    assert names, f"no actor of {label} in team {team}"
    return ray.get_actor(max(names, key=lambda n: int(n.rsplit("~", 1)[1])), namespace=namespace)


def alive(pid: int) -> bool:
    """Whether process `pid` still exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def until_gone(pids: Iterable[int], timeout: float = 60.0,
                     what: str = "every process gone") -> None:
    """Poll until no process of `pids` is left."""
    pids = list(pids)

    async def gone() -> bool:
        return not [pid for pid in pids if alive(pid)]

    await until(gone, timeout=timeout, what=what)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



@pytest.fixture(scope="module")
def serve_port():
    import ray
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    assert ray.is_initialized()
    # The next module starts Serve again: wait until this one's controller is gone.
    deadline = time.monotonic() + 60
    while any(a["name"] == "SERVE_CONTROLLER_ACTOR"
              for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, "Serve's controller did not go away"
        time.sleep(0.2)  # an external actor's exit: nothing to await


@pytest.fixture(scope="module")
def base_url(serve_port: int):
    """`serve run serve_app:app` in a subprocess, attached to this session's Ray."""
    import ray

    serve_cli = Path(sys.executable).parent / "serve"
    env = {k: v for k, v in os.environ.items() if k not in ("CHORUS_CONFIG", "CHORUS_API_KEY")}
    proc = subprocess.Popen(
        [str(serve_cli), "run", "--address", ray.get_runtime_context().gcs_address,
         "--name", "chorus", "serve_app:app"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Drained all along: a full pipe would block `serve run` (it relays the actors' logs).
    tail: deque[str] = deque(maxlen=200)
    threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{serve_port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "".join(tail)
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serve run did not come up in 120 s"
        time.sleep(0.5)  # polling an external process: nothing to await
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
