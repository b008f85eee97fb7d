"""`chorus serve` (what `make run` runs): up, or one clear message and a non-zero exit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, config_dict, free_port

pytestmark = pytest.mark.usefixtures("ray_session")
CHORUS = [sys.executable, "-m", "orchestration.cli", "serve"]


def _address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _config(tmp_path: Path, patch: dict[str, dict]) -> str:
    data = config_dict("mock")
    for expert in data["experts"]:
        expert.update(patch.get(expert["name"], {}))
    path = tmp_path / "team.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_team_this_cluster_cannot_hold_fails_at_once_naming_each_expert(tmp_path) -> None:
    path = _config(tmp_path, {"code": {"num_gpus": 1}, "critic": {"num_gpus": 2}})
    run = subprocess.run([*CHORUS, path, "--address", _address(), "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith(("chorus:", "  - "))]
    assert lines == [
        "chorus: this cluster cannot hold the team:",
        "  - expert 'code' needs GPU=1 (largest node has 0)",
        "  - expert 'critic' needs GPU=2 (largest node has 0)",
    ]
    assert "Traceback" not in run.stderr


def test_a_team_whose_engine_cannot_start_fails_the_deploy_with_one_line(tmp_path) -> None:
    path = _config(tmp_path, {"math": {"backend": "vllm", "model": "/nonexistent/model",
                                       "num_gpus": 0}})
    # A Ray instance of its own: Serve must not outlive the command in the shared one.
    run = subprocess.run([*CHORUS, path, "--address", "local", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 1, run.stderr[-2000:]
    failure = [line for line in run.stderr.splitlines() if line.startswith("chorus:")]
    assert len(failure) == 1
    assert failure[0].startswith("chorus: the team did not start: math failed to start: ")


def test_serving_the_mock_team_then_sigterm_exits_0() -> None:
    port = free_port()
    proc = subprocess.Popen([*CHORUS, "--address", "local", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "chorus serve did not come up"
            time.sleep(0.5)  # polling an external process: nothing to await
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/orchestrate", timeout=60,
                            json={"prompt": "hello", "stream": False})
        assert answer.status_code == 200 and answer.json()["primary"]["status"] == "success"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    output = proc.stdout.read()
    assert code == 0, output[-2000:]
    assert f"chorus: serving general, code, math, critic on http://127.0.0.1:{port}" in output
