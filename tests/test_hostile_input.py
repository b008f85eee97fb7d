"""No 5xx and no hang from any input, against the served app (issue 8).

A table of every class of hostile input with the status and field it must name, and
a hypothesis fuzz of a few hundred generated bodies per POST route.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import config_dict, until

pytestmark = pytest.mark.usefixtures("ray_session")
FAST = {"ttft_s": 0.0, "token_latency_s": 0.0, "tokens": 3}


@pytest.fixture(scope="module")
def url(serve_port: int, tmp_path_factory) -> str:
    from ray import serve

    from serve_app import build_app

    data = config_dict("mock")
    for expert in data["experts"]:
        expert["mock"].update(FAST)
    data["executor"]["max_queue"] = 4096
    path = tmp_path_factory.mktemp("hostile") / "hostile.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name="hostile", route_prefix="/hostile")
    return f"http://127.0.0.1:{serve_port}/hostile"


CHAT = "/v1/chat/completions"
ORCH = "/v1/orchestrate"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

CASES = [
    ("nested 3000 levels (6 KB)", "POST", ORCH, b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}",
     {}, 400, "<body>", "invalid_json"),
    ("nested past the depth limit", "POST", ORCH, json.dumps(
        {"prompt": "x", "experts": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
     {}, 400, "<body>", "invalid_json"),
    ("body over the size limit", "POST", ORCH, b'{"prompt": "' + b"x" * (3 * 1024 * 1024) + b'"}',
     {}, 413, "<body>", "body_too_large"),
    ("seed with 4300 digits", "POST", ORCH, b'{"prompt": "x", "seed": ' + b"9" * 4300 + b"}",
     {}, 422, "seed", "invalid_request"),
    ("seed past 64 bits", "POST", ORCH, b'{"prompt": "x", "seed": 18446744073709551616}',
     {}, 422, "seed", "invalid_request"),
    ("timeout_s 1e309", "POST", ORCH, b'{"prompt": "x", "timeout_s": 1e309}',
     {}, 422, "timeout_s", "invalid_request"),
    ("temperature NaN", "POST", ORCH, b'{"prompt": "x", "temperature": NaN}',
     {}, 422, "temperature", "invalid_request"),
    ("max_tokens -Infinity", "POST", CHAT,
     b'{"model": "chorus", "messages": [], "max_tokens": -Infinity}',
     {}, 422, "max_tokens", "invalid_request"),
    ("lone surrogate in the prompt", "POST", ORCH, b'{"prompt": "hi \\ud800 there"}',
     {}, 422, "prompt", "invalid_request"),
    ("lone surrogate in a message", "POST", CHAT,
     b'{"model": "chorus", "messages": [{"role": "user", "content": "\\udfff"}]}',
     {}, 422, "messages[0].content", "invalid_request"),
    ("lone surrogate in a key", "POST", ORCH, b'{"prompt": "x", "\\ud800": 1}',
     {}, 422, "<body>", "invalid_request"),
    ("stream 'yes' on the chat route", "POST", CHAT,
     json.dumps({"model": "chorus", "messages": MSG, "stream": "yes"}).encode(),
     {}, 422, "stream", "invalid_request"),
    ("stream_experts 1", "POST", ORCH, b'{"prompt": "x", "stream_experts": 1}',
     {}, 422, "stream_experts", "invalid_request"),
    ("not UTF-8", "POST", ORCH, b'{"prompt": "\xff\xfe"}', {}, 400, "<body>", "invalid_json"),
    ("X-Request-ID of 60 KB", "POST", ORCH, b'{"prompt": "x"}', {"X-Request-ID": "r" * 60_000},
     400, "x-request-id", "invalid_header"),
    ("unknown chat parameter", "POST", CHAT,
     json.dumps({"model": "chorus", "messages": MSG, "top_k": 3}).encode(),
     {}, 400, "top_k", "unsupported_parameter"),
    ("lone surrogate in a legacy prompt", "POST", COMP,
     b'{"model": "general", "prompt": "\\ud800"}', {}, 422, "prompt", "invalid_request"),
    ("legacy max_tokens NaN", "POST", COMP, b'{"model": "general", "prompt": "x", "max_tokens": NaN}',
     {}, 422, "max_tokens", "invalid_request"),
    ("legacy echo", "POST", COMP, b'{"model": "general", "prompt": "x", "echo": true}',
     {}, 400, "echo", "unsupported_parameter"),
    ("legacy stream 'yes'", "POST", COMP, b'{"model": "general", "prompt": "x", "stream": "yes"}',
     {}, 422, "stream", "invalid_request"),
    ("priority header '--1'", "POST", CHAT, json.dumps({"model": "chorus", "messages": MSG}).encode(),
     {"X-Chorus-Priority": "--1"}, 422, "x-chorus-priority", "invalid_request"),
    ("priority of 5000 digits", "POST", CHAT,
     json.dumps({"model": "chorus", "messages": MSG, "priority": "9" * 5000}).encode(),
     {}, 422, "priority", "invalid_request"),
    ("logit_bias key '²'", "POST", CHAT,
     json.dumps({"model": "general", "messages": MSG, "logit_bias": {"²": 1}}).encode(),
     {}, 422, "logit_bias", "invalid_request"),
    # Numbers are strict: a string or a boolean is refused, not converted.
    ("max_tokens true", "POST", CHAT,
     json.dumps({"model": "general", "messages": MSG, "max_tokens": True}).encode(),
     {}, 422, "max_tokens", "invalid_request"),
    ("max_completion_tokens '5'", "POST", CHAT,
     json.dumps({"model": "general", "messages": MSG, "max_completion_tokens": "5"}).encode(),
     {}, 422, "max_completion_tokens", "invalid_request"),
    ("temperature '0.5'", "POST", CHAT,
     json.dumps({"model": "general", "messages": MSG, "temperature": "0.5"}).encode(),
     {}, 422, "temperature", "invalid_request"),
    ("top_p true", "POST", CHAT,
     json.dumps({"model": "general", "messages": MSG, "top_p": True}).encode(),
     {}, 422, "top_p", "invalid_request"),
    ("legacy max_tokens '5'", "POST", COMP, b'{"model": "general", "prompt": "x", "max_tokens": "5"}',
     {}, 422, "max_tokens", "invalid_request"),
    ("legacy seed '3'", "POST", COMP, b'{"model": "general", "prompt": "x", "seed": "3"}',
     {}, 422, "seed", "invalid_request"),
    ("timeout_s true", "POST", ORCH, b'{"prompt": "x", "timeout_s": true}',
     {}, 422, "timeout_s", "invalid_request"),
    ("seed true", "POST", ORCH, b'{"prompt": "x", "seed": true}', {}, 422, "seed", "invalid_request"),
    ("wrong method on completions", "GET", COMP, b"", {}, 405, "<method>", "method_not_allowed"),
    ("unknown route", "GET", "/v1/nothing-here", b"", {}, 404, "<path>", "not_found"),
    ("unknown POST route", "POST", "/v1/completions/x", b"{}", {}, 404, "<path>", "not_found"),
    ("wrong method", "GET", ORCH, b"", {}, 405, "<method>", "method_not_allowed"),
    ("wrong method on chat", "PUT", CHAT, b"{}", {}, 405, "<method>", "method_not_allowed"),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "headers", "status", "field", "code"),
                         CASES, ids=[c[0] for c in CASES])
def test_each_class_of_hostile_input_gets_its_4xx(url: str, case: str, method: str, path: str,
                                                  body: bytes, headers: dict[str, str],
                                                  status: int, field: str, code: str) -> None:
    response = httpx.request(method, f"{url}{path}", content=body or None, timeout=30,
                             headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (field, code), error
    assert error["message"] and error["type"]
    if field.startswith("<"):
        return
    assert error["message"].startswith(f"{field}:")


def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all(url: str) -> None:
    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * (256 * 1024)
        yield b'"}'

    response = httpx.post(f"{url}{ORCH}", content=chunks(), timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("<body>", "body_too_large")


# --------------------------------------------------------------------------- hang-ups

HANG_UPS = [
    (ORCH, {"prompt": "review this python code and calculate the sum"}),
    (ORCH, {"prompt": "review this python code", "stream": False}),
    (CHAT, {"model": "chorus", "messages": MSG, "stream": True}),
    (CHAT, {"model": "chorus", "messages": MSG, "n": 2}),
    (COMP, {"model": "general", "prompt": "x"}),
]


def _hang_up(url: str, path: str, body: dict[str, Any], i: int, missing: int = 0) -> socket.socket:
    """A raw POST that sends `missing` bytes fewer than its Content-Length says."""
    where = urlsplit(url)
    raw = json.dumps(body).encode()
    sock = socket.create_connection((where.hostname, where.port))
    sock.sendall(f"POST {where.path}{path} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(raw) + missing}"
                 "\r\n\r\n".encode() + raw)
    if i % 2:  # half of them reset the connection rather than close it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


def _replica() -> tuple[Any, Path]:
    """The `hostile` app's ingress replica (one) and its log file."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::hostile#ChorusIngress#")]
    assert len(names) == 1, names
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    files = list(logs.glob(f"replica_hostile_ChorusIngress_{names[0].rsplit('#', 1)[1]}*.log"))
    assert len(files) == 1, files
    return ray.get_actor(names[0], namespace="serve"), files[0]


