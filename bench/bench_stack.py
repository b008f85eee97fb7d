"""The whole stack against bare Ray peers, side by side on one Ray instance.

    python bench/bench_stack.py                # everything (about 3 minutes, no vLLM)
    python bench/bench_stack.py --vllm         # plus the real-engine comparison
    python bench/bench_stack.py --quick        # shorter windows, for a smoke run

Workloads (mock experts, `Client.local`; see docs/token-path.md for what they show):

- throughput: 128 closed-loop clients, one expert with N slots (`max_concurrency` =
  `max_in_flight` = N), tasks of 0.36 s (32 tokens). Ideal = N / 0.36 req/s. Peers: a
  bare per-token Ray stream driver <- actor (1 hop) and driver <- relay <- actor
  (2 hops), each actor limited to N concurrent streams.
- zero-work: one request at a time (no TTFT, one token) against one bare actor call,
  and against two bare calls in series (driver -> relay -> actor), the floor of a
  design where the executor dispatches every call.
- TTFT: p50/p99 of the first `primary` event with a 50 ms mock TTFT, under light load.

Prints each ratio and saves the figures as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import ray

TASK_S, TOKENS, CLIENTS = 0.36, 32, 128
TOKEN_S = TASK_S / (TOKENS - 1)  # the first token at once, the 32nd at 0.36 s


@ray.remote
class BareExpert:
    """The peer: one ObjectRef per token, nothing else."""

    async def ping(self) -> int:
        return 1

    async def tokens(self, n: int, every: float) -> Any:
        for i in range(n):
            if i:
                await asyncio.sleep(every)
            yield " tok"


@ray.remote
class BareRelay:
    """The 2-hop peer: relays every token of the expert's stream as its own object
    (throughput), or one call (zero-work)."""

    def __init__(self, expert: Any) -> None:
        self.expert = expert

    async def tokens(self, n: int, every: float) -> Any:
        async for ref in self.expert.tokens.options(num_returns="streaming").remote(n, every):
            yield await ref

    async def ping(self) -> int:
        return await self.expert.ping.remote()


async def _closed_loop(one: Any, seconds: float, clients: int = CLIENTS) -> float:
    """Requests per second of `clients` callers each sending the next when one ends."""
    done, elapsed = await closed_loop(one, seconds, clients)
    return done / elapsed


async def closed_loop(one: Any, seconds: float, clients: int = CLIENTS) -> tuple[int, float]:
    """Requests completed by `clients` callers in `seconds` (each sending the next when
    one ends), and the time that took."""
    stop = time.perf_counter() + seconds
    done = 0

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await one()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done, time.perf_counter() - started


async def _bare_rps(slots: int, hops: int, seconds: float) -> float:
    expert = BareExpert.options(max_concurrency=slots).remote()
    source = expert if hops == 1 else BareRelay.options(max_concurrency=slots).remote(expert)

    async def one() -> None:
        async for ref in source.tokens.options(num_returns="streaming").remote(TOKENS, TOKEN_S):
            await ref

    await one()
    try:
        return await _closed_loop(one, seconds)
    finally:
        for actor in {expert, source}:
            ray.kill(actor)


STREAM: dict[str, Any] = {}  # stream-section overrides (--hold, --backpressure)


def _team(slots: int, **mock: Any) -> Any:
    from orchestration.config import parse_config

    expert = {"name": "general", "max_concurrency": slots,
              "mock": {"ttft_s": 0.0, "token_latency_s": TOKEN_S, "tokens": TOKENS, **mock}}
    return parse_config({
        "experts": [expert],
        "router": {"primary": "general",
                   "thresholds": {"parallel_limited": 10_000, "serial": 10_000,
                                  "drop_normal_experts": 10_000}},
        "executor": {"max_in_flight": slots, "max_queue": 4 * CLIENTS},
        "stream": STREAM,
    })


async def _chorus_rps(slots: int, seconds: float) -> dict[str, float]:
    from orchestration.client import Client

    async with Client.local(_team(slots)) as client:
        async def one() -> None:
            async for _event in client.stream("bench", experts=[], max_tokens=TOKENS):
                pass

        await one()
        rps = await _closed_loop(one, seconds)
        stats = await client.stats()
    return {"rps": rps, "dispatched": stats["executor"]["counters"].get("dispatched", 0)}


async def _median_ms(call: Any, n: int) -> float:
    for _ in range(100):  # warm: the first calls of a fresh actor are slower
        await call()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def zero_work(n: int) -> dict[str, float]:
    from orchestration.client import Client

    bare = BareExpert.remote()
    relay = BareRelay.remote(bare)
    bare_ms = await _median_ms(lambda: bare.ping.remote(), n)
    two_ms = await _median_ms(lambda: relay.ping.remote(), n)
    async with Client.local(_team(8, tokens=1, token_latency_s=0.0)) as client:
        run_ms = await _median_ms(lambda: client.run("zero", experts=[]), n)

        async def streamed() -> None:
            async for _event in client.stream("zero", experts=[]):
                pass

        stream_ms = await _median_ms(streamed, n)
    ray.kill(relay)
    ray.kill(bare)
    return {"bare_call_ms": bare_ms, "bare_2hop_call_ms": two_ms, "run_ms": run_ms,
            "stream_ms": stream_ms, "run_ratio": run_ms / bare_ms,
            "stream_ratio": stream_ms / bare_ms, "run_vs_2hop": run_ms / two_ms}


async def ttft(n: int) -> dict[str, float]:
    """First `primary` event with a 50 ms mock TTFT, 8 concurrent callers."""
    from orchestration.client import Client

    firsts: list[float] = []
    async with Client.local(_team(64, ttft_s=0.05, tokens=8)) as client:
        async def one() -> None:
            started, first = time.perf_counter(), None
            async for event in client.stream("ttft", experts=[]):
                if event.type == "primary" and first is None:
                    first = time.perf_counter() - started
            assert first is not None
            firsts.append(first)

        await one()
        firsts.clear()
        for _ in range(n // 8):
            await asyncio.gather(*(one() for _ in range(8)))
    firsts.sort()
    return {"p50_ms": firsts[len(firsts) // 2] * 1000,
            "p99_ms": firsts[int(len(firsts) * 0.99) - 1] * 1000, "requests": len(firsts)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    seconds = 4.0 if args.quick else args.seconds
    report: dict[str, Any] = {"throughput": {}, "machine": {"cpus": _cpus()}}
    for slots in [] if "throughput" in args.skip else args.slots:
        ideal = min(slots, CLIENTS) / TASK_S
        one = await _bare_rps(slots, 1, seconds)
        two = await _bare_rps(slots, 2, seconds)
        chorus = await _chorus_rps(slots, seconds)
        row = {"slots": slots, "ideal_rps": ideal, "chorus_rps": chorus["rps"],
               "bare_1hop_rps": one, "bare_2hop_rps": two,
               "of_ideal": chorus["rps"] / ideal, "vs_1hop": chorus["rps"] / one,
               "vs_2hop": chorus["rps"] / two}
        report["throughput"][slots] = row
        print(f"{slots:>4} slots: chorus {chorus['rps']:6.1f} req/s = {row['of_ideal']:.2f} of "
              f"ideal {ideal:.0f}; bare 1-hop {one:6.1f} (x{row['vs_1hop']:.2f}), "
              f"2-hop {two:6.1f} (x{row['vs_2hop']:.2f})", flush=True)
    if "zero" not in args.skip:
        zero = await zero_work(100 if args.quick else 300)
        report["zero_work"] = zero
        print(f"zero-work: bare call {zero['bare_call_ms']:.2f} ms, bare 2-hop call "
              f"{zero['bare_2hop_call_ms']:.2f} ms; chorus run {zero['run_ms']:.2f} ms "
              f"(x{zero['run_ratio']:.2f}; x{zero['run_vs_2hop']:.2f} of 2-hop), stream "
              f"{zero['stream_ms']:.2f} ms (x{zero['stream_ratio']:.2f})", flush=True)
    if "ttft" not in args.skip:
        first = await ttft(80 if args.quick else 400)
        report["ttft_50ms_mock"] = first
        print(f"TTFT (50 ms mock): p50 {first['p50_ms']:.1f} ms, p99 {first['p99_ms']:.1f} ms",
              flush=True)
    ray.shutdown()
    if args.vllm:
        import subprocess
        import sys

        out = Path(args.out).with_name("bench_vllm_from_stack.json")
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_vllm.py")),
                        "--requests", "16", "--max-tokens", "128", "--json", str(out)],
                       check=True)
        report["vllm"] = json.loads(out.read_text())
    return report


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vllm", action="store_true")
    parser.add_argument("--hold", type=float, help="stream.max_hold_s (default: the config's)")
    parser.add_argument("--backpressure", type=int, help="stream.backpressure_objects")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "zero", "ttft"])
    parser.add_argument("--out", default="bench/results/stack.json")
    options = parser.parse_args()
    if options.hold is not None:
        STREAM["max_hold_s"] = options.hold
    if options.backpressure is not None:
        STREAM["backpressure_objects"] = options.backpressure
    result = asyncio.run(main(options))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(result, indent=2))
    print(f"saved {options.out}")
