"""Requests/s of an expert with 1 replica against N replicas, same per-replica concurrency.

    python bench/bench_replicas.py                 # 1 vs 4 replicas, max_concurrency 8 each

Mock experts (0.36 s per task, 32 tokens), streamed requests from closed-loop clients
(twice as many as the N-replica pool has slots), one Ray instance. Prints the ratio
and saves the figures as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import ray

# bench/ is on sys.path when this runs as a script (`python bench/bench_replicas.py`).
from bench_stack import TASK_S, TOKEN_S, TOKENS, _closed_loop


def _team(replicas: int, per_replica: int) -> Any:
    from orchestration.config import parse_config

    expert = {"name": "general", "max_concurrency": per_replica,
              "replicas": {"min": replicas, "max": replicas},
              "mock": {"ttft_s": 0.0, "token_latency_s": TOKEN_S, "tokens": TOKENS}}
    return parse_config({
        "experts": [expert],
        "router": {"primary": "general"},
        "executor": {"max_in_flight": 256, "max_queue": 1024},
    })


async def rps(replicas: int, per_replica: int, clients: int, seconds: float) -> float:
    from orchestration.client import Client

    async with Client.local(_team(replicas, per_replica)) as client:
        async def one() -> None:
            async for _event in client.stream("bench", primary="general", experts=[]):
                pass

        await one()
        return await _closed_loop(one, seconds, clients)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    clients = 2 * args.replicas * args.per_replica
    one = await rps(1, args.per_replica, clients, args.seconds)
    many = await rps(args.replicas, args.per_replica, clients, args.seconds)
    ideal = args.per_replica / TASK_S
    report = {"per_replica": args.per_replica, "clients": clients, "one_replica_rps": one,
              "replicas": args.replicas, "many_replicas_rps": many, "ratio": many / one,
              "ideal_per_replica_rps": ideal}
    print(f"1 replica: {one:.1f} req/s (ideal {ideal:.1f}); {args.replicas} replicas: "
          f"{many:.1f} req/s = x{many / one:.2f}")
    ray.shutdown()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--per-replica", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="bench/results/replicas.json")
    options = parser.parse_args()
    result = asyncio.run(main(options))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(result, indent=2))
    print(f"saved {options.out}")
