"""`chorus serve`: deploy the Serve app, wait until it runs, and fail clearly if it cannot.

`serve run` keeps a failed deploy's tracebacks and exits 0 (Ray Serve's CLI ends every
failure with a bare `sys.exit()`), so scripts and CI cannot tell. This command checks
that the cluster could hold the team before deploying, deploys, and on failure prints
one short message naming each expert and what is missing, with exit status 2 (the
cluster cannot hold the team) or 1 (the deploy failed).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading

from orchestration.capacity import placement_problems
from orchestration.config import load_config
from orchestration.errors import ConfigError
from orchestration.serve_env import serve_env

# The first line of a Chorus error inside Serve's deploy-failure message.
_CHORUS_ERROR = re.compile(
    r"\b(PlacementError|NoHealthyExpertError|ConfigError|RouterModelError|ChorusError): (.+)")


def failure_line(message: str) -> str:
    """The Chorus error a failed deploy carries, in one line (else Serve's last line)."""
    found = _CHORUS_ERROR.findall(message)
    if found:
        return found[-1][1].strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "the application failed to deploy"


def serve_and_wait(config_path: str | None, *, name: str, host: str, port: int,
                   address: str | None, check_placement: bool = True) -> int:
    """Deploy, then block until interrupted; non-zero with one message if it cannot run."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"chorus: {exc.message}", file=sys.stderr)
        return 2
    if address is None:  # a Ray instance this command starts: Serve's high-throughput mode
        for key, value in serve_env().items():
            os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from actors.placement import live_nodes
    from actors.stopping import drain_apps
    from serve_app import build_app

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    if check_placement and (problems := placement_problems(config, live_nodes())):
        print("chorus: this cluster cannot hold the team:\n"
              + "\n".join(f"  - {p}" for p in problems)
              + "\n(start GPU nodes, or `--skip-placement-check` when an autoscaler will)",
              file=sys.stderr)
        return 2
    stop = threading.Event()  # set by SIGINT/SIGTERM, even while the deploy is under way
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ours = not _serve_running()  # shut Serve down at the end only if we started it
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app({"config": config_path or ""}), name=name, route_prefix="/")
    except RuntimeError as exc:  # Serve: "Deploying application ... failed: <message>"
        # The app's message only says which deployment failed; the deployment's says why.
        status = serve.status().applications.get(name)
        details = [d.message for d in status.deployments.values()] if status else []
        print(f"chorus: the team did not start: {failure_line(chr(10).join([str(exc), *details]))}",
              file=sys.stderr)
        serve.delete(name)
        if ours:
            serve.shutdown()
        return 1
    where = (f"http://{host}:{port}" if ours else
             "the proxy of the Serve instance already running on this cluster (see `serve status`)")
    print(f"chorus: serving {', '.join(config.expert_names)} on {where}", flush=True)
    stop.wait()
    # First the drain: /readyz says 503 and new requests get 503 JSON while the streams
    # in flight finish (at most server.drain_s); only then does the port close.
    drain_apps([name], config.server.drain_s)
    if ours:
        serve.shutdown()  # closes the port and deletes the app, whose team goes with it
    else:
        serve.delete(name)  # a shared Serve: only this app (and its team) goes
    return 0


def _serve_running() -> bool:
    import ray

    return any(a["name"] == "SERVE_CONTROLLER_ACTOR"
               for a in ray.util.list_named_actors(all_namespaces=True))
