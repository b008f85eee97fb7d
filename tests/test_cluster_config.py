"""The cluster files, checked together and offline (no Ray cluster, no cloud calls).

- cluster.yaml goes through Ray's own cluster-config code: `prepare_config` (merge with the
  provider's defaults.yaml, setup-command merging, docker and min/max-worker checks) and
  `validate_config` (JSON schema `ray/autoscaler/ray-schema.json` + cross-field checks),
  the two steps `ray up` runs before it contacts the cloud. The AWS-specific steps that
  follow in `ray up` (`fillout_available_node_types_resources`, `bootstrap_config`) need
  boto3 and the EC2/IAM APIs, so they are out of reach offline; cluster.yaml declares
  each node type's resources explicitly, which is what the first of them would fill in.
- every expert of config/gpu.yaml fits a GPU worker type, and the whole team packs onto
  the cluster at max_workers;
- the control plane (router, executor, Serve ingress) can only land on the head;
- config/serve.yaml is a valid `serve deploy` config (ray.serve.schema.ServeDeploySchema);
- the on-premises example in docs/cluster.md is a valid `local`-provider config.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration.capacity import placement_problems
from orchestration.config import ChorusConfig, ExpertConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_YAML = ROOT / "config" / "gpu.yaml"
SERVE_YAML = ROOT / "config" / "serve.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
CONTROL = "chorus-control"

ray_util = pytest.importorskip("ray.autoscaler._private.util")
ray_common = pytest.importorskip("ray._common.utils")


# ---------------------------------------------------------------- helpers


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _ray_up_offline_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before the first cloud call; returns the result."""
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    return prepared


def _fits(request: dict[str, float], offered: dict[str, float]) -> bool:
    # cluster.yaml does not declare `memory` (Ray's AWS provider fills it in from EC2);
    # an actor asking for memory is only checked against a node type that declares it.
    return all(
        offered.get(name, 0) >= amount
        for name, amount in request.items()
        if amount > 0 and (name not in _UNDECLARED_OK or name in offered)
    )


_UNDECLARED_OK = {"memory", "object_store_memory"}


def _request(options: dict[str, Any]) -> dict[str, float]:
    """Ray actor options -> the resource demand Ray schedules on, computed by Ray itself
    (`accelerator_type="A10G"` becomes `accelerator_type:A10G: 0.001`)."""
    return ray_common.resources_from_ray_options(options)


def _expert_request(expert: ExpertConfig) -> dict[str, float]:
    return _request(expert.actor_options())


def _start_flag(commands: list[str], flag: str) -> str | None:
    for command in commands:
        for token in shlex.split(command):
            if token.startswith(f"{flag}="):
                return token.split("=", 1)[1]
    return None


def _commented_block(text: str, begin: str, end: str) -> str:
    """The commented-out YAML between two marker comments, uncommented."""
    block = text.split(begin, 1)[1].split(end, 1)[0]
    lines = []
    for line in block.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        assert stripped.startswith("#"), f"not a comment line in the example: {line!r}"
        content = line.split("#", 1)[1]
        lines.append(content[1:] if content.startswith(" ") else content)
    # The block sits under `experts:`, indented by two; dedent what remains.
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _read_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def team() -> ChorusConfig:
    return load_config(GPU_YAML)


