"""`chorus`: a terminal client for a Chorus server (HTTP + SSE, no Ray).

Three layers, each testable alone: `iter_sse` parses Server-Sent Events lines,
`Renderer` / `JsonRenderer` turn events into terminal text, and the `cmd_*` functions
make the HTTP calls. Exit codes: 0 ok, 1 error event or broken stream, 2 HTTP error or
usage, 3 server unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import httpx

from orchestration.capacity import placement_problems

DEFAULT_URL = "http://127.0.0.1:8000"
STATUS_COLOURS = {"success": "32", "error": "31", "timeout": "33", "cancelled": "2",
                  "budget": "33"}


def _sse_event(event: str, data: list[str]) -> tuple[str, dict[str, Any]] | None:
    payload = "\n".join(data)
    if not data or payload.strip() == "[DONE]":
        return None
    obj = json.loads(payload)
    obj = obj if isinstance(obj, dict) else {"value": obj}
    return event or str(obj.get("type", "message")), obj


def iter_sse(lines: Iterable[str | bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(event_type, data)` per SSE event; lines come with or without their EOL."""
    event, data = "", []
    for raw in lines:
        line = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).rstrip("\r\n")
        if not line:  # a blank line ends the event
            if parsed := _sse_event(event, data):
                yield parsed
            event, data = "", []
        elif not line.startswith(":"):  # ":" starts a comment (keepalive)
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if parsed := _sse_event(event, data):  # stream closed without the final blank line
        yield parsed


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


