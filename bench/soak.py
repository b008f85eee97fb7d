"""Soak: N mixed requests against a running server; memory and /v1/stats size, start vs end.

    chorus serve &                       # or: serve run serve_app:app
    python bench/soak.py --requests 10000 --url http://127.0.0.1:8000

The mix: streamed and whole orchestrations, chat completions (streamed and not), callers
that hang up after the plan, and bad input. Memory is the resident set (RSS) of every
Chorus process the server reports in /v1/stats (ingress, router, executor, each expert
replica), read from /proc, so run it on the server's machine. The baseline is taken
after a warm-up; the report says how each process moved and whether the stats body
kept its size. Figures are saved as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:  # the process restarted (or runs on another machine): no figure
        return None
    return None


def processes(stats: dict[str, Any]) -> dict[str, int]:
    found = {"ingress": stats.get("ingress", {}).get("pid"),
             "router": stats.get("router", {}).get("pid"),
             "executor": stats.get("executor", {}).get("pid")}
    for expert in stats.get("experts", {}).values():
        for label, replica in expert.get("replicas", {}).items():
            found[label] = replica.get("pid")
    return {name: pid for name, pid in found.items() if isinstance(pid, int)}


async def snapshot(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await http.get(f"{url}/v1/stats")
    stats = response.json()
    pids = processes(stats)
    return {"stats_bytes": len(response.content),
            "rss_kib": {name: _rss_kib(pid) for name, pid in pids.items()}}


async def one(http: httpx.AsyncClient, url: str, i: int) -> str:
    kind = ("stream", "whole", "chat", "chat-stream", "hangup", "bad")[i % 6]
    prompt = f"review this python code and calculate the sum {i}"
    if kind == "stream":
        async with http.stream("POST", f"{url}/v1/orchestrate", json={"prompt": prompt}) as r:
            async for _ in r.aiter_lines():
                pass
        return kind
    if kind == "hangup":
        async with http.stream("POST", f"{url}/v1/orchestrate", json={"prompt": prompt}) as r:
            async for line in r.aiter_lines():
                if line == "event: plan":
                    break
        return kind
    if kind == "whole":
        await http.post(f"{url}/v1/orchestrate", json={"prompt": prompt, "stream": False})
    elif kind in ("chat", "chat-stream"):
        body = {"model": "chorus", "messages": [{"role": "user", "content": prompt}],
                "stream": kind == "chat-stream", "max_tokens": 16}
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass
    else:
        await http.post(f"{url}/v1/orchestrate", content=b'{"prompt": 3}')
    return kind


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=120) as http:
        async def run(n: int, offset: int) -> None:
            queue = iter(range(offset, offset + n))

            async def worker() -> None:
                for i in queue:
                    await one(http, args.url, i)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))

        await run(args.warmup, 0)
        start = await snapshot(http, args.url)
        began = time.monotonic()
        await run(args.requests, args.warmup)
        elapsed = time.monotonic() - began
        await asyncio.sleep(2)  # let the last cancellations settle before reading memory
        end = await snapshot(http, args.url)
    growth = {name: (end["rss_kib"].get(name) or 0) / kib - 1
              for name, kib in start["rss_kib"].items() if kib}
    report = {"requests": args.requests, "warmup": args.warmup, "seconds": elapsed,
              "rps": args.requests / elapsed, "start": start, "end": end,
              "rss_growth": growth,
              "stats_bytes_delta": end["stats_bytes"] - start["stats_bytes"]}
    for name, change in sorted(growth.items()):
        print(f"{name:>12}: {start['rss_kib'][name] / 1024:7.1f} MiB -> "
              f"{(end['rss_kib'].get(name) or 0) / 1024:7.1f} MiB ({change:+.1%})")
    print(f"/v1/stats: {start['stats_bytes']} -> {end['stats_bytes']} bytes; "
          f"{args.requests} requests in {elapsed:.0f} s ({report['rps']:.0f}/s)")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", default="bench/results/soak.json")
    options = parser.parse_args()
    result = asyncio.run(main(options))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(result, indent=2))
    print(f"saved {options.out}")
