"""Engines an expert can run, behind one protocol (`base.Engine`)."""

from __future__ import annotations

from actors.engines.base import Delta, Engine, GenerationRequest
from orchestration.config import ExpertConfig


def make_engine(expert: ExpertConfig, replica: int = 0) -> Engine:
    """Build the engine named by the expert's backend for its replica `replica` (an
    index: a mock may differ per replica); vLLM is imported only when used."""
    if expert.backend == "mock":
        from actors.engines.mock import MockEngine

        return MockEngine(expert.name, expert.mock.on_replica(replica))
    if expert.backend == "vllm":
        from actors.engines.vllm import VLLMEngine

        return VLLMEngine(expert.name, expert.model, expert.engine)
    raise ValueError(f"unknown backend {expert.backend!r}")


__all__ = ["Delta", "Engine", "GenerationRequest", "make_engine"]
