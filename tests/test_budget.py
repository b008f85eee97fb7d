"""A team on a latency budget, against the served app (issue 20; docs/budget.md).

One team: `general` answers at once; `slow` waits 5 s before its first token, every
time; `middle` waits 3 s; `quick` answers at once; `flaky` takes about 1.5 s an answer
and fails every second request. The budget cuts what is still running at its end and
fuses what finished; a quorum fuses once enough specialists answered.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from tests.conftest import config_dict

pytestmark = pytest.mark.usefixtures("ray_session")
APP = "budget"
SLOW_S = 5.0


def _mock(**options: Any) -> dict[str, Any]:
    return {"ttft_s": 0.0, "token_latency_s": 0.005, "tokens": 12, **options}


@pytest.fixture(scope="module")
def url(serve_port: int, tmp_path_factory: Any) -> str:
    from ray import serve

    from serve_app import build_app

    data = config_dict("mock")
    general = next(e for e in data["experts"] if e["name"] == "general")
    general.update(mock=_mock(), keywords=["general"])
    data["experts"] = [general] + [
        {"name": name, "backend": "mock", "description": f"The {name} one.",
         "keywords": [name], "mock": mock}
        for name, mock in (("slow", _mock(slow_every=1, slow_s=SLOW_S)),
                           ("middle", _mock(slow_every=1, slow_s=3.0)),
                           ("quick", _mock()),
                           ("flaky", _mock(tokens=30, token_latency_s=0.05, fail_every=2)))]
    data["router"].update(method="keywords")
    data["executor"]["retry"] = {"attempts": 3, "initial_wait_s": 0.01, "jitter": 0}
    path = tmp_path_factory.mktemp(APP) / f"{APP}.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name=APP, route_prefix=f"/{APP}")
    return f"http://127.0.0.1:{serve_port}/{APP}"


def _stream(url: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    with httpx.stream("POST", f"{url}/v1/orchestrate", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        return list(iter_sse(response.iter_lines()))


def _done(events: list[tuple[str, Any]]) -> dict[str, Any]:
    kind, done = events[-1]
    assert kind == "done", done
    streamed = "".join(data["delta"] for kind, data in events if kind == "primary")
    assert done["primary"]["status"] == "success" and streamed == done["primary"]["result"]
    return done


def _stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/stats", timeout=30).json()


def _poll(predicate: Any, what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_budget_cuts_a_slow_specialist_and_fuses_what_finished(url: str) -> None:
    retried = _stats(url)["executor"]["counters"].get("retried", 0)
    events = _stream(url, {"prompt": "p", "primary": "general", "experts": ["slow"],
                           "budget_s": 1})
    done = _done(events)
    (slow,) = done["experts"]
    assert (slow["expert"], slow["status"], slow["attempts"]) == ("slow", "budget", 1)
    assert "cut by the latency budget" in slow["error"]
    fusion = next(data for kind, data in events if kind == "fusion")
    assert [(r["expert"], r["status"]) for r in fusion["failed"]] == [("slow", "budget")]
    timings = done["timings"]
    assert timings["budget_s"] == 1 and timings["budget_used"] == round(timings["total_s"], 3)
    assert timings["total_s"] < SLOW_S  # it did not wait for the slow one
    # The cut reached the engine: its slot is free, and nothing was retried.
    _poll(lambda: _stats(url)["experts"]["slow"]["active"] == 0, "slow's engine idle")
    stats = _stats(url)
    assert stats["experts"]["slow"]["cancelled"] >= 1
    assert stats["executor"]["counters"].get("retried", 0) == retried
    assert stats["executor"]["in_flight_per_expert"].get("slow", 0) == 0


def test_a_retry_that_cannot_fit_the_remaining_budget_is_not_dispatched(url: str) -> None:
    # flaky's first answer (its request #1) takes ~1.5 s: its recent p50 latency.
    first = _done(_stream(url, {"prompt": "p", "primary": "flaky", "experts": []}))
    assert first["primary"]["attempts"] == 1
    before = _stats(url)["executor"]["counters"]["dispatched"]
    # Request #2 fails at once; a retry would need ~1.5 s of the 1 s budget.
    done = _done(_stream(url, {"prompt": "p", "primary": "general", "experts": ["flaky"],
                               "budget_s": 1}))
    (flaky,) = done["experts"]
    assert (flaky["status"], flaky["attempts"]) == ("budget", 1), flaky
    assert "no attempt started" in flaky["error"] and "p50 latency" in flaky["error"]
    assert _stats(url)["executor"]["counters"]["dispatched"] - before == 2  # general, flaky


def test_quorum_first_fuses_after_the_fastest_and_cuts_the_others(url: str) -> None:
    events = _stream(url, {"prompt": "p", "primary": "general",
                           "experts": ["slow", "middle", "quick"], "min_experts": 1})
    done = _done(events)
    status = {r["expert"]: (r["status"], r["error_code"]) for r in done["experts"]}
    assert status == {"quick": ("success", None), "middle": ("cancelled", "quorum_reached"),
                      "slow": ("cancelled", "quorum_reached")}
    fusion = next(data for kind, data in events if kind == "fusion")
    assert "**quick**" in fusion["content"] and "Unavailable experts" not in fusion["content"]
    _poll(lambda: all(_stats(url)["experts"][e]["active"] == 0 for e in ("slow", "middle")),
          "the cut specialists' engines idle")


def test_the_openai_route_takes_the_budget_in_extra_body(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60)
    reply = client.chat.completions.create(
        model="chorus",
        messages=[{"role": "user", "content": "a general, general question, and slow"}],
        extra_body={"budget_s": 1.0})
    # `general` answers (two keyword hits), `slow` (one) is a specialist: it was cut and listed, and the answer came.
    assert reply.choices[0].message.content.startswith("[general]")
    assert "**slow**: budget" in reply.choices[0].message.content


@pytest.mark.parametrize("field,value", [("budget_s", 0), ("budget_s", "1"),
                                         ("min_experts", 0), ("min_experts", 1.5)])
def test_a_bad_budget_or_quorum_is_a_422_naming_the_field(url: str, field: str,
                                                         value: Any) -> None:
    response = httpx.post(f"{url}/v1/orchestrate", json={"prompt": "p", field: value},
                          timeout=30)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == field


def test_chorus_ask_takes_a_budget_and_a_quorum(url: str) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    chorus = Path(sys.executable).parent / "chorus"
    out = subprocess.run(
        [str(chorus), "--url", url, "ask", "p", "--primary", "general", "--expert", "slow",
         "--expert", "quick", "--budget", "3", "--min-experts", "1", "--json"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    done = json.loads(out.splitlines()[-1])
    assert done["type"] == "done" and done["timings"]["budget_s"] == 3
    status = {r["expert"]: (r["status"], r["error_code"]) for r in done["experts"]}
    # quick answered at once, so the quorum cut slow before the budget did
    assert status == {"quick": ("success", None), "slow": ("cancelled", "quorum_reached")}