async def test_callers_who_hang_up_early_are_counted_disconnected_not_errors(url: str) -> None:
    replica, log = _replica()
    start = log.stat().st_size

    async def ongoing(n: int) -> bool:
        return await replica.get_num_ongoing_requests.remote() == n

    async def outcomes() -> dict[str, int]:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(f"{url}/v1/stats")
        assert response.status_code == 200, response.text
        return response.json()["requests"]["outcomes"]

    await until(lambda: ongoing(0), timeout=30, what="the replica idle")
    before = await outcomes()

    # Mid-body: each handler waits for bytes that never come, then its caller leaves.
    sockets = [_hang_up(url, path, body, i, missing=64)
               for i, (path, body) in enumerate(HANG_UPS * 2)]
    await until(lambda: ongoing(len(sockets)), timeout=30, what="every handler reading its body")
    for sock in sockets:
        sock.close()

    async def counted(n: int) -> bool:
        return (await outcomes())["disconnected"] - before["disconnected"] == n

    await until(lambda: counted(len(sockets)), timeout=30, what="each hang-up counted once")

    # Right after the whole body: in the body, the plan or the first bytes, by chance.
    for i in range(30):
        path, body = HANG_UPS[i % len(HANG_UPS)]
        _hang_up(url, path, body, i).close()
    await until(lambda: ongoing(0), timeout=30, what="every hang-up over")

    async with httpx.AsyncClient(timeout=30) as http:
        again = await http.post(f"{url}{ORCH}", json={"prompt": "hello", "stream": False})
    assert again.status_code == 200 and again.json()["primary"]["status"] == "success"
    after = await outcomes()
    # Which of the 30 reached the handler before their caller left is chance; each request
    # ended at most once, as ok or disconnected, and none as a failure.
    grew = {k: after[k] - before[k] for k in after}
    assert grew["failed"] == 0, grew
    assert len(sockets) + 1 <= grew["ok"] + grew["disconnected"] <= len(sockets) + 30 + 1, grew
    text = log.read_bytes()[start:].decode(errors="replace")
    for bad in ("unexpected error", "Request failed", "Traceback", " 500 "):
        assert bad not in text, text[max(0, text.index(bad) - 300):text.index(bad) + 1500]


