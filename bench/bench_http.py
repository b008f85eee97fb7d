"""The HTTP path against `Client.local`, side by side: req/s and CPU-ms per request per role.

    python bench/bench_http.py                  # local, HTTP x1, HTTP x2 (about 2 minutes)
    python bench/bench_http.py --seconds 5      # shorter windows
    python bench/bench_http.py --modes local http1

One mock expert streams 64 tokens, 5 ms apart (0.32 s per answer); 64 closed-loop
clients each send the next request when their stream ends. Modes, each in a fresh Ray
instance of its own (a subprocess, so each starts from the same state):

- `local`: `Client.local` in the driver (the driver is the caller);
- `http1`, `http2`: the Serve app with 1 or 2 ingress replicas, streamed over
  `POST /v1/orchestrate` by 64 keep-alive connections of a light client in the driver
  (raw HTTP/1.1 framing, so that the load generator's own CPU stays small), on the
  HTTP path `chorus serve` runs (HAProxy, replicas serving HTTP themselves:
  `orchestration/serve_env.py`); `--serve-proxy` runs them behind Ray Serve's default
  Python proxy instead.

Every Ray process's CPU time (utime + stime from /proc) is read before and after the
measured window and divided by the requests completed in it, per role: `driver`,
`proxy`, `ingress`, `controller`, `executor`, `router`, `expert`, `haproxy`, and the
rest of Ray (`ray-system`: raylet, GCS, Serve's controller, ...). Saves JSON under
bench/results/ (see docs/token-path.md for measured figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench_stack import closed_loop  # the same closed loop as the stack bench

ROOT = Path(__file__).resolve().parent.parent
TOKENS, TOKEN_S, CLIENTS = 64, 0.005, 64
TICK = os.sysconf("SC_CLK_TCK")


def team_config(replicas: int = 1) -> dict[str, Any]:
    """One mock expert, bounds far above the load: the path, not the policy, is measured."""
    return {
        "experts": [{"name": "general", "max_concurrency": 2 * CLIENTS,
                     "mock": {"ttft_s": 0.0, "token_latency_s": TOKEN_S, "tokens": TOKENS}}],
        "router": {"primary": "general",
                   "thresholds": {"parallel_limited": 10_000, "serial": 10_000,
                                  "drop_normal_experts": 10_000}},
        "executor": {"max_in_flight": 2 * CLIENTS, "max_queue": 8 * CLIENTS},
        "server": {"ingress": {"replicas": replicas}},
    }


# ---------------------------------------------------------------------- CPU by role


def _role(cmdline: str) -> str | None:
    title = cmdline.split("\0")[0]
    if title.startswith("ray::"):
        name = title[5:]
        for prefix, role in (("ServeReplica:", "ingress"), ("ProxyActor", "proxy"),
                             ("TeamController", "controller"), ("ExecutorActor", "executor"),
                             ("RouterActor", "router"), ("ExpertActor", "expert")):
            if name.startswith(prefix):
                return role
        return "ray-system"
    if "haproxy" in title.rsplit("/", 1)[-1]:
        return "haproxy"
    if any(part in cmdline for part in ("raylet", "gcs_server", "ray/dashboard",
                                        "ray/_private", "log_monitor", "monitor.py")):
        return "ray-system"
    return None


def cpu_by_pid() -> dict[int, tuple[str, float]]:
    """Every Ray process and the driver: pid -> (role, CPU seconds so far)."""
    me = os.getpid()
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        role = "driver" if pid == me else _role(cmdline)
        if role is None:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[pid] = (role, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def cpu_ms_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                       requests: int) -> dict[str, float]:
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used = seconds - before.get(pid, (role, 0.0))[1]
        roles[role] = roles.get(role, 0.0) + used
    return {role: round(1000 * used / max(requests, 1), 2) for role, used in sorted(roles.items())}


# ---------------------------------------------------------------------- load


async def measure(one: Any, seconds: float, warmup_s: float) -> dict[str, Any]:
    await closed_loop(one, warmup_s, CLIENTS)
    before = cpu_by_pid()
    done, elapsed = await closed_loop(one, seconds, CLIENTS)
    after = cpu_by_pid()
    return {"requests": done, "seconds": round(elapsed, 2), "rps": round(done / elapsed, 1),
            "cpu_ms_per_request": cpu_ms_per_request(before, after, done)}


async def run_local(seconds: float, warmup_s: float) -> dict[str, Any]:
    from orchestration.client import Client
    from orchestration.config import parse_config

    data = team_config()
    data.pop("server")
    async with Client.local(parse_config(data)) as client:
        async def one() -> None:
            async for event in client.stream("bench", experts=[]):
                last = event
            assert last.type == "done", last

        return await measure(one, seconds, warmup_s)


def _deploy(replicas: int, port: int, workdir: Path) -> str:
    import yaml
    from ray import serve

    import serve_app
    from orchestration.config import ServerConfig

    data = team_config(replicas)
    if "ingress" not in ServerConfig.model_fields:  # the code before `server.ingress`
        data["server"].pop("ingress")
    path = workdir / f"bench-http-{replicas}.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve_app.build_app({"config": str(path)})
    if "ingress" not in ServerConfig.model_fields:
        app = serve_app.ChorusIngress.options(num_replicas=replicas).bind(str(path))
    serve.run(app, name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


class RawClient:
    """A light HTTP/1.1 client on a keep-alive socket: the load generator should cost
    the driver little CPU, so what is measured is the server. (The tests use real
    client libraries; here only the framing is read: status, chunks, the last event.)"""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: bytes) -> bytes:
        request = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(),
                                                      len(body), body))
        for fresh in (False, True):
            if self.writer is None or fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            self.writer.write(request)
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                if fresh:  # a new connection that closed: a real failure
                    raise
                # The server closed the idle keep-alive connection: open another.
        status = int(head.split(b" ", 2)[1])
        assert status == 200, head
        assert b"chunked" in head.lower(), head
        tail = b""
        while True:  # chunked body: size line, data, CRLF; a 0-size chunk ends it
            size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return tail
            tail = (tail + data[:-2])[-4096:]


async def run_http(replicas: int, seconds: float, warmup_s: float, port: int,
                   workdir: Path) -> dict[str, Any]:
    url = _deploy(replicas, port, workdir)
    body = json.dumps({"prompt": "bench", "experts": []}).encode()
    clients = [RawClient("127.0.0.1", port) for _ in range(CLIENTS)]
    free = list(clients)

    async def one() -> None:
        client = free.pop()
        try:
            tail = await client.post_stream("/v1/orchestrate", body)
        finally:
            free.append(client)
        assert b"event: done" in tail, tail[-300:]

    assert url
    return await measure(one, seconds, warmup_s)


def one_mode(args: argparse.Namespace) -> dict[str, Any]:
    if not args.serve_proxy:  # before Ray starts: Serve reads it in its own processes
        from orchestration.serve_env import serve_env

        os.environ.update(serve_env())
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        if args.mode == "local":
            return asyncio.run(run_local(args.seconds, args.warmup))
        replicas = int(args.mode.removeprefix("http"))
        return asyncio.run(run_http(replicas, args.seconds, args.warmup, args.port,
                                    Path(args.workdir)))
    finally:
        ray.shutdown()


def main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"workload": {"tokens": TOKENS, "token_s": TOKEN_S,
                                           "clients": CLIENTS, "seconds": args.seconds},
                              "http_path": "serve-proxy" if args.serve_proxy else "haproxy",
                              "machine": {"cpus": os.cpu_count()}, "modes": {}}
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        target = out / f"bench-http-{mode}.json"
        command = [sys.executable, __file__, "--one", mode, "--seconds", str(args.seconds),
                   "--warmup", str(args.warmup), "--port", str(args.port),
                   "--workdir", str(out), "--json", str(target),
                   *(["--serve-proxy"] if args.serve_proxy else [])]
        subprocess.run(command, check=True, cwd=ROOT)
        row = json.loads(target.read_text())
        report["modes"][mode] = row
        cpu = ", ".join(f"{role} {ms:g}" for role, ms in row["cpu_ms_per_request"].items())
        print(f"{mode:>6}: {row['rps']:6.1f} req/s ({row['requests']} in {row['seconds']} s); "
              f"CPU-ms per request: {cpu}", flush=True)
    modes = report["modes"]
    if "local" in modes:
        for mode in ("http1", "http2"):
            if mode in modes:
                ratio = modes[mode]["rps"] / modes["local"]["rps"]
                report[f"{mode}_vs_local"] = round(ratio, 3)
                print(f"{mode} / local req/s: {ratio:.2f}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["local", "http1", "http2"],
                        choices=["local", "http1", "http2"])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--workdir", default="/tmp/chorus-bench-http")
    parser.add_argument("--serve-proxy", action="store_true",
                        help="HTTP through Ray Serve's Python proxy, not HAProxy")
    parser.add_argument("--out", default="bench/results/http.json")
    parser.add_argument("--one", dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.mode:
        sys.path.insert(0, str(ROOT))
        Path(options.json).write_text(json.dumps(one_mode(options)))
    else:
        result = main(options)
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(result, indent=2))
        print(f"saved {options.out}")