@pytest.fixture(scope="module")
def head(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["available_node_types"][cluster["head_node_type"]]


@pytest.fixture(scope="module")
def workers(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    }


# ---------------------------------------------------------------- (a) Ray's validator


def test_cluster_yaml_passes_rays_schema_as_written(cluster: dict[str, Any]) -> None:
    # As written, before any defaults are merged in: the schema forbids unknown keys at
    # the top level and in node types, so a typo fails here rather than being ignored.
    ray_util.validate_config(copy.deepcopy(cluster))


def test_cluster_yaml_passes_ray_up_offline_checks(cluster: dict[str, Any]) -> None:
    prepared = _ray_up_offline_checks(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config caps the head type at 0 extra nodes of its kind.
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_cluster_yaml_mounts_the_repository_and_installs_the_vllm_extra(
    cluster: dict[str, Any],
) -> None:
    assert cluster["file_mounts"].get("~/chorus") == "."
    installs = " ".join(cluster["setup_commands"])
    assert re.search(r"pip install\b.*-e\s+\"?\$HOME/chorus\[vllm\]", installs), installs


# ---------------------------------------------------------------- (b) experts fit workers


def test_gpu_workers_declare_their_gpus(workers: dict[str, dict[str, Any]]) -> None:
    assert workers, "cluster.yaml has no worker node type"
    for name, node_type in workers.items():
        resources = node_type["resources"]
        assert resources.get("GPU", 0) >= 1, f"{name}: declare GPU explicitly in resources"
        assert resources.get("CPU", 0) >= 1, f"{name}: declare CPU explicitly in resources"
        assert node_type.get("max_workers", 0) >= 1, f"{name}: max_workers must allow a node"


@pytest.mark.parametrize("name", load_config(GPU_YAML).expert_names)
def test_each_expert_fits_a_gpu_worker_type(
    name: str, team: ChorusConfig, workers: dict[str, dict[str, Any]]
) -> None:
    expert = team.expert(name)
    demand = _expert_request(expert)
    fitting = [t for t, node_type in workers.items() if _fits(demand, node_type["resources"])]
    offered = {t: node_type["resources"] for t, node_type in workers.items()}
    assert fitting, f"expert {name!r} asks for {demand}; no worker type offers it: {offered}"


def _nodes(cluster: dict[str, Any], workers: dict[str, dict[str, Any]],
           key: str) -> list[dict[str, float]]:
    """The GPU worker nodes the autoscaler keeps at `min_workers` or may start at `max_workers`."""
    budget = cluster.get("max_workers", 0)
    nodes: list[dict[str, float]] = []
    for node_type in workers.values():
        count = min(node_type.get(key, 0 if key == "min_workers" else budget),
                    budget - len(nodes))
        nodes += [dict(node_type["resources"]) for _ in range(max(count, 0))]
    return nodes


def test_team_fits_min_workers_at_min_replicas_and_max_workers_at_max_replicas(
    cluster: dict[str, Any], team: ChorusConfig, workers: dict[str, dict[str, Any]]
) -> None:
    # The same check `chorus serve` makes before deploying (orchestration/capacity.py).
    smallest = placement_problems(team, _nodes(cluster, workers, "min_workers"),
                                  lambda e: e.replicas.min)
    largest = placement_problems(team, _nodes(cluster, workers, "max_workers"),
                                 lambda e: e.replicas.max)
    assert smallest == [] and largest == []
    gpus = {n: sum(e.num_gpus * getattr(e.replicas, n) for e in team.experts)
            for n in ("min", "max")}
    assert gpus == {"min": 4, "max": 7}  # what docs/cluster.md promises


def _check_parallelism(expert: ExpertConfig) -> None:
    tp = int(expert.engine.get("tensor_parallel_size", 1))
    pp = int(expert.engine.get("pipeline_parallel_size", 1))
    assert expert.num_gpus == tp * pp, (
        f"expert {expert.name!r}: num_gpus {expert.num_gpus} != tensor_parallel_size {tp}"
        f" x pipeline_parallel_size {pp}"
    )
    if tp * pp > 1:
        # The actor holds the GPUs; vLLM's Ray executor would ask Ray for more.
        assert expert.engine.get("distributed_executor_backend") == "mp", expert.name


def test_vllm_experts_reserve_one_gpu_per_model_shard(team: ChorusConfig) -> None:
    vllm_experts = [e for e in team.experts if e.backend == "vllm"]
    assert vllm_experts, "config/gpu.yaml should be a vLLM team"
    for expert in vllm_experts:
        _check_parallelism(expert)
        assert expert.engine.get("scheduling_policy") == "priority", expert.name


def test_the_commented_tensor_parallel_example_is_valid(
    team: ChorusConfig, workers: dict[str, dict[str, Any]]
) -> None:
    text = GPU_YAML.read_text(encoding="utf-8")
    example = _commented_block(
        text, "# --- example: tensor_parallel_size 2 ---", "# --- end example ---"
    )
    body = example.split("- name:", 1)
    assert len(body) == 2, "the example should be one list item"
    entries = yaml.safe_load("- name:" + body[1])
    assert isinstance(entries, list) and len(entries) == 1
    expert = ExpertConfig.model_validate(entries[0])
    assert expert.engine.get("tensor_parallel_size") == 2
    _check_parallelism(expert)
    demand = _expert_request(expert)
    assert any(_fits(demand, t["resources"]) for t in workers.values())
    # And the team stays valid with it added (its fallback names a real expert).
    data = _read_yaml(GPU_YAML)
    data["experts"].append(entries[0])
    ChorusConfig.model_validate(data)


# ---------------------------------------------------------------- (c) control plane on the head


def test_head_has_no_gpus_and_is_the_only_control_node(
    head: dict[str, Any], workers: dict[str, dict[str, Any]]
) -> None:
    assert head["resources"].get("GPU") == 0, "declare GPU: 0 on the head explicitly"
    assert head["resources"].get(CONTROL, 0) >= 1
    for name, node_type in workers.items():
        assert CONTROL not in node_type["resources"], f"{name} must not offer {CONTROL}"


def test_start_commands_match_the_declared_roles(cluster: dict[str, Any]) -> None:
    head_commands = cluster["head_start_ray_commands"]
    assert _start_flag(head_commands, "--num-gpus") == "0"
    resources = json.loads(_start_flag(head_commands, "--resources") or "{}")
    assert resources.get(CONTROL, 0) >= 1
    assert _start_flag(head_commands, "--dashboard-host") == "127.0.0.1"
    assert not any(CONTROL in command for command in cluster["worker_start_ray_commands"])


def test_router_and_executor_can_only_land_on_the_head(
    team: ChorusConfig, head: dict[str, Any], workers: dict[str, dict[str, Any]]
) -> None:
    for section in (team.router, team.executor):
        options = section.resources.ray_options()
        assert options["num_gpus"] == 0
        assert options.get("resources", {}).get(CONTROL, 0) > 0, options
        demand = _request(options)
        assert _fits(demand, head["resources"])
        assert not any(_fits(demand, t["resources"]) for t in workers.values())


def test_experts_cannot_land_on_the_head(team: ChorusConfig, head: dict[str, Any]) -> None:
    for expert in team.experts:
        assert not _fits(_expert_request(expert), head["resources"]), expert.name


# ---------------------------------------------------------------- (d) Serve config


@pytest.fixture(scope="module")
def serve_config() -> Any:
    schema = pytest.importorskip("ray.serve.schema")
    return schema.ServeDeploySchema.model_validate(_read_yaml(SERVE_YAML))


def test_serve_yaml_is_one_chorus_application(serve_config: Any) -> None:
    (app,) = serve_config.applications
    assert app.name == "chorus"
    assert app.route_prefix == "/"
    assert app.import_path == "serve_app:build_app"
    assert serve_config.http_options.host == "127.0.0.1"
    assert serve_config.http_options.port == 8000
    assert str(serve_config.proxy_location.value) == "EveryNode"  # HTTP scales out


def test_serve_yaml_points_at_a_loadable_config(serve_config: Any) -> None:
    (app,) = serve_config.applications
    path = ROOT / app.args["config"]
    assert path.is_file(), f"args.config {app.args['config']!r} is not a file in the repo"
    assert load_config(path).expert_names


def test_ingress_stays_on_the_head(
    serve_config: Any, head: dict[str, Any], workers: dict[str, dict[str, Any]]
) -> None:
    (app,) = serve_config.applications
    (ingress,) = [d for d in app.deployments if d.name == "ChorusIngress"]
    options = ingress.ray_actor_options.model_dump(exclude_none=True)
    assert options["num_cpus"] == 0
    assert options["resources"].get(CONTROL, 0) > 0
    demand = _request(options)
    assert _fits(demand, head["resources"])
    assert not any(_fits(demand, t["resources"]) for t in workers.values())


# ---------------------------------------------------------------- (e) on-premises example


def _doc_example() -> dict[str, Any]:
    text = CLUSTER_DOC.read_text(encoding="utf-8")
    marker = "<!-- cluster-local.yaml"
    assert marker in text, "docs/cluster.md lost its on-premises example marker"
    block = re.search(r"```yaml\n(.*?)```", text.split(marker, 1)[1], re.S)
    assert block, "no ```yaml block after the marker"
    return yaml.safe_load(block.group(1))


def test_on_premises_example_passes_rays_validator(cluster: dict[str, Any]) -> None:
    example = _doc_example()
    assert example["provider"]["type"] == "local"
    assert example["provider"]["head_ip"] and example["provider"]["worker_ips"]
    prepared = _ray_up_offline_checks(example)
    assert prepared["available_node_types"], prepared
    # Same roles as the cloud cluster: the doc says the start commands are identical.
    assert example["head_start_ray_commands"] == cluster["head_start_ray_commands"]
    assert example["worker_start_ray_commands"] == cluster["worker_start_ray_commands"]
