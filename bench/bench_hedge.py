"""TTFT with and without hedging, one expert of two replicas where one is slow.

    python bench/bench_hedge.py          # 40 requests each way, 1 client, slow_s 1 s

Replica #0 waits `--slow-s` before every first token (a per-replica mock override),
replica #1 answers at once. The same team runs twice in one Ray instance: hedging off,
then on (`after_s`, `max_fraction`). Prints p50 / p99 TTFT (client-side, to the first
primary delta) each way, their ratio, and the fraction of attempts that were hedges
(<= max_fraction); saves the figures as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import ray


def _team(hedge: bool, args: argparse.Namespace) -> Any:
    from orchestration.config import parse_config

    expert = {"name": "general", "max_concurrency": 4, "replicas": {"min": 2, "max": 2},
              "mock": {"ttft_s": 0.0, "token_latency_s": 0.002, "tokens": 16,
                       "replicas": {0: {"slow_every": 1, "slow_s": args.slow_s}}}}
    return parse_config({
        "experts": [expert], "router": {"primary": "general"},
        "executor": {"hedge": {"enabled": hedge, "after_s": args.after_s,
                               "max_fraction": args.max_fraction}},
    })


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run(hedge: bool, args: argparse.Namespace) -> dict[str, Any]:
    from orchestration.client import Client

    ttfts: list[float] = []
    async with Client.local(_team(hedge, args)) as client:
        async def one() -> None:
            began, first = time.perf_counter(), None
            async for event in client.stream("bench", primary="general", experts=[]):
                if first is None and getattr(event, "type", "") == "primary":
                    first = time.perf_counter() - began
            assert first is not None
            ttfts.append(first)

        queue = list(range(args.requests))

        async def caller() -> None:
            while queue:
                queue.pop()
                await one()

        await asyncio.gather(*(caller() for _ in range(args.clients)))
        counters = (await client.stats())["executor"]["counters"]
    print(hedge, sorted(round(t, 3) for t in ttfts)) if args.verbose else None
    hedges = counters.get("hedges_won", 0) + counters.get("hedges_lost", 0)
    return {"hedging": hedge, "requests": len(ttfts),
            "ttft_p50_s": round(_quantile(ttfts, 0.5), 4),
            "ttft_p99_s": round(_quantile(ttfts, 0.99), 4),
            "attempts": counters.get("dispatched", 0), "hedges": hedges,
            "hedges_won": counters.get("hedges_won", 0),
            "hedged_fraction": round(hedges / max(1, counters.get("dispatched", 0)), 4)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        off = await run(False, args)
        on = await run(True, args)
    finally:
        ray.shutdown()
    report = {"slow_s": args.slow_s, "after_s": args.after_s,
              "max_fraction": args.max_fraction, "clients": args.clients,
              "without": off, "with": on,
              "p50_ratio": round(on["ttft_p50_s"] / off["ttft_p50_s"], 3),
              "p99_ratio": round(on["ttft_p99_s"] / off["ttft_p99_s"], 3)}
    for name, r in (("without hedging", off), ("with hedging", on)):
        print(f"{name:16} TTFT p50 {r['ttft_p50_s']:.3f}s  p99 {r['ttft_p99_s']:.3f}s  "
              f"hedges {r['hedges']} of {r['attempts']} attempts "
              f"({r['hedged_fraction']:.1%}, won {r['hedges_won']})")
    print(f"with/without: p50 x{report['p50_ratio']}, p99 x{report['p99_ratio']}; "
          f"hedged fraction {on['hedged_fraction']:.1%} <= max_fraction {args.max_fraction:.0%}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--slow-s", type=float, default=1.0)
    parser.add_argument("--after-s", type=float, default=0.1)
    parser.add_argument("--max-fraction", type=float, default=0.5)
    parser.add_argument("--verbose", action="store_true", help="print every TTFT")
    parser.add_argument("--out", default="bench/results/hedge.json")
    options = parser.parse_args()
    result = asyncio.run(main(options))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(result, indent=2))
    print(f"saved {options.out}")
