"""Shared fixtures: one local Ray instance per session, config builders, polling."""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration.config import ChorusConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
# address="local": always a fresh instance of our own, never another session's cluster.
RAY_INIT = {"address": "local", "num_cpus": 8, "include_dashboard": False,
            "namespace": "chorus-tests",
            "log_to_driver": False,
            # Export metrics every second (default 10 s) so the metrics test waits less.
            "_system_config": {"metrics_report_interval_ms": 1000}}

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
# LiteLLM fetches a model cost map at import unless told to use its bundled copy: the
# tests never rely on the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_dict(name: str = "mock") -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())


def make_config(base: str = "mock", experts: dict[str, dict[str, Any]] | None = None,
                **sections: Any) -> ChorusConfig:
    """A shipped config with patches: `experts={"code": {"mock": {"hang_every": 1}}}`."""
    data = _merge(config_dict(base), sections)
    for expert in data["experts"]:
        if experts and expert["name"] in experts:
            expert.update(_merge(expert, experts[expert["name"]]))
    return parse_config(data)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0,
                what: str = "condition") -> None:
    """Poll an async predicate until true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(**RAY_INIT)
    yield ray
