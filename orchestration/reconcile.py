"""What a new config changes in a running team, and how each change is applied. No Ray.

A redeploy never rebuilds the team: the controller (`actors/controller.py`) compares the
new config with the one the team runs and applies only the difference
(docs/operations.md, "Redeploys", has the table per key):

    added expert ............ its replicas are created and join dispatch when ready
    removed expert .......... its replicas are drained (no new task, attempts finish),
                              then removed
    expert actor changed .... rolled one replica at a time: the new replica starts, joins
      (backend, model,        dispatch when ready, then the old one drains and goes; with
       engine, mock, env,     no room for one more, the old one drains first
       resources, ...)
    replicas.min / max ...... the scaler grows or drains to the new bounds
    anything the router ..... applied in place (its embedding model is loaded again only
      reads (routes, ...)     if `router.model` changed)
    router.resources ........ a new router is started, then swapped in; plans in flight
                              finish on the old one
    executor settings ....... applied in place (bounds, queue, retries, fallbacks)
    tenants ................. applied in place at the executor (limits, weights, caps); the
                              new ingress replicas of the deploy hold the new keys
    stream.linger_s ......... applied in place on every expert replica
    executor.resources,
    executor.max_concurrent_plans,
    server.namespace ........ only when the team is next started: logged
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestration.config import ChorusConfig, ExpertConfig

# The fields an expert's actor is built from: a change replaces its replicas.
ACTOR_FIELDS = ("backend", "model", "max_concurrency", "max_restarts", "resources",
                "mock", "tool_parser", "engine", "env")
# Sections the router never reads (the router is re-created when anything else changes).
_NOT_ROUTED = {"server", "stream", "supervision", "scaling", "fusion", "guard", "tenants"}
_EXPERT_NOT_ROUTED = {*ACTOR_FIELDS, "num_gpus", "replicas"}
# Keys that only a fresh start of the team applies.
RESTART_KEYS = ("executor.resources", "executor.max_concurrent_plans", "server.namespace")


def actor_spec(expert: ExpertConfig) -> dict[str, Any]:
    """What an expert's replica actor is made of; equal specs mean the actor can stay."""
    return expert.model_dump(mode="json", include=set(ACTOR_FIELDS))


def _router_view(config: ChorusConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json", exclude=_NOT_ROUTED)
    data["experts"] = [{k: v for k, v in e.items() if k not in _EXPERT_NOT_ROUTED}
                       for e in data["experts"]]
    return data


def _value(config: ChorusConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


@dataclass
class Changes:
    """The difference between the config a team runs and a new one."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rolled: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    router: bool = False  # the router plans with the new config (in place)
    router_actor: bool = False  # its resources changed: a new router is swapped in
    executor: bool = False  # reconfigure the executor in place
    stream: bool = False  # the experts' stream settings, in place
    restart: list[str] = field(default_factory=list)  # applied at the next start only

    @property
    def nothing(self) -> bool:
        return not (self.added or self.removed or self.rolled or self.resized or self.router
                    or self.router_actor or self.executor or self.stream or self.restart)

    def summary(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in (
            ("added", self.added), ("removed", self.removed), ("rolling", self.rolled),
            ("resized", self.resized)) if names]
        parts += [what for what, changed in (("router reconfigured", self.router),
                                            ("router re-created", self.router_actor),
                                            ("executor reconfigured", self.executor),
                                            ("stream settings", self.stream)) if changed]
        if self.restart:
            parts.append(f"needs a restart: {', '.join(self.restart)}")
        return "; ".join(parts) or "no change"


def diff(old: ChorusConfig, new: ChorusConfig) -> Changes:
    """What applying `new` to a team running `old` must do."""
    changes = Changes()
    before = {e.name: e for e in old.experts}
    after = {e.name: e for e in new.experts}
    changes.added = [name for name in after if name not in before]
    changes.removed = [name for name in before if name not in after]
    for name, expert in after.items():
        if name not in before:
            continue
        if actor_spec(expert) != actor_spec(before[name]):
            changes.rolled.append(name)
        if expert.replicas.model_dump() != before[name].replicas.model_dump():
            changes.resized.append(name)
    changes.router = _router_view(old) != _router_view(new)
    changes.router_actor = old.router.resources != new.router.resources
    changes.executor = (old.executor != new.executor or changes.added != [] or changes.removed != []
                        or any(after[n].fallback != before[n].fallback
                               or after[n].max_concurrency != before[n].max_concurrency
                               for n in after if n in before)
                        or old.scaling != new.scaling or old.supervision != new.supervision
                        or old.tenants != new.tenants)
    changes.stream = old.stream.linger_s != new.stream.linger_s
    changes.restart = [key for key in RESTART_KEYS if _value(old, key) != _value(new, key)]
    return changes
