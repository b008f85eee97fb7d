"""How well and how fast the router picks experts: keywords vs semantic vs hybrid.

    python bench/bench_router.py                       # the evaluation set, every method
    python bench/bench_router.py --data tests/data/router_dev.jsonl --sweep

For each method: top-1 primary accuracy (overall, per category, and on the prompts that
share no keyword with their experts' lists), specialist precision/recall/F1 (micro, over
(prompt, expert) pairs; a specialist is any expert besides the default generalist that the
plan consults, as primary or in parallel; `strict` counts the parallel ones only, so a
plan that swaps primary and specialist scores zero there), and the router's added latency
per plan (embedding the prompt,
scoring, planning; one prompt at a time, in-process, p50/p99). Prints a table and saves
JSON under bench/results/. Route utterances live in the config and are kept apart from
the evaluation set; the benchmark checks and reports that none is a near-copy of one.
`--sweep` tries score thresholds and keyword weights: use it on the dev set only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.embedder import Embedder  # noqa: E402
from orchestration.config import ChorusConfig, load_config  # noqa: E402
from orchestration.models import OrchestrateRequest  # noqa: E402
from orchestration.routing import keyword_hits, plan_request  # noqa: E402
from orchestration.semantic import RouteIndex  # noqa: E402

METHODS = ("keywords", "semantic", "hybrid")
TARGETS = {"top1": 0.85, "specialist_f1": 0.8, "latency_ms_p50": 10.0}
NEAR_COPY = 0.95  # cosine above which an evaluation prompt counts as a copy of a route


def load_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def keyword_free(config: ChorusConfig, row: dict[str, Any]) -> bool:
    """True when no expected expert (other than the default) has a keyword in the prompt."""
    expected = {row["primary"], *row["specialists"]} - {config.router.primary}
    return bool(expected) and not any(
        keyword_hits(config.expert(name), row["prompt"]) for name in expected)


def with_router(config: ChorusConfig, **router: Any) -> ChorusConfig:
    data = config.model_dump()
    data["router"].update(router)
    return ChorusConfig.model_validate(data)


def prf(pairs: list[tuple[set[str], set[str]]]) -> tuple[float, float, float]:
    """Micro precision, recall and F1 over (expected, predicted) sets of experts."""
    tp = sum(len(e & g) for e, g in pairs)
    fp = sum(len(g - e) for e, g in pairs)
    fn = sum(len(e - g) for e, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(config: ChorusConfig, rows: list[dict[str, Any]],
          plans: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Accuracy figures for predicted (primary, specialists) against the labels."""
    hits = [plan[0] == row["primary"] for row, plan in zip(rows, plans, strict=True)]
    default = {config.router.primary}
    consulted = [({row["primary"], *row["specialists"]} - default, {plan[0], *plan[1]} - default)
                 for row, plan in zip(rows, plans, strict=True)]
    precision, recall, f1 = prf(consulted)
    strict = prf([(set(row["specialists"]), set(plan[1]))
                  for row, plan in zip(rows, plans, strict=True)])
    categories = sorted({row["category"] for row in rows})
    free = [h for row, h in zip(rows, hits, strict=True) if keyword_free(config, row)]
    return {
        "top1": float(np.mean(hits)),
        "top1_keyword_free": float(np.mean(free)) if free else None,
        "keyword_free_prompts": len(free),
        "top1_by_category": {
            c: float(np.mean([h for row, h in zip(rows, hits, strict=True) if row["category"] == c]))
            for c in categories},
        "specialist_precision": precision,
        "specialist_recall": recall,
        "specialist_f1": f1,
        "strict_specialist_precision": strict[0],
        "strict_specialist_recall": strict[1],
        "strict_specialist_f1": strict[2],
    }


