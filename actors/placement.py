"""Placement: can the cluster Ray sees hold an expert, and if not, what is missing?"""

from __future__ import annotations

import ray

from orchestration.config import ExpertConfig


def wanted_resources(expert: ExpertConfig) -> dict[str, float]:
    """What one replica of `expert` reserves, in Ray's resource names."""
    options = expert.actor_options()
    wanted = {"GPU": options.get("num_gpus", 0), "CPU": options.get("num_cpus", 0),
              **expert.resources.resources}
    if expert.resources.accelerator_type:
        wanted[f"accelerator_type:{expert.resources.accelerator_type}"] = 0.001
    return {key: need for key, need in wanted.items() if need}


def missing_resources(expert: ExpertConfig) -> str:
    """Say which resource the cluster lacks for this expert, node by node."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()
    parts = []
    for key, need in wanted_resources(expert).items():
        largest = max((node.get(key, 0) for node in nodes), default=0)
        if need > largest or need > free.get(key, 0):
            parts.append(f"{key}={need:g} (largest node has {largest:g}; cluster total "
                         f"{total.get(key, 0):g}, free {free.get(key, 0):g})")
    return ", ".join(parts) or "resources that stayed busy (see `ray status`)"
