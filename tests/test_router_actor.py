"""The router actor with its embedding model: loaded at start, reloaded after a crash."""

from __future__ import annotations

import pytest

from orchestration.client import Client
from orchestration.errors import RouterModelError
from orchestration.models import OrchestrateRequest
from tests.conftest import make_config, until

pytestmark = pytest.mark.usefixtures("ray_session")

PARAPHRASE = "Why does my script crash with a segfault?"  # no keyword of `code`


async def test_the_router_restarts_with_its_model_loaded() -> None:
    import ray

    async with Client.local(make_config()) as client:
        router = client.team.router
        before = await router.stats.remote()
        assert before["method"] == "hybrid" and before["model"] == "all-MiniLM-L6-v2"
        assert before["routes"] == sum(len(e.routes) for e in client.team.config.experts) > 0
        first = await router.plan.remote(OrchestrateRequest(prompt=PARAPHRASE))
        assert first.primary.expert == "code"

        ray.kill(router, no_restart=False)  # as a crash would: Ray restarts it

        async def planned_again() -> bool:
            try:
                plan = await router.plan.remote(OrchestrateRequest(prompt=PARAPHRASE))
            except ray.exceptions.RayActorError:  # still restarting
                return False
            return plan.primary.expert == "code"

        await until(planned_again, timeout=60, what="the restarted router planning again")
        stats: list[dict] = []

        async def answered() -> bool:  # a new process that has planned since it started
            try:
                stats.append(await router.stats.remote())
            except ray.exceptions.RayActorError:  # a call that met the restart: ask again
                return False
            if stats[-1]["plans"] == 0:  # (Ray may deliver a kill twice under load)
                await router.plan.remote(OrchestrateRequest(prompt=PARAPHRASE))
                return False
            return True

        await until(answered, timeout=30, what="the restarted router's stats")
        after = stats[-1]
        assert after["pid"] != before["pid"]
        assert after["routes"] == before["routes"] and after["plans"] >= 1
        assert after["latency_ms_p50"] is not None
        # The whole team serves through it: the plan event carries the semantic reason.
        events = [e async for e in client.stream(PARAPHRASE, max_tokens=4)]
        assert events[0].plan.reason.startswith("hybrid scores: code ")
        assert events[-1].type == "done"


async def test_a_router_model_that_cannot_load_fails_startup_naming_it() -> None:
    config = make_config(router={"model": "/nonexistent/minilm"})
    with pytest.raises(RouterModelError) as info:
        async with Client.local(config):
            pass
    assert info.value.field == "router.model"
    assert "cannot load the embedding model '/nonexistent/minilm'" in info.value.message
    assert "model.onnx" in info.value.message


async def test_keyword_routing_starts_without_the_model() -> None:
    config = make_config(router={"method": "keywords", "model": "/nonexistent/minilm"})
    async with Client.local(config) as client:
        stats = await client.team.router.stats.remote()
        plan = await client.team.router.plan.remote(OrchestrateRequest(prompt="python bug"))
    assert stats["model"] is None and stats["routes"] == 0
    assert plan.primary.expert == "code" and plan.reason.startswith("keyword hits: code 2")
