"""Could these nodes hold the team? No Ray: node resources in, named problems out.

Used before a deploy (`chorus serve`, `chorus check-config`) and when startup times
out (`actors/placement.py`), so an operator reads one short line per expert and
resource instead of a scheduler's traceback.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestration.config import ChorusConfig, ExpertConfig


def wanted_resources(expert: ExpertConfig) -> dict[str, float]:
    """What one replica of `expert` reserves, in Ray's resource names."""
    options = expert.actor_options()
    wanted = {"GPU": options.get("num_gpus", 0), "CPU": options.get("num_cpus", 0),
              **expert.resources.resources}
    if expert.resources.accelerator_type:
        wanted[f"accelerator_type:{expert.resources.accelerator_type}"] = 0.001
    return {key: need for key, need in wanted.items() if need}


def initial_replicas(expert: ExpertConfig) -> int:
    return expert.replicas.initial or expert.replicas.min


def placement_problems(config: ChorusConfig, nodes: list[dict[str, float]],
                       replicas: Callable[[ExpertConfig], int] = initial_replicas) -> list[str]:
    """Why the team cannot be placed on `nodes` (each a map of resource -> amount); [] if it can.

    `replicas` says how many replicas of each expert to place (default: the initial
    count; `lambda e: e.replicas.max` checks the team at its largest).

    Each replica must fit on one node; then every replica must fit at once (first fit,
    biggest first). Control actors reserve only what their `resources` ask.
    """
    problems = []
    wanted: list[tuple[str, dict[str, float]]] = []
    for expert in config.experts:
        need = wanted_resources(expert)
        short = [f"{key}={amount:g} (largest node has "
                 f"{max((node.get(key, 0) for node in nodes), default=0):g})"
                 for key, amount in need.items()
                 if not any(node.get(key, 0) >= amount for node in nodes)]
        if short:
            problems.append(f"expert {expert.name!r} needs {', '.join(short)}")
        wanted += [(expert.name, need)] * replicas(expert)
    if problems:
        return problems
    free = [dict(node) for node in nodes]
    for name, need in sorted(wanted, key=lambda r: -sum(r[1].values())):
        node = next((n for n in free if all(n.get(k, 0) >= v for k, v in need.items())), None)
        if node is None:
            totals = {k: sum(n.get(k, 0) for n in nodes) for k in need}
            needed = {k: sum(r[1].get(k, 0) for r in wanted) for k in need}
            problems.append(
                f"the team needs {_fmt(needed)} in all; the nodes have {_fmt(totals)} "
                f"(expert {name!r} is the first that does not fit)")
            break
        for key, amount in need.items():
            node[key] -= amount
    return problems


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{key}={amount:g}" for key, amount in resources.items())