def run_method(config: ChorusConfig, rows: list[dict[str, Any]], embedder: Embedder | None,
               index: RouteIndex | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Plan every prompt the way the router actor does, timing each plan."""
    plans, latencies, misses = [], [], []
    for row in rows:
        request = OrchestrateRequest(prompt=row["prompt"])
        started = time.perf_counter()
        similarity = None
        if config.router.method != "keywords":
            assert embedder is not None and index is not None
            similarity = index.similarity(embedder.encode([row["prompt"]])[0])
        plan = plan_request(request, config, None, similarity)
        latencies.append((time.perf_counter() - started) * 1000)
        got = (plan.primary.expert, [t.expert for t in plan.experts])
        plans.append(got)
        if got != (row["primary"], row["specialists"]):
            misses.append({"prompt": row["prompt"], "expected": [row["primary"], row["specialists"]],
                           "got": list(got), "reason": plan.reason})
    result = score(config, rows, plans)
    result["latency_ms_p50"] = float(np.percentile(latencies, 50))
    result["latency_ms_p99"] = float(np.percentile(latencies, 99))
    return result, misses


def overlap(config: ChorusConfig, rows: list[dict[str, Any]], embedder: Embedder,
            index: RouteIndex) -> dict[str, Any]:
    """Is any evaluation prompt a copy of a route utterance? (It must not be.)"""
    routes = {u.strip().lower() for e in config.experts for u in e.routes}
    exact = [r["prompt"] for r in rows if r["prompt"].strip().lower() in routes]
    nearest = (embedder.encode([r["prompt"] for r in rows]) @ index.vectors.T).max(axis=1)
    return {"routes": index.size, "exact_copies": exact,
            "near_copies": int((nearest > NEAR_COPY).sum()),
            "nearest_route_cosine_max": float(nearest.max())}


def sweep(config: ChorusConfig, rows: list[dict[str, Any]], embedder: Embedder,
          index: RouteIndex) -> list[dict[str, Any]]:
    """Accuracy over a grid of thresholds, ratios and keyword weights (dev set only)."""
    sims = [index.similarity(v) for v in embedder.encode([r["prompt"] for r in rows])]
    results = []
    for method in ("semantic", "hybrid"):
        weights = (0.0,) if method == "semantic" else (0.05, 0.1, 0.15, 0.2)
        grid = [(w, round(float(b), 3), round(float(r), 2)) for w in weights
                for b in np.arange(0.15, 0.351, 0.025) for r in np.arange(0.5, 0.91, 0.05)]
        for weight, bar, ratio in grid:
            trial = with_router(config, method=method, score_threshold=bar,
                                specialist_ratio=ratio, keyword_weight=weight)
            plans = []
            for row, similarity in zip(rows, sims, strict=True):
                plan = plan_request(OrchestrateRequest(prompt=row["prompt"]), trial, None,
                                    similarity)
                plans.append((plan.primary.expert, [t.expert for t in plan.experts]))
            figures = score(trial, rows, plans)
            results.append({"method": method, "score_threshold": bar,
                            "specialist_ratio": ratio, "keyword_weight": weight,
                            **{k: round(figures[k], 3) for k in
                               ("top1", "specialist_f1", "strict_specialist_f1")}})
    results.sort(key=lambda r: (r["top1"] + r["specialist_f1"]), reverse=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/mock.yaml")
    parser.add_argument("--data", default=str(ROOT / "tests/data/router_eval.jsonl"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sweep", action="store_true", help="grid of thresholds (dev set)")
    parser.add_argument("--misses", action="store_true", help="print every wrong plan")
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    args = parser.parse_args(argv)

    config = load_config(args.config)
    rows = load_rows(Path(args.data))
    started = time.perf_counter()
    embedder = Embedder(config.router.model)
    index = RouteIndex.build(config, embedder.encode)
    load_s = time.perf_counter() - started
    for _ in range(20):  # warm the session up (first runs allocate)
        embedder.encode(["warm-up prompt"])
    print(f"{len(rows)} prompts from {args.data}; {index.size} routes in {args.config}; "
          f"model {config.router.model} loaded and routes embedded in {load_s:.2f}s")

    report: dict[str, Any] = {
        "data": args.data, "config": args.config, "model": config.router.model,
        "prompts": len(rows), "model_load_s": load_s, "targets": TARGETS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "overlap": overlap(config, rows, embedder, index), "methods": {},
    }
    copies = report["overlap"]
    print(f"route/eval separation: {len(copies['exact_copies'])} exact copies, "
          f"{copies['near_copies']} prompts with a route above cosine {NEAR_COPY} "
          f"(closest {copies['nearest_route_cosine_max']:.3f})")
    if args.sweep:
        report["sweep"] = sweep(config, rows, embedder, index)
        for line in report["sweep"][:10]:
            print(json.dumps(line))

    header = (f"{'method':9} {'top1':>6} {'kw-free':>7} {'spec P':>7} {'spec R':>7} "
              f"{'spec F1':>7} {'strict':>7} {'p50 ms':>7} {'p99 ms':>7}")
    print(header)
    for method in args.methods.split(","):
        trial = with_router(config, method=method)
        result, misses = run_method(trial, rows, embedder, index)
        report["methods"][method] = {**result, "misses": misses}
        print(f"{method:9} {result['top1']:6.3f} {result['top1_keyword_free'] or 0:7.3f} "
              f"{result['specialist_precision']:7.3f} {result['specialist_recall']:7.3f} "
              f"{result['specialist_f1']:7.3f} {result['strict_specialist_f1']:7.3f} "
              f"{result['latency_ms_p50']:7.2f} "
              f"{result['latency_ms_p99']:7.2f}")
        print("          by category: " + ", ".join(
            f"{c} {v:.2f}" for c, v in result["top1_by_category"].items()))
        if args.misses:
            for miss in misses:
                print(f"    MISS {miss['expected']} -> {miss['got']}: {miss['prompt']}\n"
                      f"         {miss['reason']}")
    print(f"targets: semantic/hybrid top-1 >= {TARGETS['top1']}, specialist F1 >= "
          f"{TARGETS['specialist_f1']}, p50 <= {TARGETS['latency_ms_p50']} ms")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"router-{Path(args.data).stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
