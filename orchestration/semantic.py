"""Semantic routes: experts' example utterances as vectors, and a prompt's fit to each expert.

Plain numpy, no model and no Ray: the caller passes an `encode` function (the router
actor's embedding model, or anything that maps texts to unit vectors in tests).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from orchestration.config import ChorusConfig

Encode = Callable[[list[str]], np.ndarray]


TOP_K = 3  # an expert's score averages its k closest routes: steadier than the single best


class RouteIndex:
    """One row per route utterance; an expert's score is the mean cosine of the prompt to
    its `TOP_K` closest routes (fewer if it has fewer routes; 0 with none)."""

    def __init__(self, owners: list[str], vectors: np.ndarray, experts: list[str]) -> None:
        self.owners = np.array(owners)
        self.vectors = vectors
        self.experts = experts  # every expert of the team, routed or not (in config order)
        self.rows = {name: np.flatnonzero(self.owners == name) for name in experts}

    @classmethod
    def build(cls, config: ChorusConfig, encode: Encode) -> RouteIndex:
        """Embed every expert's routes once (in one batch)."""
        owners = [e.name for e in config.experts for _ in e.routes]
        utterances = [u for e in config.experts for u in e.routes]
        return cls(owners, encode(utterances), config.expert_names)

    @property
    def size(self) -> int:
        return len(self.owners)

    def similarity(self, vector: np.ndarray) -> dict[str, float]:
        """Per expert, how close a (unit) prompt vector is to its routes."""
        cosines = self.vectors @ vector
        return {
            name: float(np.sort(cosines[rows])[-TOP_K:].mean()) if rows.size else 0.0
            for name, rows in self.rows.items()
        }
