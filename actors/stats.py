"""The team's figures for `/v1/stats`: every actor asked at once, one entry per replica.

Each replica's entry joins three views: its own answer (engine counters, pid), the
executor's (health, load: `dispatch`) and the supervisor's (`supervision`, `state`).
A replica whose answer failed because its process is down is looked up in Ray's actor
table before the entry is written, so one entry never says `ready` and down at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray.exceptions as rex

from actors.boundary import translate
from actors.registry import Member, Registry
from actors.scaler import Scaler
from actors.supervisor import Supervisor, describe
from orchestration.supervision import Life


async def team_stats(registry: Registry, supervisor: Supervisor | None, scaler: Scaler | None,
                     timeout_s: float) -> dict[str, Any]:
    """Executor, router and per-replica stats; a replica that does not answer says why."""
    # A snapshot: replicas may come and go (scaling) while the answers arrive.
    members = [m for m in registry.members.values() if m.expert is not None]
    answers = await asyncio.gather(
        *(asyncio.wait_for(m.handle.stats.remote(), timeout_s) for m in members),
        asyncio.wait_for(registry.executor.stats.remote(), timeout_s),
        asyncio.wait_for(registry.router.stats.remote(), timeout_s),
        return_exceptions=True)
    down = [m for m, answer in zip(members, answers, strict=False)
            if isinstance(answer, rex.RayActorError) and m.life.state is Life.READY]
    if supervisor is not None and down:
        await asyncio.gather(*(supervisor.recheck(m) for m in down), return_exceptions=True)
    executor = _describe(answers[-2], timeout_s)
    views = executor.get("replicas", {})  # the executor's view: health, load
    now = time.monotonic()
    experts: dict[str, Any] = {}
    for member, answer in zip(members, answers, strict=False):
        assert member.expert is not None
        replica = {**_describe(answer, timeout_s), "ray_restarts": member.life.ray_restarts,
                   "state": describe(member, now),
                   "dispatch": views.get(member.expert, {}).get(member.label),
                   "supervision": member.life.to_dict(now)}
        experts.setdefault(member.expert, {"replicas": {}})["replicas"][member.label] = replica
    configured = set(registry.config.expert_names)
    for expert, entry in experts.items():
        first = next(iter(entry["replicas"].values()))
        entry.update({k: v for k, v in first.items() if k not in ("supervision", "dispatch")})
        entry["state"] = first["supervision"]["status"]
        # Attempts that continued an answer another attempt began (docs/failover.md).
        entry["continuations"] = executor.get("continued", {}).get(expert, 0)
        # The share of its recent attempts that were hedges (docs/hedging.md).
        entry["hedged"] = executor.get("hedged", {}).get(expert, 0.0)
        if scaler is not None and expert in configured:
            entry["scaling"] = scaler.describe(expert)
    return {"router": {**_describe(answers[-1], timeout_s),
                       "supervision": _life(registry.members.get("router"), now)},
            "executor": {**executor, "supervision": _life(registry.members.get("executor"), now)},
            "experts": experts,
            # Per tenant: usage, limits, what is left of them, its share (docs/tenants.md).
            "tenants": executor.pop("tenants", {})}


def _life(member: Member | None, now: float) -> dict[str, Any] | None:
    return member.life.to_dict(now) if member is not None else None


def _describe(answer: Any, timeout_s: float | None) -> dict[str, Any]:
    if isinstance(answer, dict):
        return answer
    if isinstance(answer, TimeoutError):
        return {"error": f"no answer within {timeout_s:g}s (restarting or busy)"}
    return {"error": translate(answer, actor="actor").message}
