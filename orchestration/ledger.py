"""Ledger: what each tenant may use and has used, kept by the executor. No Ray.

The executor admits every plan of every ingress replica, so one ledger there sees a
tenant's whole traffic: its limits hold across ingress replicas with no shared store
(docs/tenants.md, "Where the limits are kept"). Its jobs:

1. admit a request under its tenant's `requests_per_minute` and `tokens_per_minute`,
   or refuse it (`RateLimitedError`: a 429 with `Retry-After`) before any expert work;
2. charge the tokens the engines counted (prompt + completion, every task of the team);
3. the `x-ratelimit-*` headers OpenAI's clients know, for every answer of a limited tenant;
4. usage per tenant and expert (requests, tokens, refusals, queue time) for `/v1/stats`.

Both limits are one-minute fixed windows (the `limits` library), each starting at the
tenant's first request after the last one ended. Tokens are known only once a task
ends: the request that crosses `tokens_per_minute` completes, and the next is refused
until the window resets.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from typing import Any

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from orchestration.errors import RateLimitedError
from orchestration.tenants import DEFAULT_TENANT, TenantConfig

REQUESTS, TOKENS = "requests", "tokens"


def duration(seconds: float) -> str:
    """OpenAI's `x-ratelimit-reset-*` form: `20ms`, `6s`, `1m30s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60}s"


class Usage:
    """One tenant's figures since the executor started (bounded: keyed by expert)."""

    def __init__(self) -> None:
        self.requests = 0
        self.refused: Counter[str] = Counter()  # reason -> requests refused
        self.tokens_in: Counter[str] = Counter()  # expert -> prompt tokens
        self.tokens_out: Counter[str] = Counter()  # expert -> completion tokens
        self.tasks: Counter[str] = Counter()  # expert -> tasks that got a slot
        self.queue_s: defaultdict[str, float] = defaultdict(float)  # expert -> summed wait

    def to_dict(self) -> dict[str, Any]:
        experts = sorted(set(self.tokens_in) | set(self.tokens_out) | set(self.tasks))
        return {
            "requests": self.requests,
            "refused": dict(self.refused),
            "tokens": {"in": sum(self.tokens_in.values()), "out": sum(self.tokens_out.values())},
            "experts": {e: {"tasks": self.tasks[e], "tokens_in": self.tokens_in[e],
                            "tokens_out": self.tokens_out[e],
                            "queue_s_mean": round(self.queue_s[e] / self.tasks[e], 4)
                            if self.tasks[e] else 0.0}
                        for e in experts},
        }


class Ledger:
    """Per-tenant limits and usage; `tenants` is the config's list (a redeploy replaces it)."""

    def __init__(self, tenants: list[TenantConfig]) -> None:
        self.storage = MemoryStorage()
        self.windows = FixedWindowRateLimiter(self.storage)
        self.usage: dict[str, Usage] = {}
        self.configure(tenants)

    def configure(self, tenants: list[TenantConfig]) -> None:
        self.tenants = {t.name: t for t in tenants}
        self.limits: dict[str, dict[str, RateLimitItemPerMinute]] = {}
        for tenant in tenants:
            own = {REQUESTS: tenant.requests_per_minute, TOKENS: tenant.tokens_per_minute}
            self.limits[tenant.name] = {kind: RateLimitItemPerMinute(n, namespace=kind)
                                        for kind, n in own.items() if n}
        known = {*self.tenants, DEFAULT_TENANT}
        self.usage = {name: u for name, u in self.usage.items() if name in known}

    def known(self, tenant: str) -> str:
        """A tenant the config no longer names (a redeploy removed it) is counted as the
        default one, so that no state grows with names."""
        return tenant if tenant in self.tenants else DEFAULT_TENANT

    def _usage(self, tenant: str) -> Usage:
        return self.usage.setdefault(self.known(tenant), Usage())

    # ------------------------------------------------------------------ admission

    def admit(self, tenant: str) -> dict[str, str]:
        """Count one request of `tenant`, or raise RateLimitedError (nothing counted);
        returns the `x-ratelimit-*` headers as of this request."""
        tenant = self.known(tenant)
        limits = self.limits.get(tenant, {})
        for kind in (REQUESTS, TOKENS):
            item = limits.get(kind)
            if item is not None and not self.windows.test(item, tenant):
                self.refuse(tenant, f"{kind}_per_minute")
                reset = self._reset_s(item, tenant)
                raise RateLimitedError(
                    f"tenant {tenant!r} is over its {kind}_per_minute ({item.amount}); "
                    f"retry in {math.ceil(reset)} s", field=f"{kind}_per_minute",
                    retry_after_s=max(1, math.ceil(reset)), headers=self.headers(tenant))
        if REQUESTS in limits:
            self.windows.hit(limits[REQUESTS], tenant)
        self._usage(tenant).requests += 1
        return self.headers(tenant)

    def refuse(self, tenant: str, reason: str) -> None:
        """A request of `tenant` refused for `reason` (a limit, or the executor's queue)."""
        self._usage(tenant).refused[reason] += 1

    def headers(self, tenant: str) -> dict[str, str]:
        """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of `tenant`."""
        tenant, out = self.known(tenant), {}
        for kind, item in self.limits.get(tenant, {}).items():
            remaining = self.windows.get_window_stats(item, tenant).remaining
            out[f"x-ratelimit-limit-{kind}"] = str(item.amount)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
            out[f"x-ratelimit-reset-{kind}"] = duration(self._reset_s(item, tenant))
        return out

    def _reset_s(self, item: RateLimitItemPerMinute, tenant: str) -> float:
        stats = self.windows.get_window_stats(item, tenant)
        return max(0.0, stats.reset_time - time.time())

    # ------------------------------------------------------------------ charges

    def charge(self, tenant: str, expert: str, prompt_tokens: int, completion_tokens: int) -> None:
        """A task ended: the engine's counts go to its tenant's usage and token window."""
        tenant = self.known(tenant)
        usage = self._usage(tenant)
        usage.tokens_in[expert] += prompt_tokens
        usage.tokens_out[expert] += completion_tokens
        item = self.limits.get(tenant, {}).get(TOKENS)
        if item is not None and prompt_tokens + completion_tokens > 0:
            # A fixed window counts past its limit (the `hit` is refused, yet recorded):
            # the request that crossed it stands; the next one is refused.
            self.windows.hit(item, tenant, cost=prompt_tokens + completion_tokens)

    def queued(self, tenant: str, expert: str, seconds: float) -> None:
        """A task of `tenant` got a slot of `expert` after waiting `seconds`."""
        usage = self._usage(tenant)
        usage.tasks[expert] += 1
        usage.queue_s[expert] += seconds

    def stats(self) -> dict[str, dict[str, Any]]:
        body: dict[str, dict[str, Any]] = {}
        for name in sorted({*self.usage, *self.tenants}):
            tenant = self.tenants.get(name)
            limits = {} if tenant is None else tenant.limits()
            body[name] = {**self._usage(name).to_dict(), "limits": limits,
                          "remaining": {k.removeprefix("x-ratelimit-remaining-"): int(v)
                                        for k, v in self.headers(name).items()
                                        if k.startswith("x-ratelimit-remaining-")}}
        return body
