"""Fair share against the served app: a light tenant's latency while a heavy one floods.

    python bench/bench_fairness.py                 # about 2 minutes
    python bench/bench_fairness.py --flood 100 --light 5

One small expert (2 slots; each answer 8 mock tokens, 5 ms apart) behind the Serve app
over HTTP. Tenant `heavy` keeps `--flood` (200) requests outstanding for it: each of
its callers sends the next request when its answer ends, so the expert's queue stays
full. Tenant `light` sends `--light` requests one at a time at the same priority. Its
median latency is measured three times in the same run:

- `idle`: no flood (the bare peer every other figure is divided by);
- `fair`: the flood going, light with its own key (fair share on);
- `one_tenant`: the flood going, light sending with heavy's key, so both are one
  tenant and light's requests wait behind heavy's queue (what fair share off gives).

Every heavy request must complete (counted and checked at the end). Prints the medians
and the ratios `fair / idle` and `one_tenant / idle`; saves JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"heavy": "sk-bench-heavy", "light": "sk-bench-light"}


def team_config() -> dict[str, Any]:
    return {
        "experts": [{"name": "small", "max_concurrency": 2,
                     "mock": {"ttft_s": 0.0, "token_latency_s": 0.005, "tokens": 8}}],
        "router": {"primary": "small",
                   "thresholds": {"parallel_limited": 10_000, "serial": 10_000,
                                  "drop_normal_experts": 10_000}},
        "executor": {"max_in_flight": 16, "max_queue": 4096},
        "tenants": [{"name": name, "keys": [{"key_sha256": hashlib.sha256(key.encode())
                                             .hexdigest()}]} for name, key in KEYS.items()],
    }


async def light_latencies(http: Any, url: str, key: str, count: int) -> list[float]:
    seconds = []
    for i in range(count):
        started = time.perf_counter()
        response = await http.post(url, json={"prompt": f"light {i}", "stream": False,
                                              "experts": []},
                                   headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        seconds.append(time.perf_counter() - started)
    return seconds


async def measure(url: str, flood: int, light: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=flood + 8, max_keepalive_connections=flood + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await light_latencies(http, url, KEYS["light"], 3)  # warm up
        idle = await light_latencies(http, url, KEYS["light"], light)
        figures: dict[str, Any] = {"idle": idle}
        heavy_done = 0
        for phase, key in (("fair", KEYS["light"]), ("one_tenant", KEYS["heavy"])):
            stop = asyncio.Event()

            async def heavy(i: int, stop: asyncio.Event) -> None:
                nonlocal heavy_done
                while not stop.is_set():
                    response = await http.post(
                        url, json={"prompt": f"heavy {i}", "stream": False, "experts": []},
                        headers={"Authorization": f"Bearer {KEYS['heavy']}"})
                    assert response.status_code == 200, response.text
                    heavy_done += 1

            callers = [asyncio.ensure_future(heavy(i, stop)) for i in range(flood)]
            await asyncio.sleep(2.0)  # the queue fills (a benchmark, not a test)
            figures[phase] = await light_latencies(http, url, key, light)
            stop.set()
            await asyncio.gather(*callers)  # every heavy request completes
        figures["heavy_completed"] = heavy_done
    return figures


def main(args: argparse.Namespace) -> dict[str, Any]:
    from orchestration.serve_env import serve_env

    os.environ.update(serve_env())
    import ray
    import yaml
    from ray import serve

    import serve_app

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        path = Path(args.workdir)
        path.mkdir(parents=True, exist_ok=True)
        config = path / "bench-fairness.yaml"
        config.write_text(yaml.safe_dump(team_config()))
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(serve_app.build_app({"config": str(config)}), name="bench", route_prefix="/")
        figures = asyncio.run(measure(f"http://127.0.0.1:{args.port}/v1/orchestrate",
                                      args.flood, args.light))
    finally:
        ray.shutdown()
    medians = {phase: round(statistics.median(figures[phase]), 4)
               for phase in ("idle", "fair", "one_tenant")}
    report = {"workload": {"flood": args.flood, "light": args.light, "slots": 2, "tokens": 8,
                           "token_s": 0.005},
              "machine": {"cpus": os.cpu_count()},
              "median_s": medians, "heavy_completed": figures["heavy_completed"],
              "fair_vs_idle": round(medians["fair"] / medians["idle"], 2),
              "one_tenant_vs_idle": round(medians["one_tenant"] / medians["idle"], 2)}
    print(f"light tenant's median latency: idle {medians['idle']:.3f} s, "
          f"fair share {medians['fair']:.3f} s ({report['fair_vs_idle']}x idle), "
          f"one tenant with the flood {medians['one_tenant']:.3f} s "
          f"({report['one_tenant_vs_idle']}x idle); heavy requests completed: "
          f"{figures['heavy_completed']}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--light", type=int, default=10)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--workdir", default="/tmp/chorus-bench-fairness")
    parser.add_argument("--out", default="bench/results/fairness.json")
    options = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    result = main(options)
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(result, indent=2))
    print(f"saved {options.out}")
