"""The service: `serve run` as a subprocess, real HTTP, the real `openai` client, handles.

Serve starts once for the module on the session's Ray instance. App `chorus` is the
default mock team started by `serve run serve_app:app` in a subprocess; app `guarded`
(in-process `serve.run`) has an API key, a small queue, slow experts and an expert that
leaks a fake key and a `<think>` block, for the guard, auth, flood and disconnect checks.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from orchestration.client import Client
from tests.conftest import config_dict, until

pytestmark = pytest.mark.usefixtures("ray_session")
KEY = "test-key-123"
SECRET = "sk-ABCDEFGHIJKLMNOPQRSTUVWX1234"
LEAK = f" <think>internal plan: never show</think> use {SECRET} please"


def _chorus_actors(prefix: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


@pytest.fixture(scope="module")
def guarded(serve_port: int, tmp_path_factory) -> str:
    from ray import serve

    from serve_app import build_app

    data = config_dict("mock")
    tweaks = {
        # Slower than the stream's hold time, so the 4-character pieces of the leak
        # travel in separate deltas and the secret spans several of them.
        "general": {"mock": {"inject": LEAK, "inject_chunk": 4, "tokens": 6,
                             "token_latency_s": 0.15}},
        "code": {"mock": {"ttft_s": 0.4, "tokens": 3}},
        "math": {"mock": {"tokens": 400, "token_latency_s": 0.05}},
        "critic": {"mock": {"ttft_s": 20}},
    }
    for expert in data["experts"]:
        expert["mock"].update(tweaks[expert["name"]]["mock"])
    data["executor"].update(max_in_flight=2, max_queue=4)
    data["server"].update(api_key=KEY)
    path = tmp_path_factory.mktemp("cfg") / "guarded.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name="guarded", route_prefix="/guarded")
    return f"http://127.0.0.1:{serve_port}/guarded"


def _sse(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[tuple]:
    with httpx.stream("POST", f"{url}/v1/orchestrate", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(iter_sse(response.iter_lines()))


# --------------------------------------------------------------------------- streaming


def test_streaming_orchestrate_events_in_documented_order(base_url) -> None:
    url, _ = base_url
    events = _sse(url, {"prompt": "Review this Python code for a bug", "primary": "general",
                        "max_tokens": 12})
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "plan" and kinds[-1] == "done" and kinds.count("done") == 1
    assert "error" not in kinds and kinds.count("fusion") == 1 and kinds[-2] == "fusion"
    plan = events[0][1]["plan"]
    assert [e["expert"] for e in plan["experts"]] == ["critic", "code"]  # best fit first
    assert kinds.count("expert") == 2
    assert kinds.index("primary") < kinds.index("fusion")
    deltas = "".join(data["delta"] for kind, data in events if kind == "primary")
    done = events[-1][1]
    assert deltas == done["primary"]["result"] and done["content"].startswith(deltas)
    assert "**code**" in done["content"] and done["timings"]["total_s"] > 0


def test_non_streaming_orchestrate_and_request_id(base_url) -> None:
    url, _ = base_url
    response = httpx.post(f"{url}/v1/orchestrate", json={"prompt": "hello", "stream": False},
                          headers={"X-Request-ID": "my-req-1"}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "correlation_id", "plan", "content", "primary", "experts",
                         "timings"}
    # The server's own id identifies the request; the caller's is only a label.
    assert body["id"].startswith("req-") and body["id"] == response.headers["x-chorus-request-id"]
    assert body["correlation_id"] == "my-req-1" == response.headers["x-request-id"]
    assert body["plan"]["request_id"] == body["id"]
    assert body["primary"]["status"] == "success" and body["content"]


def test_openai_client_chat_completions(base_url) -> None:
    import openai

    url, _ = base_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"chorus", "general", "code", "math", "critic"}
    assert client.models.retrieve("code").id == "code"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-nothing")
    assert (missing.value.body["param"], missing.value.body["code"]) == ("model", "unknown_expert")
    for model in ("chorus", "code"):
        messages = [{"role": "user", "content": "Review this Python function"}]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=10)
        text = whole.choices[0].message.content
        assert text and whole.choices[0].finish_reason == "length"  # 10 of 24 tokens
        assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens > 0
        chunks = list(client.chat.completions.create(
            model=model, messages=messages, max_tokens=10, stream=True,
            stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert ("Expert contributions" in text) == (model == "chorus")
        assert text.startswith("[code]")  # for `chorus` too: the router's best fit leads


def test_openai_seed_changes_the_sample_and_repeats_it(base_url) -> None:
    import openai

    url, _ = base_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")

    def ask(seed: int) -> str:
        reply = client.chat.completions.create(
            model="general", seed=seed, max_tokens=8,
            messages=[{"role": "user", "content": "hello"}])
        return reply.choices[0].message.content

    assert ask(1) == ask(1) != ask(2)  # the mock samples from (expert, prompt, seed)


def test_cli_ask_and_stats_against_the_server(base_url) -> None:
    url, _ = base_url
    run = subprocess.run([sys.executable, "-m", "orchestration.cli", "--url", url, "ask",
                          "check this python code", "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "general" in run.stdout and "code" in run.stdout and "done" in run.stdout
    stats = subprocess.run([sys.executable, "-m", "orchestration.cli", "--url", url, "stats"],
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0 and json.loads(stats.stdout)["executor"]["active"] == 0


# --------------------------------------------------------------------------- bad input

BAD = [
    ("empty prompt", "/v1/orchestrate", {"prompt": ""}, 422, "prompt"),
    ("1 MB prompt", "/v1/orchestrate", {"prompt": "x" * 1_000_000}, 422, "prompt"),
    ("prompt of wrong type", "/v1/orchestrate", {"prompt": 3}, 422, "prompt"),
    ("max_tokens of wrong type", "/v1/orchestrate", {"prompt": "x", "max_tokens": "many"}, 422,
     "max_tokens"),
    ("max_tokens over limit", "/v1/orchestrate", {"prompt": "x", "max_tokens": 10**6}, 422,
     "max_tokens"),
    ("unknown expert", "/v1/orchestrate", {"prompt": "x", "experts": ["oracle"]}, 404,
     "experts[0]"),
    ("negative timeout", "/v1/orchestrate", {"prompt": "x", "timeout_s": -1}, 422, "timeout_s"),
    ("stream not a boolean", "/v1/orchestrate", {"prompt": "x", "stream": "yes"}, 422, "stream"),
    ("invalid JSON", "/v1/orchestrate", b"{prompt: ", 400, "<body>"),
    ("body not an object", "/v1/orchestrate", [1, 2], 400, "<body>"),
    ("unknown model", "/v1/chat/completions",
     {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("no messages", "/v1/chat/completions", {"model": "chorus", "messages": []}, 422, "messages"),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_documented_4xx_naming_the_field(
    base_url, case: str, path: str, body: Any, status: int, field: str
) -> None:
    url, _ = base_url
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{url}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"] and error["code"]
    assert field.split("[")[0] in error["message"]


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": f"Bearer {KEY}"}, 200),
    ({"X-API-Key": KEY}, 200),
])
def test_api_key(guarded: str, headers: dict[str, str], status: int) -> None:
    response = httpx.post(f"{guarded}/v1/orchestrate", json={"prompt": "hi", "stream": False},
                          headers=headers, timeout=60)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"]["param"] == "authorization"
        assert response.headers["www-authenticate"] == "Bearer"


# --------------------------------------------------------------------------- guard


def test_guard_hides_secrets_and_reasoning_streamed_or_not(guarded: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    events = _sse(guarded, {"prompt": "hello", "primary": "general"}, auth)
    deltas = [data["delta"] for kind, data in events if kind == "primary"]
    # The mock sends the leak in 4-character pieces, 0.15 s apart (three times the
    # stream's hold): the key spans several deltas, however busy the machine.
    assert len(deltas) >= 4
    raw = json.dumps(events)
    for secret in (SECRET, "sk-ABCD", "internal plan", "<think>"):
        assert secret not in raw
    assert "[REDACTED]" in "".join(deltas)
    whole = httpx.post(f"{guarded}/v1/orchestrate", json={"prompt": "hello", "stream": False},
                       headers=auth, timeout=60)
    assert SECRET not in whole.text and "internal plan" not in whole.text
    assert "[REDACTED]" in whole.json()["content"]


# --------------------------------------------------------------------------- backpressure


async def test_flood_gets_429_then_service_recovers(guarded: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "flood", "primary": "code", "experts": [], "stream": False}
    async with httpx.AsyncClient(timeout=120, headers=auth) as http:
        responses = await asyncio.gather(*(
            http.post(f"{guarded}/v1/orchestrate", json=body) for _ in range(24)))
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429} and codes.count(429) >= 10, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        again = await http.post(f"{guarded}/v1/orchestrate", json=body)
        assert again.status_code == 200


# --------------------------------------------------------------------------- disconnect


async def test_disconnect_cancels_every_task_of_the_request(guarded: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=60, headers=auth) as http:
        body = {"prompt": "long", "primary": "math", "experts": ["critic"]}
        async with http.stream("POST", f"{guarded}/v1/orchestrate", json=body) as response:
            async for line in response.aiter_lines():
                if line == "event: primary":
                    break  # the primary is streaming and the critic is still thinking

        async def stats() -> dict[str, Any]:
            return (await http.get(f"{guarded}/v1/stats")).json()

        async def idle() -> bool:
            s = await stats()
            return (s["executor"]["active"] == 0 and s["executor"]["queued"] == 0
                    and all(e["active"] == 0 for e in s["experts"].values()))

        await until(idle, timeout=20, what="every task of the request cancelled")
        experts = (await stats())["experts"]
        assert experts["math"]["cancelled"] >= 1 and experts["critic"]["cancelled"] >= 1
        assert experts["math"]["completed"] == 0


# --------------------------------------------------------------------------- metrics


async def test_prometheus_metrics_are_exported(base_url, guarded: str) -> None:
    import ray

    url, _ = base_url
    _sse(url, {"prompt": "review python code", "max_tokens": 6})
    refused = httpx.post(f"{guarded}/v1/orchestrate", json={"prompt": "x"}, timeout=30)
    assert refused.status_code == 401
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ('ray_chorus_requests_total{', 'route="/v1/orchestrate"', 'outcome="ok"',
              'ray_chorus_task_outcomes_total{', 'status="success"',
              "ray_chorus_ttft_seconds_bucket", "ray_chorus_request_latency_seconds_bucket",
              "ray_chorus_in_flight", "ray_chorus_queue_depth")

    async def exported() -> bool:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text
        # Tagged by route template, so the prefixed app's 401 counts under the same route.
        unauthorized = [line for line in text.splitlines()
                        if line.startswith("ray_chorus_requests_total{")
                        and 'outcome="unauthorized"' in line]
        # (Other modules' 401s, on other routes, may be in the same session's series.)
        return all(w in text for w in wanted) and any(
            'route="/v1/orchestrate"' in line for line in unauthorized) and not any(
            'route="/guarded' in line for line in unauthorized)

    await until(exported, timeout=60, what="Chorus series on Ray's Prometheus endpoint")


# --------------------------------------------------------------------------- handles


async def test_connect_streams_the_same_events_as_http(base_url) -> None:
    url, _ = base_url
    prompt = "calculate the sum in python"
    over_http = _sse(url, {"prompt": prompt, "max_tokens": 10})
    async with Client.connect("chorus") as client:
        over_handle = [e async for e in client.stream(prompt, max_tokens=10)]
        result = await client.run(prompt, max_tokens=10)

    def shape(kinds_and_data: list[tuple[str, dict]]) -> tuple:
        kinds = [k for k, _ in kinds_and_data]
        text = "".join(d["delta"] for k, d in kinds_and_data if k == "primary")
        experts = sorted((d["result"]["expert"], d["result"]["result"])
                         for k, d in kinds_and_data if k == "expert")
        fusion = [d["content"] for k, d in kinds_and_data if k == "fusion"]
        return [k for k in kinds if k != "expert"], text, experts, fusion

    handle_events = [(e.type, e.model_dump(mode="json")) for e in over_handle]
    assert shape(handle_events) == shape(over_http)
    assert result.content == over_http[-1][1]["content"]


def test_connect_sync_helpers(base_url) -> None:
    client = Client.connect("chorus")
    result = client.run_sync("hello", max_tokens=5)
    assert result.primary.ok and result.content.startswith("[general]")
    events = client.stream_sync("hello", max_tokens=5)
    assert events[0].type == "plan" and events[-1].type == "done"
    assert events[-1].content == result.content  # the mock is deterministic
    assert client.stats_sync()["executor"]["active"] == 0


async def test_deleting_the_application_removes_its_actors(guarded: str) -> None:
    from ray import serve

    # Its controller, and the 4 experts, executor and router it owns.
    assert len(_chorus_actors("chorus-guarded.")) == 7
    serve.delete("guarded")

    async def gone() -> bool:
        return not _chorus_actors("chorus-guarded.")

    await until(gone, timeout=30, what="guarded team's actors removed")


async def test_ctrl_c_on_serve_run_leaves_no_actor(base_url) -> None:
    _, proc = base_url
    assert len(_chorus_actors("chorus-chorus.")) == 7
    proc.send_signal(signal.SIGINT)
    await asyncio.to_thread(proc.wait, 60)

    async def gone() -> bool:
        return not _chorus_actors("chorus-")

    await until(gone, timeout=30, what="no Chorus actor left")