# --------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "𝕏" * 5]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                       children, max_size=4),
    max_leaves=12)
ORCH_FIELDS = ["prompt", "stream", "priority", "experts", "primary", "strategy", "timeout_s",
               "max_tokens", "temperature", "seed", "stream_experts", "messages", "sampling"]
CHAT_FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens",
               "max_completion_tokens", "temperature", "seed", "top_p", "n", "stop", "logprobs",
               "top_logprobs", "response_format", "tools", "tool_choice", "logit_bias",
               "priority"]
COMP_FIELDS = ["model", "prompt", "stream", "stream_options", "max_tokens", "temperature",
               "top_p", "n", "stop", "logprobs", "seed", "echo", "priority"]
GOOD = {"prompt": st.just("review python code"), "stream": st.booleans(),
        "priority": st.sampled_from(["high", "normal", "low"]),
        "experts": st.lists(st.sampled_from(["code", "math", "critic"]), max_size=2),
        "primary": st.sampled_from(["general", "code"]), "max_tokens": st.integers(1, 8),
        "model": st.sampled_from(["chorus", "code"]), "messages": st.just(MSG),
        "temperature": st.floats(0, 2), "seed": st.integers(0, 100)}


def _bodies(fields: list[str]) -> st.SearchStrategy[Any]:
    """Mostly well-shaped bodies with hostile values; sometimes anything at all."""
    value = {f: (GOOD[f] | JSON) if f in GOOD else JSON for f in fields}
    shaped = st.fixed_dictionaries({}, optional={**value, "surplus": JSON})
    return st.one_of(shaped, shaped, shaped, JSON)


def _send(url: str, path: str, body: Any) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    return httpx.post(f"{url}{path}", content=raw, timeout=30,
                      headers={"Content-Type": "application/json"})


def _assert_no_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"]


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(body=_bodies(ORCH_FIELDS))
def test_fuzzed_orchestrate_bodies_never_get_a_5xx(url: str, body: Any) -> None:
    if isinstance(body, dict) and body.get("stream") is True:
        body["stream"] = False  # whole answers: a hang shows as an httpx timeout
    _assert_no_5xx(_send(url, ORCH, body))


@FUZZ
@given(body=_bodies(CHAT_FIELDS))
def test_fuzzed_chat_bodies_never_get_a_5xx(url: str, body: Any) -> None:
    if isinstance(body, dict) and body.get("stream") is True:
        body["stream"] = False
    _assert_no_5xx(_send(url, CHAT, body))


@FUZZ
@given(body=_bodies(COMP_FIELDS))
def test_fuzzed_completion_bodies_never_get_a_5xx(url: str, body: Any) -> None:
    if isinstance(body, dict) and body.get("stream") is True:
        body["stream"] = False
    _assert_no_5xx(_send(url, COMP, body))