class Renderer:
    """Turns orchestration events into a readable terminal transcript."""

    def __init__(self, out: TextIO, *, colour: bool = False, err: TextIO | None = None) -> None:
        self.out, self.err, self.colour = out, err or sys.stderr, colour
        self.exit_code: int | None = None  # set by a terminal event
        self.primary_text = ""
        self._primary_key: tuple[str, int] | None = None
        self._pending: list[dict[str, Any]] = []
        self._experts_shown = False
        self._fusion_streamed = False
        self._line_open = self._written = False

    def _c(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._line_open, self._written = not text.endswith("\n"), True

    def _end_line(self) -> None:
        if self._line_open:
            self._write("\n")

    def _line(self, text: str = "") -> None:
        self._end_line()
        self._write(text + "\n")

    def _header(self, title: str) -> None:
        if self._written:
            self._line()
        self._line(self._c(f"── {title} ──", "1;36"))

    def _status(self, status: str) -> str:
        return self._c(status, STATUS_COLOURS.get(status, "0"))

    def handle(self, event_type: str, data: dict[str, Any]) -> None:
        getattr(self, f"_on_{event_type}", self._on_unknown)(data)

    def _on_unknown(self, data: dict[str, Any]) -> None:
        pass  # forward compatible: newer servers may add event types

    def _on_plan(self, data: dict[str, Any]) -> None:
        plan = data.get("plan", {})
        experts = ", ".join(e.get("expert", "?") for e in plan.get("experts", [])) or "none"
        primary = plan.get("primary", {}).get("expert", "?")
        self._line(self._c(f"plan {plan.get('id', '?')}", "1") + f" · {plan.get('strategy')}"
                   f" · primary {primary} · experts {experts}")
        if plan.get("reason"):
            self._line(self._c(f"  reason: {plan['reason']}", "2"))

    def _on_primary(self, data: dict[str, Any]) -> None:
        key = (str(data.get("expert", "?")), int(data.get("attempt", 1)))
        if self._primary_key is None:
            self._header(f"{key[0]} (primary)")
        elif key != self._primary_key:  # a retry or a fallback continues the answer:
            # said on stderr, so the transcript's answer stays one text
            self.err.write(self._c(f"[continued: attempt {key[1]} on {key[0]}]", "33") + "\n")
        self._primary_key = key
        self.primary_text += data.get("delta", "")
        self._write(data.get("delta", ""))

    def _on_expert(self, data: dict[str, Any]) -> None:
        self._pending.append(data.get("result", {}))

    def _flush_experts(self) -> None:
        if self._pending and not self._experts_shown:
            self._header("Experts")
            self._experts_shown = True
        for r in self._pending:
            attempts = r.get("attempts", 0)
            self._line(f"● {self._c(r.get('expert', '?'), '1')}  {self._status(r.get('status', '?'))}"
                       f" · {attempts} attempt{'s' if attempts != 1 else ''}"
                       f" · {float(r.get('latency_s') or 0):.2f}s")
            body = r.get("result") if r.get("status") == "success" else f"error: {r.get('error')}"
            for text in (body or "").strip().splitlines() or ["(empty)"]:
                self._line(f"  {text}")
        self._pending.clear()

    def _on_fusion_delta(self, data: dict[str, Any]) -> None:
        if not self._fusion_streamed:
            self._flush_experts()
            self._header("Fused answer")
            self._fusion_streamed = True
        self._write(data.get("delta", ""))

    def _on_fusion(self, data: dict[str, Any]) -> None:
        self._flush_experts()
        content = str(data.get("content", ""))
        self._end_line()
        if not self._fusion_streamed:
            self._header(f"Fused answer ({data.get('strategy', '?')})")
            if self.primary_text and content.strip() == self.primary_text.strip():
                self._line(self._c("(same as the primary answer above)", "2"))
            else:
                self._line(content.rstrip())
        if data.get("failed"):
            self._line()
            self._line(self._c("Failed experts:", "1;31"))
            for r in data["failed"]:
                reason = " ".join(str(r.get("error") or "no reason given").split())
                self._line(f"  ✗ {r.get('expert', '?')}  {self._status(r.get('status', '?'))}"
                           f" ({r.get('attempts', 0)} attempts): {reason}")

    def _on_done(self, data: dict[str, Any]) -> None:
        self._flush_experts()
        timings = data.get("timings", {})
        parts = [f"done {data.get('request_id', '?')}", f"total {timings.get('total_s', 0):.2f}s"]
        if "ttft_s" in timings:
            parts.append(f"ttft {timings['ttft_s']:.2f}s")
        self._line()
        self._line(self._c(" · ".join(parts), "32"))
        self.exit_code = 0

    def _on_error(self, data: dict[str, Any]) -> None:
        self._flush_experts()
        self._line()
        print(f"error {data.get('status', '?')} {data.get('code', 'error')}: "
              f"{data.get('message', '')}", file=self.err, flush=True)
        self.exit_code = 1


class JsonRenderer(Renderer):
    """Prints each event as one JSON line (`--json`)."""

    def handle(self, event_type: str, data: dict[str, Any]) -> None:
        self._write(json.dumps({"type": event_type, **data}) + "\n")
        if event_type in ("done", "error"):
            self.exit_code = 0 if event_type == "done" else 1


class CliError(Exception):
    """A failure that ends the command with a message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers,
                        timeout=httpx.Timeout(30.0, read=args.read_timeout))


def _check(response: httpx.Response) -> None:
    """Raise `CliError` (exit 2) for a 4xx/5xx, with the server's error JSON."""
    if response.status_code < 400:
        return
    response.read()
    try:
        err = response.json().get("error", {})
        code, message = err.get("code") or err.get("type") or "error", err.get("message", "")
    except (ValueError, AttributeError):
        code, message = "error", response.text.strip()
    text = f"error {response.status_code} {code}: {message}"
    if response.status_code == 429 and "retry-after" in response.headers:
        text += f"\nRetry-After: {response.headers['retry-after']}"
    raise CliError(text, 2)


def cmd_ask(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"prompt": args.prompt, "stream": True, "priority": args.priority}
    optional = {"experts": args.expert, "primary": args.primary, "strategy": args.strategy,
                "timeout_s": args.timeout, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "budget_s": args.budget,
                "min_experts": args.min_experts}
    body.update({k: v for k, v in optional.items() if v is not None})
    kind = JsonRenderer if args.json else Renderer
    renderer = kind(sys.stdout, colour=use_colour(sys.stdout))
    with _client(args) as client, client.stream(
        "POST", "/v1/orchestrate", json=body, headers={"Accept": "text/event-stream"}
    ) as response:
        _check(response)
        for event_type, data in iter_sse(response.iter_lines()):
            renderer.handle(event_type, data)
            if renderer.exit_code is not None:
                return renderer.exit_code
    raise CliError("error: the stream ended without a done or error event", 1)


def _get(args: argparse.Namespace, path: str) -> Any:
    with _client(args) as client:
        response = client.get(path)
        _check(response)
        return response.json()


def cmd_stats(args: argparse.Namespace) -> int:
    print(json.dumps(_get(args, "/v1/stats"), indent=2))
    return 0


USAGE_COLUMNS = ("tenant", "requests", "refused", "tokens in", "tokens out", "in flight",
                 "waiting", "left (req/tok)")


def usage_rows(tenants: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per tenant of `/v1/stats`'s `tenants`: what it used and has left."""
    rows = []
    for name, t in sorted(tenants.items()):
        left = t.get("remaining", {})
        rows.append((name, str(t.get("requests", 0)), str(sum(t.get("refused", {}).values())),
                     str(t.get("tokens", {}).get("in", 0)), str(t.get("tokens", {}).get("out", 0)),
                     str(t.get("in_flight", 0)), str(t.get("waiting", 0)),
                     f"{left.get('requests', '-')}/{left.get('tokens', '-')}"))
    return rows


def cmd_usage(args: argparse.Namespace) -> int:
    rows = [USAGE_COLUMNS, *usage_rows(_get(args, "/v1/stats").get("tenants", {}))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(USAGE_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for model in _get(args, "/v1/models").get("data", []):
        print(model.get("id"))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from orchestration.config import load_config
    from orchestration.errors import ConfigError

    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    low = sum(e.resources.num_gpus * e.replicas.min for e in config.experts)
    high = sum(e.resources.num_gpus * e.replicas.max for e in config.experts)
    gpus = f"{low:g} GPUs" if low == high else f"{low:g} to {high:g} GPUs (replicas min to max)"
    print(f"ok: {len(config.experts)} experts ({', '.join(config.expert_names)}), "
          f"{gpus}, primary {config.router.primary}, fusion {config.fusion.strategy}")
    where, nodes = _visible_nodes(args.address)
    for problem in placement_problems(config, nodes):
        print(f"warning: {where} could not hold the team: {problem}", file=sys.stderr)
    return 0


def _visible_nodes(address: str | None) -> tuple[str, list[dict[str, float]]]:
    """The nodes of the Ray cluster at `address`, else this machine as one node."""
    if address:
        import ray

        from actors.placement import live_nodes

        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return f"the cluster at {address}", live_nodes()
    gpus = 0
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    cpus = os.cpu_count() or 1
    return (f"this machine ({cpus} CPUs, {gpus} GPUs)", [{"CPU": float(cpus), "GPU": float(gpus)}])


def cmd_serve(args: argparse.Namespace) -> int:
    from actors.launch import serve_and_wait

    return serve_and_wait(args.config, name=args.name, host=args.host, port=args.port,
                          address=args.address, check_placement=not args.skip_placement_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="Ask a team of LLM experts.")
    parser.add_argument("--url", default=os.environ.get("CHORUS_URL", DEFAULT_URL),
                        help=f"server URL (env CHORUS_URL, default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("CHORUS_API_KEY"),
                        help="API key sent as a bearer token (env CHORUS_API_KEY)")
    parser.add_argument("--read-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = sub.add_parser("ask", help="stream one orchestrated answer")
    ask.add_argument("prompt")
    ask.add_argument("--expert", action="append", help="expert to consult (repeatable)")
    ask.add_argument("--primary", help="expert that answers first and streams")
    ask.add_argument("--strategy", choices=["SERIAL", "PARALLEL_LIMITED", "PARALLEL_FULL"])
    ask.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--timeout", type=float, help="per-task timeout in seconds")
    ask.add_argument("--budget", type=float, help="latency budget of the whole answer (s)")
    ask.add_argument("--min-experts", type=int, help="fuse once this many specialists answered")
    ask.add_argument("--json", action="store_true", help="one JSON line per event")
    ask.set_defaults(func=cmd_ask)
    sub.add_parser("stats", help="executor and per-expert stats").set_defaults(func=cmd_stats)
    sub.add_parser("models", help="list model ids").set_defaults(func=cmd_models)
    sub.add_parser("usage", help="usage and limits left, per tenant").set_defaults(func=cmd_usage)
    check = sub.add_parser("check-config", help="validate a config file (no server needed)")
    check.add_argument("path", nargs="?", help="default: $CHORUS_CONFIG or config/mock.yaml")
    check.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="also check placement on this Ray cluster (default: this machine)")
    check.set_defaults(func=cmd_check_config)
    serve = sub.add_parser("serve", help="deploy the team, wait until it runs (non-zero if not)")
    serve.add_argument("config", nargs="?", help="default: $CHORUS_CONFIG or config/mock.yaml")
    serve.add_argument("--name", default="default", help="Serve application name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="Ray cluster to deploy on (default: start or join a local one)")
    serve.add_argument("--skip-placement-check", action="store_true",
                       help="deploy even if the nodes up now cannot hold the team (autoscaling)")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("prepare-model", add_help=False,
                   help="convert the bundled tiny model (args go to orchestration.modelprep)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "prepare-model" in argv:
        cut = argv.index("prepare-model") + 1
        if parser.parse_args(argv[:cut]).command == "prepare-model":
            from orchestration.modelprep import main as prepare_main

            return prepare_main(argv[cut:])
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        print(f"chorus: cannot reach a Chorus server at {args.url} ({exc}).\n"
              "Start one with `serve run serve_app:app`, or point --url / CHORUS_URL at it.",
              file=sys.stderr)
        return 3
    except (httpx.HTTPError, ValueError) as exc:
        print(f"chorus: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
