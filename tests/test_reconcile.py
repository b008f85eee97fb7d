"""What a new config changes in a running team (no Ray): each key lands in one bucket."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from orchestration.config import parse_config
from orchestration.reconcile import diff
from tests.conftest import config_dict


def _changed(edit: Any) -> Any:
    old = config_dict("mock")
    new = copy.deepcopy(old)
    edit(new)
    return diff(parse_config(old), parse_config(new))


def _expert(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in data["experts"] if e["name"] == name)


def test_the_same_config_changes_nothing() -> None:
    changes = _changed(lambda data: None)
    assert changes.nothing and changes.summary() == "no change"


@pytest.mark.parametrize(("what", "edit"), [
    ("mock timing", lambda d: _expert(d, "code")["mock"].update(tokens=99)),
    ("engine", lambda d: _expert(d, "code").update(backend="mock", engine={"dtype": "half"})),
    ("env", lambda d: _expert(d, "code").update(env={"X": "1"})),
    ("max_restarts", lambda d: _expert(d, "code").update(max_restarts=7)),
    ("max_concurrency", lambda d: _expert(d, "code").update(max_concurrency=5)),
    ("num_gpus", lambda d: _expert(d, "code").update(num_gpus=0.5)),
])
def test_what_an_expert_actor_is_made_of_rolls_only_that_expert(what, edit) -> None:
    changes = _changed(edit)
    assert changes.rolled == ["code"], what
    assert (changes.added, changes.removed) == ([], [])
    # max_concurrency is also the default autoscaling target per replica.
    assert changes.resized == (["code"] if what == "max_concurrency" else [])


@pytest.mark.parametrize(("what", "edit"), [
    ("routes", lambda d: _expert(d, "math")["routes"].append("Integrate x squared")),
    ("keywords", lambda d: _expert(d, "math")["keywords"].append("algebra")),
    ("description", lambda d: _expert(d, "math").update(description="Sums.")),
    ("system prompt", lambda d: _expert(d, "math").update(system_prompt="Be terse.")),
    ("threshold", lambda d: d.setdefault("router", {}).update(score_threshold=0.3)),
])
def test_what_the_router_reads_applies_in_place_without_a_roll(what, edit) -> None:
    changes = _changed(edit)
    assert changes.router and not changes.router_actor and not changes.rolled, what


def test_added_removed_and_resized_experts_and_executor_settings() -> None:
    def edit(data: dict[str, Any]) -> None:
        writer = copy.deepcopy(_expert(data, "general"))
        writer["name"] = "writer"
        data["experts"] = [e for e in data["experts"] if e["name"] != "critic"] + [writer]
        _expert(data, "general")["replicas"] = {"min": 1, "max": 3}
        data.setdefault("executor", {})["max_in_flight"] = 5
        _expert(data, "code")["fallback"] = "math"

    changes = _changed(edit)
    assert (changes.added, changes.removed, changes.resized) == (["writer"], ["critic"],
                                                                 ["general"])
    assert changes.executor and changes.router and changes.rolled == []
    assert "added writer" in changes.summary() and "removed critic" in changes.summary()


def test_keys_only_a_fresh_start_applies_are_named() -> None:
    def edit(data: dict[str, Any]) -> None:
        data.setdefault("executor", {})["max_concurrent_plans"] = 10
        data.setdefault("server", {})["namespace"] = "elsewhere"

    changes = _changed(edit)
    assert changes.restart == ["executor.max_concurrent_plans", "server.namespace"]
    assert "needs a restart" in changes.summary()


def test_router_resources_swap_the_router_and_stream_linger_applies_in_place() -> None:
    def edit(data: dict[str, Any]) -> None:
        data.setdefault("router", {})["resources"] = {"num_cpus": 1}
        data.setdefault("stream", {})["linger_s"] = 3

    changes = _changed(edit)
    assert changes.router_actor and changes.stream and not changes.rolled


def test_a_tenants_change_reaches_the_executor_and_nothing_else() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["tenants"] = [{"name": "t", "keys": [{"key_env": "K"}], "requests_per_minute": 5}]

    changes = _changed(edit)
    assert changes.executor and not changes.nothing
    assert not (changes.router or changes.rolled or changes.added or changes.restart)

