"""The `chorus` CLI without a Chorus server: SSE parsing, rendering, argparse, HTTP handling."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from orchestration import cli
from orchestration.cli import JsonRenderer, Renderer, iter_sse, main
from orchestration.models import (
    DoneEvent,
    ErrorEvent,
    ExecutionPlan,
    ExpertEvent,
    ExpertTask,
    FusionEvent,
    PlanEvent,
    PrimaryDelta,
    TaskResult,
)

RID = "req-abc123"
ANSI = re.compile(r"\x1b\[")


def _events() -> list[Any]:
    """A realistic request: primary retried once, one expert ok, one timed out, append fusion."""
    plan = ExecutionPlan(
        id="plan-1", request_id=RID, strategy="PARALLEL_LIMITED",
        primary=ExpertTask(expert="general", prompt="p", role="primary"),
        experts=[ExpertTask(expert="code", prompt="p"), ExpertTask(expert="critic", prompt="p")],
        reason="keywords: code",
    )
    primary = TaskResult(task_id="t0", expert="general", role="primary", status="success",
                         result="Hello world.", attempts=2, latency_s=0.5)
    code = TaskResult(task_id="t1", expert="code", status="success",
                      result="def f():\n    return 1", attempts=1, latency_s=0.25)
    critic = TaskResult(task_id="t2", expert="critic", status="timeout",
                        error="deadline of 2.0s exceeded", attempts=3, latency_s=2.0)
    return [
        PlanEvent(request_id=RID, plan=plan),
        PrimaryDelta(request_id=RID, expert="general", delta="Hel", attempt=1),
        ExpertEvent(request_id=RID, result=code),  # arrives while the primary streams
        PrimaryDelta(request_id=RID, expert="general", delta="lo", attempt=2),
        PrimaryDelta(request_id=RID, expert="general", delta=" world.", attempt=2),
        ExpertEvent(request_id=RID, result=critic),
        FusionEvent(request_id=RID, strategy="append", content="Hello world.\n\n[code] def f()",
                    failed=[critic]),
        DoneEvent(request_id=RID, primary=primary, experts=[code, critic],
                  content="Hello world.", timings={"total_s": 2.345, "ttft_s": 0.123}),
    ]


def _sse_body(events: list[Any]) -> bytes:
    out = [": keepalive\n\n"]
    for event in events:
        out.append(f"event: {event.type}\ndata: {event.model_dump_json()}\n\n")
    return "".join(out).encode()


def _render(events: list[Any], **kwargs: Any) -> tuple[Renderer, str, str]:
    out, err = io.StringIO(), io.StringIO()
    renderer = Renderer(out, err=err, **kwargs)
    for event in events:
        renderer.handle(event.type, json.loads(event.model_dump_json()))
    return renderer, out.getvalue(), err.getvalue()


def test_iter_sse_multiline_data_comments_and_crlf() -> None:
    lines: list[str | bytes] = [
        ": keepalive\n",
        "event: plan\r\n",
        'data: {"type": "plan",\n',
        'data:  "request_id": "r1"}\n',  # a second data line: joined with "\n"
        "\n",
        ": keepalive",
        b'data: {"type": "primary", "delta": "h\xc3\xa9", "expert": "g"}',  # no event: line
        b"",
        "id: 7",
        "event: done",
        'data: {"type": "done", "timings": {}}',  # the stream ends without a blank line
    ]
    assert list(iter_sse(lines)) == [
        ("plan", {"type": "plan", "request_id": "r1"}),
        ("primary", {"type": "primary", "delta": "hé", "expert": "g"}),
        ("done", {"type": "done", "timings": {}}),
    ]


def test_iter_sse_roundtrip_of_model_events() -> None:
    body = _sse_body(_events()).decode()
    parsed = list(iter_sse(body.splitlines()))
    assert [t for t, _ in parsed] == [e.type for e in _events()]
    assert parsed[-1][1]["timings"]["ttft_s"] == 0.123
    assert list(iter_sse(["data: [DONE]", ""])) == []


def test_renderer_full_transcript() -> None:
    renderer, out, err = _render(_events())
    assert renderer.exit_code == 0 and err == "[continued: attempt 2 on general]\n"
    assert not ANSI.search(out)
    order = ["plan plan-1", "── general (primary) ──", "── Experts ──",
             "── Fused answer (append) ──", "Failed experts:", f"done {RID}"]
    positions = [out.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "PARALLEL_LIMITED · primary general · experts code, critic" in out
    assert "── general (primary) ──\nHello world." in out  # a retry continues the answer
    assert renderer.primary_text == "Hello world."
    assert "● code  success · 1 attempt · 0.25s\n  def f():\n      return 1" in out
    assert "● critic  timeout · 3 attempts · 2.00s\n  error: deadline of 2.0s exceeded" in out
    assert "✗ critic  timeout (3 attempts): deadline of 2.0s exceeded" in out
    assert "[code] def f()" in out
    assert out.rstrip().endswith(f"done {RID} · total 2.35s · ttft 0.12s")


def test_renderer_colour_and_fusion_stream() -> None:
    events = _events()
    _, coloured, _ = _render(events, colour=True)
    assert ANSI.search(coloured)
    renderer = Renderer(out := io.StringIO())
    renderer.handle("fusion_delta", {"delta": "Fu"})
    renderer.handle("fusion_delta", {"delta": "sed"})
    renderer.handle("fusion", {"strategy": "synthesize", "content": "Fused", "failed": []})
    assert out.getvalue().count("Fused") == 2  # header + streamed text, not printed twice
    assert out.getvalue() == "── Fused answer ──\nFused\n"


def test_renderer_fusion_same_as_primary_is_not_repeated() -> None:
    renderer = Renderer(out := io.StringIO())
    renderer.handle("primary", {"expert": "general", "delta": "Same text", "attempt": 1})
    renderer.handle("fusion", {"strategy": "primary", "content": "Same text", "failed": []})
    assert out.getvalue().count("Same text") == 1
    assert "(same as the primary answer above)" in out.getvalue()


def test_renderer_error_event_exit_1() -> None:
    events = _events()[:2] + [ErrorEvent(request_id=RID, code="primary_error", status=502,
                                         message="primary expert 'general' failed")]
    renderer, out, err = _render(events)
    assert renderer.exit_code == 1
    assert err == "error 502 primary_error: primary expert 'general' failed\n"
    assert "Hel" in out


def test_json_renderer_one_line_per_event() -> None:
    renderer = JsonRenderer(out := io.StringIO())
    for event in _events():
        renderer.handle(event.type, json.loads(event.model_dump_json()))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["type"] for line in lines] == [e.type for e in _events()]
    assert renderer.exit_code == 0


def test_ask_without_prompt_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ask"])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_prepare_model_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestration.modelprep as modelprep

    seen: list[list[str] | None] = []
    monkeypatch.setattr(modelprep, "main", lambda argv=None: seen.append(argv) or 7)
    assert main(["--url", "http://x", "prepare-model", "--target", "/tmp/m", "--force"]) == 7
    assert seen == [["--target", "/tmp/m", "--force"]]


# ------------------------------------------------------------------ HTTP, local test server


class _Handler(BaseHTTPRequestHandler):
    """A stand-in Chorus server: SSE for a normal prompt, 429 for prompt "busy"."""

    requests: list[tuple[str, dict[str, str], Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        _Handler.requests.append((self.path, dict(self.headers), None))
        if self.path == "/v1/stats":
            self._json(200, {"executor": {"active": 0, "max_in_flight": 8},
                             "experts": {"general": {"requests": 3}}})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "chorus"}, {"id": "general"}]})
        else:
            self._json(404, {"error": {"message": "no route", "type": "not_found", "code": None}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.requests.append((self.path, dict(self.headers), body))
        if body["prompt"] == "busy":
            self._json(429, {"error": {"message": "executor queue is full", "type": "overloaded",
                                       "param": None, "code": "queue_full"}},
                       {"Retry-After": "2"})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        payload = _sse_body(_events())
        for start in range(0, len(payload), 37):  # odd chunks: lines split across writes
            self.wfile.write(payload[start:start + 37])
            self.wfile.flush()
        self.close_connection = True


@pytest.fixture()
def server() -> Iterator[str]:
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_ask_streams_and_exits_0(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--url", server, "--api-key", "sk-test", "ask", "hi", "--expert", "code",
                 "--expert", "critic", "--strategy", "SERIAL", "--max-tokens", "16"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "[continued: attempt 2 on general]\n"  # the retry, on stderr
    assert "Hello world." in out and f"done {RID}" in out and not ANSI.search(out)
    path, headers, body = _Handler.requests[0]
    assert path == "/v1/orchestrate"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body == {"prompt": "hi", "stream": True, "priority": "normal",
                    "experts": ["code", "critic"], "strategy": "SERIAL", "max_tokens": 16}


def test_http_ask_json_mode(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", server, "ask", "hi", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["type"] for line in lines][-1] == "done"
    assert "Authorization" not in _Handler.requests[0][1]


def test_http_429_exit_2_with_retry_after(server: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_URL", server)
    assert main(["ask", "busy"]) == 2
    err = capsys.readouterr().err
    assert "error 429 queue_full: executor queue is full" in err
    assert "Retry-After: 2" in err


def test_http_stats_and_models(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", server, "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["executor"]["max_in_flight"] == 8
    assert main(["--url", server, "models"]) == 0
    assert capsys.readouterr().out.split() == ["chorus", "general"]


def test_connection_refused_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    assert main(["--url", f"http://127.0.0.1:{port}", "stats"]) == 3
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "serve run serve_app:app" in err
    assert time.monotonic() - started < 10
    assert cli.DEFAULT_URL == "http://127.0.0.1:8000"
