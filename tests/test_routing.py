"""Semantic routing without Ray: the packaged embedding model in-process, the policy, the data."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from actors.embedder import BatchingEncoder, Embedder
from orchestration.config import ChorusConfig
from orchestration.errors import RouterModelError
from orchestration.models import ExecutionPlan, ExecutionStrategy, ExecutorLoad, OrchestrateRequest
from orchestration.routing import keyword_hits, plan_request
from orchestration.semantic import RouteIndex
from tests.conftest import ROOT, make_config

DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def _plan(config: ChorusConfig, embedder: Embedder, prompt: str, load: ExecutorLoad | None = None,
          **request: object) -> ExecutionPlan:
    """What the router actor does for one request (minus Ray)."""
    similarity = None
    if config.router.method != "keywords":
        similarity = RouteIndex.build(config, embedder.encode).similarity(
            embedder.encode([prompt])[0])
    return plan_request(OrchestrateRequest(prompt=prompt, **request), config, load, similarity)


def _consulted(plan: ExecutionPlan) -> list[str]:
    return [t.expert for t in plan.tasks]


# Paraphrases that share no word with their expert's keyword list in config/mock.yaml.
PARAPHRASES = [
    ("Why does my script crash with a segfault?", "code"),
    ("My laptop app freezes whenever I open a big file", "code"),
    ("How likely is it to roll a double with two dice?", "math"),
    ("Find the derivative of x^3 + 2x", "math"),
    ("Poke holes in my plan to move abroad", "critic"),
]


@pytest.mark.parametrize(("prompt", "expert"), PARAPHRASES)
def test_a_paraphrase_reaches_its_expert_by_meaning_not_by_keywords(
        embedder: Embedder, prompt: str, expert: str) -> None:
    semantic = make_config(router={"method": "semantic"})
    assert keyword_hits(semantic.expert(expert), prompt) == 0  # truly keyword-free
    by_meaning = _plan(semantic, embedder, prompt)
    assert by_meaning.primary.expert == expert
    assert by_meaning.reason.startswith(f"semantic scores: {expert} ")  # best score first
    by_keywords = _plan(make_config(router={"method": "keywords"}), embedder, prompt)
    assert expert not in _consulted(by_keywords)
    assert by_keywords.reason.startswith("keyword hits: none")


@pytest.mark.parametrize("method", ["keywords", "semantic", "hybrid"])
def test_a_math_prompt_gets_the_math_expert_as_primary(embedder: Embedder, method: str) -> None:
    plan = _plan(make_config(router={"method": method}), embedder,
                 "Calculate the integral of x squared from 0 to 2")
    assert plan.primary.expert == "math" and plan.primary.role == "primary"
    assert "primary math: best fit" in plan.reason


def test_forced_primary_and_experts_are_honoured_exactly(embedder: Embedder) -> None:
    config = make_config()
    prompt = "Calculate the integral of x squared from 0 to 2"
    both = _plan(config, embedder, prompt, primary="critic", experts=["general", "code"])
    assert _consulted(both) == ["critic", "general", "code"]
    assert "primary critic: chosen by the caller" in both.reason
    none = _plan(config, embedder, prompt, experts=[])
    assert _consulted(none) == ["general"]  # forced experts: the default primary, no fit
    primary_only = _plan(config, embedder, prompt, primary="code")
    assert primary_only.primary.expert == "code"
    assert [t.expert for t in primary_only.experts] == ["math"]  # the fit is now a specialist


def test_load_still_degrades_and_drops_normal_specialists() -> None:
    # Synthetic similarities: the policy alone, whatever the model says.
    config = make_config()
    similarity = {"general": 0.1, "code": 0.5, "math": 0.6, "critic": 0.55}
    request = OrchestrateRequest(prompt="anything")
    idle = plan_request(request, config, ExecutorLoad(), similarity)
    assert _consulted(idle) == ["math", "critic", "code"]
    assert idle.strategy is ExecutionStrategy.PARALLEL_FULL
    busy = plan_request(request, config, ExecutorLoad(active=9), similarity)
    assert busy.strategy is ExecutionStrategy.PARALLEL_LIMITED and len(busy.experts) == 2
    swamped = plan_request(request, config, ExecutorLoad(active=16, queued=20), similarity)
    assert swamped.strategy is ExecutionStrategy.SERIAL
    assert _consulted(swamped) == ["math", "code"]  # critic is of normal importance, code high
    assert "load 36: dropped normal-importance ['critic']" in swamped.reason


def test_thresholds_and_ratio_decide_and_the_reason_shows_the_scores() -> None:
    config = make_config(experts={"critic": {"score_threshold": 0.6}})
    similarity = {"general": 0.1, "code": 0.5, "math": 0.45, "critic": 0.55}
    plan = plan_request(OrchestrateRequest(prompt="anything"), config, None, similarity)
    # critic misses its own threshold; math reaches 0.2 but not 0.8 x code's 0.5 + no keyword
    assert _consulted(plan) == ["code", "math"]
    assert plan.reason.startswith(
        "hybrid scores: critic 0.550<0.6, code 0.500>=0.2, math 0.450>=0.2, general 0.100<0.2")
    weak = {"general": 0.1, "code": 0.19, "math": 0.05, "critic": 0.1}
    fallback = plan_request(OrchestrateRequest(prompt="anything"), config, None, weak)
    assert _consulted(fallback) == ["general"]
    assert "primary general: the default (no expert reached its threshold)" in fallback.reason


def test_hybrid_adds_the_keyword_weight_and_keywords_need_no_model() -> None:
    config = make_config()
    similarity = {"general": 0.1, "code": 0.3, "math": 0.32, "critic": 0.1}
    plan = plan_request(OrchestrateRequest(prompt="a python question"), config, None, similarity)
    assert plan.primary.expert == "code"  # 0.3 + 0.15 for the keyword beats math's 0.32
    without_scores = plan_request(OrchestrateRequest(prompt="a python question"), config)
    assert _consulted(without_scores) == ["code"]
    assert "hybrid router fell back to keywords" in without_scores.reason


def test_embeddings_are_unit_vectors_that_rank_by_meaning(embedder: Embedder) -> None:
    vectors = embedder.encode(["My program crashes on start", "Why does my app crash?",
                               "A recipe for pancakes"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.5 > vectors[0] @ vectors[2]
    assert embedder.encode([]).shape == (0, 384)


def test_a_model_that_cannot_load_names_the_router_model() -> None:
    with pytest.raises(RouterModelError) as info:
        Embedder("/nonexistent/minilm")
    assert info.value.field == "router.model"
    assert info.value.message.startswith(
        "router.model: cannot load the embedding model '/nonexistent/minilm'")


async def test_concurrent_prompts_are_embedded_in_one_batch() -> None:
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.array([[float(len(t))] for t in texts])

    encoder = BatchingEncoder(encode)
    prompts = [f"prompt {'x' * i}" for i in range(10)]
    vectors = await asyncio.gather(*(encoder.embed(p) for p in prompts))
    assert [float(v[0]) for v in vectors] == [float(len(p)) for p in prompts]
    assert calls == [prompts] and encoder.batches == 1 and encoder.largest_batch == 10
    assert float((await encoder.embed("again"))[0]) == 5.0 and encoder.batches == 2


async def test_a_failed_batch_fails_its_callers_and_the_next_batch_runs() -> None:
    def encode(texts: list[str]) -> np.ndarray:
        if "boom" in texts:
            raise RuntimeError("encoder failed")
        return np.ones((len(texts), 1))

    encoder = BatchingEncoder(encode)
    results = await asyncio.gather(encoder.embed("boom"), encoder.embed("fine"),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert float((await encoder.embed("fine"))[0]) == 1.0


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_the_labelled_set_covers_every_expert_and_keeps_apart_from_routes() -> None:
    config = make_config()
    rows = _rows("router_eval.jsonl")
    assert len(rows) >= 200
    assert {r["primary"] for r in rows} == set(config.expert_names)
    assert {r["category"] for r in rows} == {"code", "math", "critic", "general", "none", "mixed"}
    for row in rows:
        assert set(row["specialists"]) <= set(config.expert_names) - {"general", row["primary"]}
    for expert in ("code", "math", "critic"):
        free = [r for r in rows if r["category"] == expert
                and keyword_hits(config.expert(expert), r["prompt"]) == 0]
        assert len(free) >= 25, expert
    routes = {u.lower() for e in config.experts for u in e.routes}
    dev = {r["prompt"] for r in _rows("router_dev.jsonl")}
    assert not {r["prompt"].lower() for r in rows} & routes
    assert not {r["prompt"] for r in rows} & dev


# --------------------------------------------------------------------------- route cache


def test_route_vectors_are_embedded_once_per_model_and_node(tmp_path) -> None:
    from actors.route_cache import VectorCache

    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)

    first = VectorCache(encode, "model-a", tmp_path).encode(["alpha", "beta"])
    again = VectorCache(encode, "model-a", tmp_path)  # a restarted router, same node
    vectors = again.encode(["beta", "gamma", "alpha"])
    assert calls == [["alpha", "beta"], ["gamma"]]  # only the new route is embedded
    assert (again.hits, again.misses) == (2, 1)
    assert vectors[0].tolist() == first[1].tolist() and vectors[2].tolist() == first[0].tolist()
    VectorCache(encode, "model-b", tmp_path).encode(["alpha"])  # another model: its own
    assert calls[-1] == ["alpha"]
    (tmp_path / "model-a.npz").write_bytes(b"not a cache")  # damaged: embedded anew
    assert VectorCache(encode, "model-a", tmp_path).encode(["alpha"]).shape == (1, 2)
    assert calls[-1] == ["alpha"]
    VectorCache(encode, "model-c", None).encode(["x"])  # off: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-a.npz", "model-b.npz"]


def test_a_changed_model_file_is_a_new_identity(tmp_path) -> None:
    import os

    from actors.route_cache import identity

    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    before = identity("m", model)
    os.utime(model, ns=(1, 1))
    assert identity("m", model) != before != identity("n", model)

