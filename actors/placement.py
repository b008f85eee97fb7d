"""Placement on the cluster Ray sees: which resource is missing for an expert."""

from __future__ import annotations

import ray

from orchestration.capacity import wanted_resources
from orchestration.config import ExpertConfig


def live_nodes() -> list[dict[str, float]]:
    """Total resources of each live node of the connected Ray cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def missing_resources(expert: ExpertConfig) -> str:
    """Say which resource the cluster lacks for this expert, node by node."""
    nodes = live_nodes()
    total, free = ray.cluster_resources(), ray.available_resources()
    parts = []
    for key, need in wanted_resources(expert).items():
        largest = max((node.get(key, 0) for node in nodes), default=0)
        if need > largest or need > free.get(key, 0):
            parts.append(f"{key}={need:g} (largest node has {largest:g}; cluster total "
                         f"{total.get(key, 0):g}, free {free.get(key, 0):g})")
    return ", ".join(parts) or "resources that stayed busy (see `ray status`)"


def room_for(expert: ExpertConfig) -> bool:
    """Could one more replica of `expert` be placed right now on one node's free resources?"""
    from ray._private.state import available_resources_per_node

    need = wanted_resources(expert)
    if not need:
        return True
    return any(all(free.get(key, 0) >= amount for key, amount in need.items())
               for free in available_resources_per_node().values())
