"""Config loading: shipped configs load; malformed ones are refused naming the field."""

from __future__ import annotations

import pytest

from orchestration.config import load_config, parse_config
from orchestration.errors import ConfigError
from tests.conftest import ROOT, config_dict


@pytest.mark.parametrize("name", ["mock", "chaos"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(ROOT / "config" / f"{name}.yaml")
    assert config.router.primary in config.expert_names
    assert config.expert_names[:4] == ["general", "code", "math", "critic"]


def test_chaos_is_the_seed_schedule() -> None:
    config = load_config(ROOT / "config" / "chaos.yaml")
    assert (config.executor.ttft_timeout_s, config.executor.stall_timeout_s) == (3, 3)
    for expert in config.experts:
        assert (expert.mock.fail_every, expert.mock.slow_every, expert.mock.slow_s) == (3, 5, 5.0)
    assert (config.executor.retry.attempts, config.executor.retry.initial_wait_s) == (3, 0.2)


def _broken(mutate) -> dict:
    data = config_dict("mock")
    mutate(data)
    return data


BROKEN = {
    "negative gpus": (
        lambda d: d["experts"][1].update(num_gpus=-1), "experts[1].num_gpus"),
    "unknown backend": (
        lambda d: d["experts"][0].update(backend="tpu"), "experts[0].backend"),
    "zero in flight": (
        lambda d: d["executor"].update(max_in_flight=0), "executor.max_in_flight"),
    "typo in key": (
        lambda d: d["executor"].update(max_inflight=3), "executor.max_inflight"),
    "unknown primary": (
        lambda d: d["router"].update(primary="oracle"), "router.primary"),
    "unknown fallback": (
        lambda d: d["experts"][2].update(fallback="ghost"), "experts[2].fallback"),
    "duplicate name": (
        lambda d: d["experts"][3].update(name="code"), "experts[3].name"),
    "wrong type": (
        lambda d: d["experts"][0].update(max_concurrency="many"), "experts[0].max_concurrency"),
    "synthesizer missing": (
        lambda d: d["fusion"].update(strategy="synthesize"), "fusion.synthesizer"),
    "bad mock option": (
        lambda d: d["experts"][0]["mock"].update(ttft_s=-1), "experts[0].mock.ttft_s"),
    "no experts": (lambda d: d.update(experts=[]), "experts"),
    "unknown routing method": (
        lambda d: d["router"].update(method="oracle"), "router.method"),
    "semantic routing without routes": (
        lambda d: [e.pop("routes", None) for e in d["experts"]], "router.method"),
    "score threshold above 1": (
        lambda d: d["experts"][2].update(score_threshold=1.5), "experts[2].score_threshold"),
    "empty route": (lambda d: d["experts"][1].update(routes=["fine", ""]), "experts[1].routes[1]"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_malformed_config_names_the_field(case: str) -> None:
    mutate, path = BROKEN[case]
    with pytest.raises(ConfigError) as info:
        parse_config(_broken(mutate), source="test.yaml")
    message = str(info.value)
    assert message.startswith("test.yaml: invalid config")
    assert f"\n{path}:" in message, message
    assert info.value.field == path


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["experts"])


def test_unreadable_and_invalid_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_check_config_command(tmp_path, capsys) -> None:
    from orchestration.cli import main

    assert main(["check-config", str(ROOT / "config" / "gpu.yaml")]) == 0
    assert "ok: 4 experts" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts:\n  - {name: general, num_gpus: -1}\n")
    assert main(["check-config", str(bad)]) == 2
    assert "experts[0].num_gpus" in capsys.readouterr().err


def test_vllm_experts_default_to_one_gpu_mock_to_none() -> None:
    data = config_dict("mock")
    data["experts"][1].update(backend="vllm", model="some/model")
    data["experts"][2].update(backend="vllm", model="some/model", num_gpus=0)
    config = parse_config(data)
    assert [e.resources.num_gpus for e in config.experts] == [0, 1, 0, 0]
    assert config.experts[1].actor_options()["num_gpus"] == 1
    cpu = load_config(ROOT / "config" / "cpu.yaml")
    assert all(e.backend == "vllm" and e.resources.num_gpus == 0 for e in cpu.experts)
