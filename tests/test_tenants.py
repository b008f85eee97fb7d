"""Tenants and their keys (issue 19, first part): who may call, told apart by key.

Unit checks of the keyring (no Ray), then one served app with two tenants — one key
given as its SHA-256, one in an environment variable of the ingress process
(`CHORUS_TEST_TENANT_KEY`, set by conftest before Ray starts) — against real HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

import httpx
import pytest
import yaml

from orchestration.config import parse_config
from orchestration.errors import ConfigError, UnauthorizedError
from orchestration.tenants import Keyring, TenantConfig
from tests.conftest import config_dict

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


# --------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def url(ray_session: Any, serve_port: int, tmp_path_factory: Any) -> str:
    from ray import serve

    from serve_app import build_app

    assert os.environ.get(BETA_ENV)  # conftest sets it before Ray starts
    data = {**config_dict("mock"), "tenants": _tenants()}
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
