"""An answer that survives a failure mid-stream, against the served app (issue 18).

One team: `math` is one slow-starting replica (`startup_s`, a model's load), `critic`
two replicas, `code` fails mid-stream on every request (after 5 tokens) with `general`
as its fallback, `stuck` stops sending tokens mid-stream (fallback `general`), and
`scribe` writes a long answer (225 tokens, 0.2 s apart: 45 s) under a stall limit of
2 s. Each failure is continued, never regenerated: the caller's text is one answer on
every route, and the task result says where each attempt took over (`continued_from`).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from tests.conftest import config_dict

pytestmark = pytest.mark.usefixtures("ray_session")
APP = "failover"


@pytest.fixture(scope="module")
def url(serve_port: int, tmp_path_factory: Any) -> str:
    from ray import serve

    from serve_app import build_app

    data = config_dict("mock")
    for expert in data["experts"]:
        expert["mock"].update(ttft_s=0.0, token_latency_s=0.005)
        if expert["name"] == "math":  # ~3 s answers, and a restart takes 3 s
            expert.update(max_restarts=5)
            expert["mock"].update(tokens=60, token_latency_s=0.05, startup_s=3)
        if expert["name"] == "critic":
            expert.update(max_restarts=5, replicas={"min": 2, "max": 2})
            expert["mock"].update(tokens=60, token_latency_s=0.05)
        if expert["name"] == "general":
            expert["mock"].update(tokens=24)
        if expert["name"] == "code":  # breaks off after 5 tokens, every time
            expert.update(fallback="general")
            expert["mock"].update(fail_every=1, fault_after_tokens=5)
    data["experts"] += [
        {"name": "stuck", "backend": "mock", "description": "Stops mid-answer.",
         "keywords": ["stuck"], "fallback": "general",
         "mock": {"ttft_s": 0.0, "token_latency_s": 0.005, "hang_every": 1,
                  "fault_after_tokens": 5}},
        {"name": "scribe", "backend": "mock", "description": "Writes at length.",
         "keywords": ["scribe"], "mock": {"ttft_s": 0.0, "token_latency_s": 0.2, "tokens": 225}},
    ]
    data["executor"].update(ttft_timeout_s=5, stall_timeout_s=2)
    path = tmp_path_factory.mktemp(APP) / f"{APP}.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name=APP, route_prefix=f"/{APP}")
    return f"http://127.0.0.1:{serve_port}/{APP}"


@pytest.fixture(scope="module", autouse=True)
def long_answer(url: str) -> Any:
    """A long answer (45 s: longer than a task's default 30 s deadline, and 20 times the
    stall limit), started first and checked last: it runs while the others do."""
    events: list[tuple[str, Any]] = []
    body = {"prompt": "write at length", "primary": "scribe", "experts": [], "timeout_s": 600,
            "max_tokens": 1000}
    thread = threading.Thread(target=lambda: events.extend(_stream(url, body)), daemon=True)
    thread.start()
    yield thread, events
    thread.join(timeout=300)


def _pids(url: str, expert: str) -> dict[str, int]:
    stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
    return {label: r["pid"] for label, r in stats["experts"][expert]["replicas"].items()}


def _stream(url: str, body: dict[str, Any],
            kill: dict[str, int] | None = None) -> list[tuple[str, Any]]:
    """The Chorus SSE events; with `kill` (replica label -> pid), SIGKILL of the replica
    the primary runs on, after its 5th delta."""
    events: list[tuple[str, Any]] = []
    with httpx.stream("POST", f"{url}/v1/orchestrate", json=body, timeout=120) as response:
        assert response.status_code == 200
        for event in iter_sse(response.iter_lines()):
            events.append(event)
            if kill and sum(kind == "primary" for kind, _ in events) == 5:
                running = [d for k, d in events if k == "task" and d["state"] == "running"]
                os.kill(kill[running[-1]["replica"]], signal.SIGKILL)
                kill = None
    return events


def _one_answer(events: list[tuple[str, Any]]) -> dict[str, Any]:
    kind, done = events[-1]
    assert kind == "done", done
    streamed = "".join(data["delta"] for kind, data in events if kind == "primary")
    assert streamed == done["primary"]["result"]  # every piece once, nothing restarted
    return done["primary"]


# --------------------------------------------------------------------------- restarts


def test_a_killed_single_replica_is_waited_for_and_continues_the_answer(url: str) -> None:
    body = {"prompt": "integrate this", "primary": "math", "experts": []}
    primary = _one_answer(_stream(url, body, kill=_pids(url, "math")))
    # No attempt was spent while it restarted (3 s): the retry waited for it.
    assert primary["attempts"] == 2 and primary["served_by"] == ["math", "math"]
    assert primary["continued_from"][0] == 0 and primary["continued_from"][1] > 0
    assert primary["result"].count("[math]") == 1 and len(primary["result"].split()) == 60


def test_a_killed_replica_with_a_healthy_peer_is_continued_on_the_peer(url: str) -> None:
    body = {"prompt": "review this", "primary": "critic", "experts": []}
    primary = _one_answer(_stream(url, body, kill=_pids(url, "critic")))
    # The retry went to the other replica (ready now), not to the one restarting.
    assert primary["attempts"] == 2 and len(set(primary["replicas"])) == 2
    assert primary["continued_from"][1] > 0


# --------------------------------------------------------------------------- fallbacks


def test_a_fallback_continues_the_answer_on_the_chorus_stream(url: str) -> None:
    body = {"prompt": "write python", "primary": "code", "experts": []}
    events = _stream(url, body)
    primary = _one_answer(events)
    assert primary["served_by"] == ["code", "code", "code", "general"]
    cuts = primary["continued_from"]
    assert cuts[0] == 0 and cuts[1] < cuts[2] < cuts[3] < len(primary["result"])
    text = primary["result"]
    assert text.startswith("[code]") and text.count("[code]") == 1 and "[general]" not in text
    assert len(text.split()) == 24  # code's 15 tokens, then general's words up to 24
    assert len(text[:cuts[1]].split()) == 5  # each code attempt broke off after 5 tokens
    assert primary["tokens"] == 24  # usage: every token the caller received, once
    stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
    assert stats["experts"]["code"]["continuations"] >= 2
    assert stats["experts"]["general"]["continuations"] >= 1


def test_openai_streams_the_same_one_answer_as_a_plain_request(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "write python"}]
    plain = client.chat.completions.create(model="code", messages=messages)
    chunks = client.chat.completions.create(model="code", messages=messages, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    # Usage counts each token of the answer once; the prompt is the last attempt's, with
    # the text it continued.
    assert plain.usage.completion_tokens == 24
    assert plain.usage.prompt_tokens > 2 + 15  # "write python", then the 15 tokens it continued
    before = streamed[: streamed.index(" ", len("[code]") + 1)]  # text before the failure
    assert streamed.count("[code]") == 1 and streamed.startswith(before)
    assert "[general]" not in streamed
    text = client.completions.create(model="code", prompt="write python", stream=True)
    whole = client.completions.create(model="code", prompt="write python")
    assert "".join(c.choices[0].text for c in text) == whole.choices[0].text


def test_a_structured_answer_that_broke_off_ends_with_a_clear_error(url: str) -> None:
    body = {"prompt": "write python", "primary": "code", "experts": [],
            "sampling": {"response_format": {"type": "json_object"}}}
    kind, error = _stream(url, body)[-1]
    assert kind == "error" and error["code"] == "primary_error", error
    assert "cannot be continued" in error["message"]


# --------------------------------------------------------------------------- timeouts


def test_a_stalled_attempt_is_cancelled_and_continued_by_the_fallback(url: str) -> None:
    body = {"prompt": "you are stuck", "primary": "stuck", "experts": []}
    primary = _one_answer(_stream(url, body))
    # Cancelled after the stall limit; `stuck` has no other replica: its fallback continues.
    assert primary["served_by"] == ["stuck", "general"]
    assert len(primary["result"][:primary["continued_from"][1]].split()) == 5
    assert primary["result"].startswith("[stuck]") and "[general]" not in primary["result"]
    stats = httpx.get(f"{url}/v1/stats", timeout=30).json()["experts"]["stuck"]
    assert stats["cancelled"] >= 1 and stats["active"] == 0  # its engine let it go


def test_no_retry_starts_after_the_requests_deadline(url: str) -> None:
    def dispatched() -> int:
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        return stats["executor"]["counters"]["dispatched"]

    before = dispatched()
    body = {"prompt": "you are stuck", "primary": "stuck", "experts": [], "timeout_s": 1}
    kind, error = _stream(url, body)[-1]  # the deadline (1 s) comes before the stall limit
    assert kind == "error" and error["code"] == "primary_timeout", error
    assert "deadline of 1s" in error["message"] and "after 1 attempt(s)" in error["message"]
    assert dispatched() - before == 1  # no retry, no fallback


def test_a_long_answer_that_keeps_coming_is_never_cut(long_answer: Any) -> None:
    thread, events = long_answer
    thread.join(timeout=300)
    primary = _one_answer(events)
    # 45 s of tokens, each within the 2 s stall limit: one attempt, never cut or retried
    assert primary["attempts"] == 1 and primary["tokens"] == 225
    assert primary["finish_reason"] == "stop"
