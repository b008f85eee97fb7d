"""Tenants and their keys (issue 19, first part): who may call, told apart by key.

Unit checks of the keyring (no Ray), then one served app with two tenants — one key
given as its SHA-256, one in an environment variable of the ingress process
(`CHORUS_TEST_TENANT_KEY`, set by conftest before Ray starts) — against real HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
from typing import Any

import httpx
import pytest
import yaml

from orchestration.config import parse_config
from orchestration.errors import ConfigError, RateLimitedError, UnauthorizedError
from orchestration.ledger import Ledger, duration
from orchestration.tenants import Keyring, TenantConfig
from tests.conftest import config_dict, until

ALPHA = "sk-alpha-0123456789"
BETA_ENV = "CHORUS_TEST_TENANT_KEY"  # its value: tests/conftest.py


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _tenants() -> list[dict[str, Any]]:
    return [{"name": "alpha", "keys": [{"key_sha256": _sha(ALPHA)}]},
            {"name": "beta", "keys": [{"key_env": BETA_ENV}, {"key_sha256": _sha("sk-b2")}]}]


def _keyring(env: dict[str, str] | None = None, api_key: str | None = None) -> Keyring:
    tenants = [TenantConfig.model_validate(t) for t in _tenants()]
    return Keyring.build(tenants, api_key, {BETA_ENV: "sk-beta-env"} if env is None else env)


# --------------------------------------------------------------------------- keyring


def test_each_key_names_its_tenant_and_nothing_else_does() -> None:
    keys = _keyring()
    assert keys.tenant_of(ALPHA) == "alpha"
    assert keys.tenant_of("sk-beta-env") == keys.tenant_of("sk-b2") == "beta"
    assert keys.tenant_of(ALPHA + "x") is None and keys.tenant_of("") is None
    assert keys.caller({"authorization": f"Bearer {ALPHA}"}) == "alpha"
    assert keys.caller({"x-api-key": "sk-b2"}) == "beta"
    for headers, what in (({}, "missing API key"), ({"authorization": "Bearer nope"},
                                                     "wrong API key")):
        with pytest.raises(UnauthorizedError) as caught:
            keys.caller(headers)
        assert caught.value.field == "authorization" and what in caught.value.message
        assert "nope" not in caught.value.message  # never echoed


def test_server_api_key_is_one_tenant_and_no_key_means_open() -> None:
    keys = Keyring.build([], "sk-single")
    assert keys.required and keys.tenant_of("sk-single") == "default"
    assert Keyring.build([], None).caller({}) is None  # nothing configured: open


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    keys, calls = _keyring(), []
    real = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    counts = []
    for token in (ALPHA, "sk-b2", "no such key"):  # first entry, last entry, none
        calls.clear()
        keys.tenant_of(token)
        counts.append(len(calls))
    assert counts == [3, 3, 3]  # constant work: no early exit on a match


def test_an_unset_key_env_fails_the_start_naming_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        _keyring(env={})
    assert caught.value.field == "tenants[1].keys[0].key_env"
    assert BETA_ENV in caught.value.message


@pytest.mark.parametrize(("tenants", "field"), [
    ([{"name": "a", "keys": []}], "tenants[0].keys"),
    ([{"name": "a", "keys": [{"key_sha256": "abc"}]}], "tenants[0].keys[0]"),
    ([{"name": "a", "keys": [{"key_sha256": _sha("k"), "key_env": "K"}]}], "tenants[0].keys[0]"),
    ([{"name": "a", "keys": [{"key_env": "K"}]}, {"name": "a", "keys": [{"key_env": "K"}]}],
     "tenants[1].name"),
    ([{"name": "a b", "keys": [{"key_env": "K"}]}], "tenants[0].name"),
])
def test_malformed_tenants_are_refused_naming_the_field(tenants: list, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**config_dict("mock"), "tenants": tenants})
    assert caught.value.field == field, caught.value.message


# --------------------------------------------------------------------------- the ledger


def _ledger(**limits: Any) -> Ledger:
    return Ledger([TenantConfig(name="t", keys=[{"key_env": "K"}], **limits)])


def test_requests_per_minute_refuses_the_one_past_it_with_the_window_left() -> None:
    ledger = _ledger(requests_per_minute=2)
    first = ledger.admit("t")
    assert (first["x-ratelimit-limit-requests"], first["x-ratelimit-remaining-requests"]) == (
        "2", "1")
    assert ledger.admit("t")["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimitedError) as caught:
        ledger.admit("t")
    refused = caught.value
    assert (refused.status, refused.code, refused.field) == (429, "rate_limited",
                                                             "requests_per_minute")
    assert 1 <= refused.retry_after_s <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    usage = ledger.stats()["t"]
    assert (usage["requests"], usage["refused"]) == (2, {"requests_per_minute": 1})
    assert ledger.admit("default") == {}  # a tenant without limits: no headers, no refusal


def test_the_ledger_refuses_tokens_after_the_request_that_crossed_the_limit() -> None:
    ledger = _ledger(tokens_per_minute=100)
    assert ledger.admit("t")["x-ratelimit-remaining-tokens"] == "100"
    ledger.charge("t", "math", 30, 50)
    assert ledger.admit("t")["x-ratelimit-remaining-tokens"] == "20"
    ledger.charge("t", "code", 10, 90)  # crosses it: that request stands
    with pytest.raises(RateLimitedError) as caught:
        ledger.admit("t")
    assert caught.value.field == "tokens_per_minute"
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "0"
    usage = ledger.stats()["t"]
    assert usage["tokens"] == {"in": 40, "out": 140}
    assert (usage["experts"]["math"]["tokens_out"], usage["experts"]["code"]["tokens_in"]) == (
        50, 10)


def test_a_refusal_crosses_ray_with_its_headers() -> None:
    import pickle

    error = RateLimitedError("over", field="requests_per_minute", retry_after_s=7,
                             headers={"x-ratelimit-remaining-requests": "0"})
    again = pickle.loads(pickle.dumps(error))
    assert (again.retry_after_s, again.headers, again.field) == (
        7, {"x-ratelimit-remaining-requests": "0"}, "requests_per_minute")


def test_reset_durations_are_in_openais_form() -> None:
    assert [duration(s) for s in (0.02, 1.0, 6.2, 59.5, 90)] == ["20ms", "1s", "7s", "1m0s",
                                                                  "1m30s"]


def test_a_tenant_removed_by_a_redeploy_is_counted_as_the_default_one() -> None:
    ledger = _ledger(requests_per_minute=5)
    ledger.admit("t")
    ledger.configure([])
    assert ledger.stats() == {}  # nothing kept of a tenant the config no longer names
    ledger.admit("t")  # no limits any more, counted once as `default`
    assert ledger.stats()["default"]["requests"] == 1


def test_priority_max_allows_up_to_it() -> None:
    capped = TenantConfig(name="c", keys=[{"key_env": "K"}], priority_max="normal")
    assert [capped.allows(p) for p in ("low", "normal", "high")] == [True, True, False]
    assert TenantConfig(name="o", keys=[{"key_env": "K"}]).allows("high")


# --------------------------------------------------------------------------- served


LIMITED = [  # tenants of the served app only (the keyring's unit tests use `_tenants()`)
    {"name": "metered", "keys": [{"key_sha256": _sha("sk-metered")}], "requests_per_minute": 3},
    {"name": "tokened", "keys": [{"key_sha256": _sha("sk-tokened")}], "tokens_per_minute": 5},
    {"name": "sdk", "keys": [{"key_sha256": _sha("sk-sdk")}], "requests_per_minute": 1},
    {"name": "capped", "keys": [{"key_sha256": _sha("sk-capped")}], "priority_max": "normal"},
    {"name": "narrow", "keys": [{"key_sha256": _sha("sk-narrow")}], "max_in_flight": 1},
    {"name": "shared", "keys": [{"key_sha256": _sha("sk-shared")}], "requests_per_minute": 6},
]


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def url(ray_session: Any, serve_port: int, tmp_path_factory: Any) -> str:
    from ray import serve

    from serve_app import build_app

    assert os.environ.get(BETA_ENV)  # conftest sets it before Ray starts
    data = {**config_dict("mock"), "tenants": _tenants() + LIMITED,
            "server": {"ingress": {"replicas": 2}}}  # the limits hold across both
    for expert in data["experts"]:
        if expert["name"] == "math":  # the small expert the fairness test contends for
            expert.update(max_concurrency=1, mock={"ttft_s": 0.0, "token_latency_s": 0.05,
                                                   "tokens": 8})
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name="tenants", route_prefix="/tenants")
    return f"http://127.0.0.1:{serve_port}/tenants"


ROUTES = [("POST", "/v1/orchestrate", {"prompt": "hi", "stream": False}),
          ("POST", "/v1/chat/completions", {"model": "general",
                                            "messages": [{"role": "user", "content": "hi"}]}),
          ("GET", "/v1/stats", None), ("GET", "/v1/models", None),
          ("GET", "/v1/models/general", None)]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_needs_a_tenants_key(url: str, method: str, path: str, body: Any) -> None:
    beta = os.environ[BETA_ENV]
    for headers, status in (({}, 401), ({"Authorization": "Bearer sk-wrong"}, 401),
                            ({"Authorization": f"Bearer {ALPHA}"}, 200),
                            ({"Authorization": f"Bearer {beta}"}, 200)):
        response = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=60)
        assert response.status_code == status, (headers, response.text)
        if status == 401:
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("unauthorized", "authorization")
            assert response.headers["www-authenticate"] == "Bearer"
            assert "sk-wrong" not in response.text


def test_probes_and_pages_stay_open_and_the_page_asks_for_a_key(url: str) -> None:
    for path in ("/healthz", "/readyz", "/", "/v1/options"):
        assert httpx.get(f"{url}{path}", timeout=60).status_code == 200, path
    assert httpx.get(f"{url}/v1/options", timeout=60).json()["auth"] is True


def _ask(url: str, key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/orchestrate", json={"prompt": "hi", "stream": False, **body},
                      headers=_as(key), timeout=60)


def test_a_tenant_over_its_requests_per_minute_gets_429_while_another_is_served(url: str) -> None:
    remaining = []
    for _ in range(3):
        response = _ask(url, "sk-metered")
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    refused = _ask(url, "sk-metered")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("rate_limited", "requests_per_minute")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    served = _ask(url, ALPHA)  # another tenant, meanwhile: served, and it has no limits
    assert served.status_code == 200 and "x-ratelimit-limit-requests" not in served.headers
    streamed = httpx.post(f"{url}/v1/orchestrate", json={"prompt": "hi"},
                          headers=_as("sk-metered"), timeout=60)
    assert streamed.status_code == 429  # a stream is refused before its first byte too
    tenants = httpx.get(f"{url}/v1/stats", headers=_as(ALPHA), timeout=60).json()["tenants"]
    assert tenants["metered"]["requests"] == 3
    assert tenants["metered"]["refused"] == {"requests_per_minute": 2}
    assert tenants["metered"]["limits"] == {"weight": 1.0, "requests_per_minute": 3}
    assert tenants["metered"]["remaining"] == {"requests": 0}


def test_tokens_per_minute_refuses_the_request_after_the_one_that_crossed_it(url: str) -> None:
    first = _ask(url, "sk-tokened")
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-remaining-tokens"] == "5"  # as of its admission
    used = first.json()["primary"]
    assert used["tokens"] + (used["prompt_tokens"] or 0) > 5  # it crossed the limit: it stands
    refused = _ask(url, "sk-tokened")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["param"] == "tokens_per_minute"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    tenants = httpx.get(f"{url}/v1/stats", headers=_as(ALPHA), timeout=60).json()["tenants"]
    charged = tenants["tokened"]["tokens"]
    assert charged["out"] >= used["tokens"] and charged["in"] >= (used["prompt_tokens"] or 0)
    assert tenants["tokened"]["experts"][used["expert"]]["tasks"] >= 1


def test_the_openai_sdk_sees_a_rate_limit_error_it_can_retry(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-sdk", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    answer = client.chat.completions.with_raw_response.create(model="chorus", messages=messages)
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="chorus", messages=messages)
    response = caught.value.response
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert caught.value.code == "rate_limited"


def test_a_priority_above_the_tenants_priority_max_is_refused_naming_it(url: str) -> None:
    refused = _ask(url, "sk-capped", priority="high")
    assert refused.status_code == 403, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == (
        "forbidden", "priority")
    assert _ask(url, "sk-capped", priority="normal").status_code == 200
    assert _ask(url, ALPHA, priority="high").status_code == 200  # no priority_max: any


FLOOD = 16  # requests tenant alpha sends at once for the small expert (one slot, 0.4 s each)


async def _flood_then_one(url: str, one_key: str) -> tuple[int, int, int]:
    """alpha sends FLOOD requests for `math` (one slot) at once; once at least half of them
    wait, one more request comes with `one_key`. Returns how many of alpha's tasks were
    waiting then, how many of its requests were answered in the meantime (from then until
    that one request was answered), and how many of them were answered in all."""
    body = {"prompt": "sum", "primary": "math", "experts": [], "stream": False}
    done: list[int] = []
    waiting: list[int] = []
    async with httpx.AsyncClient(timeout=120, headers=_as(ALPHA)) as http:
        async def flood(i: int) -> None:
            response = await http.post(f"{url}/v1/orchestrate", json={**body, "prompt": f"{i}"})
            assert response.status_code == 200, response.text
            done.append(i)

        async def queued() -> bool:
            stats = (await http.get(f"{url}/v1/stats")).json()
            waiting.append(stats["tenants"]["alpha"]["waiting"])
            return waiting[-1] >= FLOOD // 2

        floods = [asyncio.ensure_future(flood(i)) for i in range(FLOOD)]
        await until(queued, timeout=60, what="alpha's requests queued for math")
        sent = len(done)
        answer = await http.post(f"{url}/v1/orchestrate", json=body, headers=_as(one_key))
        assert answer.status_code == 200, answer.text
        meanwhile = len(done) - sent
        await asyncio.gather(*floods)
    return waiting[-1], meanwhile, len(done)


async def test_a_flooding_tenant_delays_only_itself(url: str) -> None:
    """Fair share: beta's request takes the small expert's next slot, ahead of the alpha
    requests queued before it; sent as alpha (one tenant, first come first served), the
    same request waits behind all of them. Every request of the flood completes."""
    queued, meanwhile, answered = await _flood_then_one(url, os.environ[BETA_ENV])
    # The one in flight, and at most one more (a tie at the lift goes to the first come).
    assert meanwhile <= 2 < queued and answered == FLOOD, (queued, meanwhile)
    queued, meanwhile, answered = await _flood_then_one(url, ALPHA)
    assert meanwhile >= queued and answered == FLOOD, (queued, meanwhile)


async def test_a_tenants_max_in_flight_is_a_hard_cap(url: str) -> None:
    async with httpx.AsyncClient(timeout=120, headers=_as("sk-narrow")) as http:
        body = {"prompt": "hi", "primary": "general", "experts": [], "stream": False}
        seen: list[tuple[int, int]] = []

        async def capped_and_queued() -> bool:
            narrow = (await http.get(f"{url}/v1/stats")).json()["tenants"]["narrow"]
            seen.append((narrow["in_flight"], narrow["waiting"]))
            return narrow["waiting"] >= 1

        asks = [asyncio.ensure_future(http.post(f"{url}/v1/orchestrate", json=body))
                for _ in range(4)]
        await until(capped_and_queued, timeout=60, what="narrow's tasks waiting at its cap")
        answers = await asyncio.gather(*asks)
    assert [a.status_code for a in answers] == [200] * 4
    assert max(in_flight for in_flight, _ in seen) <= 1  # general has 8 slots; narrow gets 1


async def test_a_limit_holds_across_two_ingress_replicas(url: str) -> None:
    answered: set[int] = set()  # ingress pids that answered, each on a new connection

    async def both_reachable() -> bool:
        async with httpx.AsyncClient(timeout=60, headers=_as(ALPHA)) as own:
            answered.add((await own.get(f"{url}/v1/stats")).json()["ingress"]["pid"])
        return len(answered) == 2

    await until(both_reachable, timeout=90, what="both ingress replicas answering")

    async def one(i: int) -> int:
        async with httpx.AsyncClient(timeout=60, headers=_as("sk-shared")) as own:
            response = await own.post(f"{url}/v1/orchestrate",
                                      json={"prompt": f"hi {i}", "stream": False})
            return response.status_code

    statuses = await asyncio.gather(*(one(i) for i in range(12)))
    assert sorted(statuses) == [200] * 6 + [429] * 6  # 6 a minute, whichever replica



async def test_usage_by_tenant_in_prometheus_and_chorus_usage(url: str, capsys: Any) -> None:
    import ray

    from orchestration.cli import main

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = [('ray_chorus_tenant_requests_total{', 'tenant="alpha"', 'expert="math"'),
              ('ray_chorus_tenant_refusals_total{', 'tenant="metered"', 'expert="',
               'reason="requests_per_minute"'),
              ('ray_chorus_tenant_tokens_total{', 'tenant="tokened"', 'kind="out"'),
              ('ray_chorus_tenant_queue_seconds_bucket{', 'tenant="alpha"', 'expert="math"')]

    async def exported() -> bool:
        async with httpx.AsyncClient() as http:
            lines = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text
        return all(any(all(part in line for part in parts) for line in lines.splitlines())
                   for parts in wanted)

    await until(exported, timeout=60, what="per-tenant series on Ray's Prometheus endpoint")
    assert main(["--url", url, "--api-key", ALPHA, "usage"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["tenant", "requests", "refused"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert {"alpha", "beta", "metered", "tokened", "narrow"} <= set(rows)
    assert int(rows["metered"][1]) >= 3 and int(rows["metered"][2]) >= 2  # (its earlier test)
    assert re.fullmatch(r"\d+/-", rows["metered"][-1])  # requests left; no token limit
