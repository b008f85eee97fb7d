"""Hedging a slow first token, against the served app (issue 20; docs/hedging.md).

Experts `hedged` and `unhedged` each have two replicas, and replica #0 of each waits
`SLOW_S` before every first token (a per-replica mock override); `unhedged` opts out
(`hedge: false`). The team hedges after 0.3 s: an attempt on the slow replica gets a
copy on the fast one, which answers first; the slow one is cancelled.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from tests.conftest import config_dict

pytestmark = pytest.mark.usefixtures("ray_session")
APP = "hedge"
SLOW_S = 2.0
TOKENS = 12


def _expert(name: str, hedge: bool) -> dict[str, Any]:
    return {"name": name, "backend": "mock", "description": f"The {name} one.",
            "keywords": [name], "hedge": hedge, "replicas": {"min": 2, "max": 2},
            "mock": {"ttft_s": 0.0, "token_latency_s": 0.005, "tokens": TOKENS,
                     "replicas": {0: {"slow_every": 1, "slow_s": SLOW_S}}}}


@pytest.fixture(scope="module")
def url(serve_port: int, tmp_path_factory: Any) -> str:
    from ray import serve

    from serve_app import build_app

    data = config_dict("mock")
    general = next(e for e in data["experts"] if e["name"] == "general")
    general["mock"].update(ttft_s=0.0, token_latency_s=0.005, tokens=6)
    data["experts"] = [general, _expert("hedged", True), _expert("unhedged", False)]
    data["router"].update(method="keywords")
    data["executor"]["hedge"] = {"enabled": True, "after_s": 0.3, "max_fraction": 1.0}
    path = tmp_path_factory.mktemp(APP) / f"{APP}.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name=APP, route_prefix=f"/{APP}")
    url = f"http://127.0.0.1:{serve_port}/{APP}"
    _poll(lambda: all(_replica(url, e, i)["dispatch"]["health"] == "healthy"
                      for e in ("hedged", "unhedged") for i in (0, 1)), "all replicas ready")
    return url


def _stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/stats", timeout=30).json()


def _replica(url: str, expert: str, index: int) -> dict[str, Any]:
    replica = _stats(url)["experts"][expert]["replicas"][f"{expert}#{index}"]
    return {"dispatch": {}, **replica, **{"dispatch": replica.get("dispatch") or {}}}


def _poll(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (KeyError, TypeError, httpx.HTTPError):
            pass  # not there yet
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _ask(url: str, primary: str, experts: list[str] | None = None
         ) -> tuple[list[tuple[str, Any]], float]:
    """The events of one streamed request, and the seconds to its first primary delta."""
    body = {"prompt": "p", "primary": primary, "experts": experts or []}
    began, first = time.monotonic(), None
    events = []
    with httpx.stream("POST", f"{url}/v1/orchestrate", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for kind, data in iter_sse(response.iter_lines()):
            if kind == "primary" and first is None:
                first = time.monotonic() - began
            events.append((kind, data))
    assert events[-1][0] == "done", events[-1]
    assert first is not None
    return events, first


def _answered_by(events: list[tuple[str, Any]]) -> str:
    """The replica whose text the caller got: the attempt of the first primary delta."""
    done = events[-1][1]["primary"]
    attempt = next(data["attempt"] for kind, data in events if kind == "primary")
    streamed = "".join(data["delta"] for kind, data in events if kind == "primary")
    assert done["status"] == "success" and streamed == done["result"]
    assert {data["attempt"] for kind, data in events if kind == "primary"} == {attempt}, [
        (k, d.get("attempt"), d.get("delta"), d.get("replica"), d.get("hedged"))
        for k, d in events if k in ("primary", "task")]
    return done["replicas"][attempt - 1]


def _tokens_out(url: str) -> int:
    usage = _stats(url)["tenants"].get("default")  # (none before its first request)
    return usage["tokens"]["out"] if usage else 0


def test_every_first_token_comes_from_the_fast_replica(url: str) -> None:
    counters = _stats(url)["executor"]["counters"]
    won_before, out_before = counters.get("hedges_won", 0), _tokens_out(url)
    cancelled_before = _replica(url, "hedged", 0)["cancelled"]
    runs = [_ask(url, "hedged") for _ in range(4)]
    won = 0
    for events, _ in runs:
        done = events[-1][1]["primary"]
        assert _answered_by(events) == "hedged#1", (done["replicas"], done["hedges"])
        assert done["tokens"] == TOKENS  # the winner's answer alone
        running = [data for kind, data in events if kind == "task"]
        if done["replicas"] == ["hedged#0", "hedged#1"]:  # it began on the slow one
            assert done["hedges"] == ["won"] and done["attempts"] == 2
            assert [(t["replica"], t["hedged"]) for t in running] == [
                ("hedged#0", False), ("hedged#1", True)]
            won += 1
        else:
            assert (done["replicas"], done["hedges"]) == (["hedged#1"], [])
    assert won >= 1  # (the least-loaded pick sends the first request to #0)
    # The losers were cancelled: the slow replica's engine is idle, each loser counted
    # cancelled there, no slot held; only the winners' tokens were charged.
    _poll(lambda: _replica(url, "hedged", 0)["active"] == 0, "the slow engine idle")
    assert _replica(url, "hedged", 0)["cancelled"] - cancelled_before == won
    stats = _stats(url)
    assert stats["executor"]["counters"]["hedges_won"] - won_before == won
    assert stats["executor"]["in_flight_per_expert"].get("hedged", 0) == 0
    assert _tokens_out(url) - out_before == sum(e[-1][1]["primary"]["tokens"] for e, _ in runs)
    assert stats["experts"]["hedged"]["hedged"] > 0
    _poll(lambda: _exported_hedges("hedged", "won") >= won,
          "ray_chorus_hedges_total on Ray's Prometheus endpoint")


def _exported_hedges(expert: str, outcome: str) -> float:
    """`ray_chorus_hedges_total{expert, outcome}` (summed over workers) on this node."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_chorus_hedges_total{") and f'expert="{expert}"' in line
               and f'outcome="{outcome}"' in line)


def test_without_hedging_the_slow_replica_keeps_its_requests_waiting(url: str) -> None:
    hedges_before = sum(_stats(url)["executor"]["counters"].get(k, 0)
                        for k in ("hedges_won", "hedges_lost"))
    runs = [_ask(url, "unhedged") for _ in range(4)]
    slow = [first for events, first in runs if _answered_by(events) == "unhedged#0"]
    assert slow  # some went to the slow replica and stayed there
    assert all(first >= SLOW_S for first in slow)  # (a lower bound: its own sleep)
    for events, _ in runs:
        done = events[-1][1]["primary"]
        assert done["hedges"] == [] and done["attempts"] == 1
        assert not any(data["hedged"] for kind, data in events if kind == "task")
    assert sum(_stats(url)["executor"]["counters"].get(k, 0)
               for k in ("hedges_won", "hedges_lost")) == hedges_before


def test_a_specialist_read_by_nobody_live_is_hedged_too(url: str) -> None:
    events, _ = _ask(url, "general", ["hedged"])
    (result,) = events[-1][1]["experts"]
    assert result["status"] == "success" and result["tokens"] == TOKENS
    assert (result["replicas"], result["hedges"]) in [
        (["hedged#1"], []), (["hedged#0", "hedged#1"], ["won"])]
