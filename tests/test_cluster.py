"""Multi-node behaviour on a simulated cluster: a GPU-less head and two 2-GPU workers.

`ray.cluster_utils.Cluster` runs real raylets on this machine with declared (fake) GPUs;
mock experts reserve `num_gpus: 1` exactly as vLLM experts would.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from actors.team import Team
from orchestration.client import Client
from orchestration.config import ChorusConfig, ReplicasConfig, ScalingConfig
from orchestration.errors import PlacementError
from orchestration.models import DoneEvent, ErrorEvent, ExpertEvent
from tests.conftest import RAY_INIT, config_dict, make_config, until

pytestmark = pytest.mark.cluster
CONTROL = {"num_cpus": 0, "resources": {"chorus-control": 0.001}}


@pytest.fixture(scope="module")
def cluster():
    """Head (0 GPUs, the control resource) + two workers with 2 GPUs each."""
    was_running = ray.is_initialized()
    ray.shutdown()
    sim = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "num_gpus": 0, "resources": {"chorus-control": 1}})
    workers = [sim.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    ray.init(address=sim.address, include_dashboard=False, log_to_driver=False)
    sim.wait_for_nodes()
    yield sim, workers
    ray.shutdown()
    sim.shutdown()
    if was_running:
        ray.init(**RAY_INIT)


def _gpu_team(experts: list[str], **mock: Any) -> ChorusConfig:
    patch = {name: {"num_gpus": 1, "max_restarts": 4, "mock": {"ttft_s": 0.2, **mock}}
             for name in experts}
    config = make_config(experts=patch, router={"resources": CONTROL},
                         executor={"resources": CONTROL},
                         server={"resources": CONTROL, "startup_timeout_s": 60})
    return config.model_copy(update={"experts": [e for e in config.experts if e.name in experts]})


def _node_ids(nodes) -> set[str]:
    return {node.node_id for node in nodes}


async def test_an_expert_scales_out_on_gpu_nodes_under_load_and_back_when_idle(cluster) -> None:
    """min 1, max 5 on four GPUs: grows to 4 placed replicas, the 5th is given up and
    reported, no request fails, then it drains back to 1."""
    sim, workers = cluster
    config = _gpu_team(["general"], tokens=10, token_latency_s=0.05, ttft_s=0.05)
    general = config.expert("general").model_copy(update={
        "max_concurrency": 2,
        "replicas": ReplicasConfig(min=1, max=5, target_per_replica=2, upscale_delay_s=0.3,
                                   downscale_delay_s=1.5)})
    config = config.model_copy(update={
        "experts": [general],
        # Long enough for a placeable replica on a loaded machine; the 5th never is.
        "scaling": ScalingConfig(interval_s=0.2, placement_timeout_s=15,
                                 placement_backoff_s=600)})
    async with Client.local(config) as client:
        stop = asyncio.Event()
        outcomes: list[bool] = []

        async def caller(i: int) -> None:
            while not stop.is_set():
                result = await client.run(f"busy {i}", primary="general", experts=[])
                outcomes.append(result.primary.ok)

        callers = [asyncio.ensure_future(caller(i)) for i in range(16)]

        async def scaling() -> dict[str, Any]:
            return (await client.stats())["experts"]["general"]

        async def grown() -> bool:
            state = (await scaling())["scaling"]
            gave_up = [h for h in state["history"] if h["direction"] == "gave_up"]
            return state["ready"] == 4 and bool(gave_up)

        await until(grown, timeout=120, what="4 ready replicas and the 5th given up")
        at_peak = await scaling()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*callers), timeout=60)

        async def shrunk() -> bool:
            state = (await scaling())["scaling"]
            return (state["ready"], state["draining"], state["starting"]) == (1, 0, 0)

        await until(shrunk, timeout=90, what="back to one replica")
        after = await scaling()
    gpu_nodes = {w.node_id for w in workers}
    ready = {label: r for label, r in at_peak["replicas"].items() if "node_id" in r}
    assert len(ready) == 4 and {r["node_id"] for r in ready.values()} <= gpu_nodes
    gave_up = [h for h in at_peak["scaling"]["history"] if h["direction"] == "gave_up"][0]
    assert "GPU=1" in gave_up["reason"] and "not ready within 15s" in gave_up["reason"]
    assert outcomes and all(outcomes), "a request failed while scaling"
    directions = [h["direction"] for h in after["scaling"]["history"]]
    assert directions.count("removed") >= 3 and len(after["replicas"]) == 1


async def test_experts_land_on_gpu_nodes_control_plane_on_the_head(cluster, tmp_path) -> None:
    from ray import serve

    from serve_app import build_app

    sim, workers = cluster
    config = _gpu_team(["general", "code", "math", "critic"])
    path = tmp_path / "placed.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        handle = serve.run(build_app({"config": str(path)}), name="placed", route_prefix="/placed")
        stats = await handle.team_stats.remote()
        import httpx

        async with httpx.AsyncClient() as http:
            ingress = (await http.get(f"http://127.0.0.1:{port}/placed/v1/stats")).json()["ingress"]
    finally:
        serve.shutdown()
    head = sim.head_node.node_id
    assert {s["node_id"] for s in stats["experts"].values()} <= _node_ids(workers)
    assert stats["router"]["node_id"] == head
    assert stats["executor"]["node_id"] == head
    assert ingress["node_id"] == head


async def test_node_loss_restarts_experts_and_every_request_terminates(cluster) -> None:
    sim, workers = cluster
    config = _gpu_team(["general", "code"], tokens=10, token_latency_s=0.05)
    async with Client.local(config) as client:
        stats = await client.stats()
        placed = {name: s["node_id"] for name, s in stats["experts"].items()}
        victim = next(w for w in workers if w.node_id in placed.values())
        lost = sorted(name for name, node in placed.items() if node == victim.node_id)

        async def one(i: int) -> list[Any]:
            return [e async for e in client.stream(f"python code {i}", experts=["code"])]

        jobs = [asyncio.ensure_future(one(i)) for i in range(20)]

        async def busy() -> bool:
            return (await client.team.executor.load.remote()).active >= 2

        await until(busy, what="requests in flight")
        sim.remove_node(victim)
        streams = await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)
        after = await client.stats()

    for events in streams:
        terminal = [e for e in events if isinstance(e, DoneEvent | ErrorEvent)]
        assert len(terminal) == 1 and terminal[0] is events[-1]
        assert isinstance(terminal[0], DoneEvent), terminal[0]
        assert terminal[0].primary.ok and all(r.ok for r in terminal[0].experts)
    retried = [r for events in streams for e in events if isinstance(e, ExpertEvent)
               for r in [e.result] if r.attempts > 1]
    retried += [events[-1].primary for events in streams if events[-1].primary.attempts > 1]
    assert retried, "the lost node's tasks were retried"
    assert {r.expert for r in retried} <= set(lost)
    for name in lost:
        assert after["experts"][name]["node_id"] != victim.node_id
        assert after["experts"][name]["reconstructed"] is True
        assert after["experts"][name]["replicas"][f"{name}#0"]["ray_restarts"] >= 1


async def test_a_node_that_comes_back_is_used_again(cluster) -> None:
    sim, _ = cluster
    # Down to one 2-GPU worker (the node-loss drill may already have removed one) ...
    for node in sorted(sim.worker_nodes, key=lambda n: n.node_id)[1:]:
        sim.remove_node(node)
    # ... then a node comes back: three GPU experts need it.
    comeback = sim.add_node(num_cpus=2, num_gpus=2)
    sim.wait_for_nodes()
    config = _gpu_team(["general", "code", "math"])
    async with Client.local(config) as client:
        stats = await client.stats()
        nodes = {s["node_id"] for s in stats["experts"].values()}
        result = await client.run("python code and the sum", experts=["code", "math"])
    assert comeback.node_id in nodes and len(nodes) == 2
    assert result.primary.ok and all(r.ok for r in result.experts)


async def test_impossible_placement_fails_fast_naming_the_expert(cluster) -> None:
    data = config_dict("mock")
    for expert in data["experts"]:
        expert["num_gpus"] = 3  # no node has three GPUs
    data["experts"][0]["num_gpus"] = 1
    data["server"]["startup_timeout_s"] = 5
    from orchestration.config import parse_config

    config = parse_config(data)
    name = f"impossible-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with pytest.raises(PlacementError) as info:
        await Team.start(config, name)
    elapsed = time.monotonic() - started
    message = info.value.message
    assert "cannot place the team within 5s" in message
    for expert in ("code", "math", "critic"):
        assert f"expert {expert!r} needs GPU=3" in message
    assert "'general'" not in message
    assert elapsed < 5 + 15, elapsed  # bounded by the configured time, not forever
    leftovers = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(name)]
    assert leftovers == []
