"""Tenants and their API keys: who is calling (issue 19's first part; docs/tenants.md).

A `tenants:` section names the teams that share one Chorus. Each tenant has one or more
keys, given so that the config holds no secret: `key_sha256` (the hex SHA-256 of the
key) or `key_env` (the name of an environment variable of the ingress process that
holds it). `server.api_key` keeps working: it is one tenant, `default`.

`Keyring.tenant_of(token)` hashes the caller's token once and compares the digest with
every configured digest with `hmac.compare_digest`, all of them, whatever matches: the
time it takes does not depend on which key (if any) matched, or how much of it. Keys are
never logged or echoed; errors name the field, never the value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestration.errors import ConfigError, UnauthorizedError

_HEX64 = re.compile(r"[0-9a-f]{64}")
DEFAULT_TENANT = "default"  # `server.api_key`'s tenant, and every caller's when no key is set


class TenantKey(BaseModel):
    """One key of a tenant: its SHA-256, or the environment variable that holds it."""

    model_config = ConfigDict(extra="forbid")

    key_sha256: str | None = None
    key_env: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one(self) -> TenantKey:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("give key_sha256 or key_env, exactly one")
        if self.key_sha256 is not None:
            self.key_sha256 = self.key_sha256.lower()
            if not _HEX64.fullmatch(self.key_sha256):
                raise ValueError("key_sha256 must be 64 hex digits (the SHA-256 of the key)")
        return self


class TenantConfig(BaseModel):
    """A team that shares the service, the keys its callers present, and its share.

    `weight`: its share of a contended expert against other tenants at the same
    priority; `requests_per_minute` / `tokens_per_minute`: 429 past them (tokens as the
    engines count them, prompt + completion); `max_in_flight`: its tasks at once, a hard
    cap; `priority_max`: the highest request priority it may ask for (403 above).
    """

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    keys: Annotated[list[TenantKey], Field(min_length=1)]
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None
    max_in_flight: Annotated[int, Field(ge=1)] | None = None
    priority_max: Literal["high", "normal", "low"] | None = None

    def limits(self) -> dict[str, int | float | str]:
        """The limits it has (for /v1/stats and the operations page)."""
        fields = ("weight", "requests_per_minute", "tokens_per_minute", "max_in_flight",
                  "priority_max")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

    def allows(self, priority: str) -> bool:
        """May it ask for `priority` (high > normal > low)?"""
        order = ("low", "normal", "high")
        return self.priority_max is None or order.index(priority) <= order.index(self.priority_max)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Keyring:
    """Every tenant's key digests, resolved once (at the ingress's start)."""

    def __init__(self, entries: list[tuple[bytes, str]]) -> None:
        self.entries = entries  # (SHA-256 digest of a key, its tenant's name)

    @classmethod
    def build(cls, tenants: list[TenantConfig], api_key: str | None,
              env: Mapping[str, str] | None = None) -> Keyring:
        """The keyring of the config; a `key_env` that is unset is a ConfigError naming it."""
        env = os.environ if env is None else env
        entries: list[tuple[bytes, str]] = []
        for i, tenant in enumerate(tenants):
            for j, key in enumerate(tenant.keys):
                if key.key_sha256 is not None:
                    entries.append((bytes.fromhex(key.key_sha256), tenant.name))
                    continue
                value = env.get(key.key_env or "")
                if not value:
                    field = f"tenants[{i}].keys[{j}].key_env"
                    raise ConfigError(f"{field}: environment variable {key.key_env!r} is "
                                      "not set (or empty) in the ingress process", field=field)
                entries.append((digest(value), tenant.name))
        if api_key:
            entries.append((digest(api_key), DEFAULT_TENANT))
        return cls(entries)

    @property
    def required(self) -> bool:
        """With any key configured, every route but the probes and the pages needs one."""
        return bool(self.entries)

    def caller(self, headers: Mapping[str, str]) -> str | None:
        """The calling tenant, from `Authorization: Bearer <key>` (or `X-API-Key`); None
        when no key is configured; UnauthorizedError (401) when none or a wrong one is
        sent — its message never repeats what was sent."""
        if not self.required:
            return None
        sent = headers.get("authorization", "")
        token = sent[7:] if sent.lower().startswith("bearer ") else headers.get("x-api-key", "")
        tenant = self.tenant_of(token) if token else None
        if tenant is None:
            what = "wrong API key" if token else "missing API key (Authorization: Bearer …)"
            raise UnauthorizedError(what, field="authorization")
        return tenant

    def tenant_of(self, token: str) -> str | None:
        """The tenant whose key `token` is, or None; in time independent of the match."""
        sent = digest(token)
        found = None
        for known, tenant in self.entries:
            if hmac.compare_digest(sent, known) and found is None:
                found = tenant
        return found
