"""How a Serve instance with Chorus apps stops: drain first, then close the port.

`drain_apps` drains the teams of the given apps and waits until their ingress replicas
have nothing in flight (`chorus serve` calls it when it is told to stop). In the
`serve run` process, `drain_on_signals` makes SIGTERM and SIGINT do the same before
`serve run` stops Serve (docs/operations.md, "Stopping").
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ray import serve

from actors.team import controller_name
from orchestration.config import ChorusConfig

logger = logging.getLogger("ray.serve")
# What the configs built in this process say: where their teams live, how long to drain.
_BUILT: dict[str, Any] = {"namespaces": set(), "drain_s": 30.0}


def built(config: ChorusConfig) -> None:
    """A config was built into an app in this process (`serve_app.build_app`)."""
    _BUILT["namespaces"].add(config.server.namespace)
    _BUILT["drain_s"] = config.server.drain_s


def drain_apps(apps: list[str] | None = None, timeout_s: float | None = None) -> None:
    """Drain the Chorus teams of these apps (default: every app of this Serve instance)
    and wait (at most `timeout_s`, default the `server.drain_s` of the config last built
    here) until their ingress replicas have no request in flight: `/readyz` says 503,
    new requests get 503 JSON, streams finish."""
    import ray

    teams = []
    for app in apps if apps is not None else list(serve.status().applications):
        for namespace in _BUILT["namespaces"]:
            try:
                controller = ray.get_actor(controller_name(f"chorus-{app}"), namespace=namespace)
            except ValueError:
                continue  # not a Chorus app, or its team is gone
            ray.get(controller.drain.remote())
            teams.append(controller)
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else _BUILT["drain_s"])
    # Ingress replicas report every 0.5 s: wait for a report that says nothing is left.
    while teams and time.monotonic() < deadline:
        time.sleep(0.6)
        teams = [c for c in teams if ray.get(c.in_flight.remote()) > 0]


def drain_on_signals() -> None:
    """In the `serve run` process: SIGTERM and SIGINT drain every Chorus team first,
    then stop Serve the way `serve run` does on Ctrl-C (a second signal stops at once).

    `serve run` imports this module before it starts Ray, and Ray's start installs a
    SIGTERM handler of its own that ends the process at once: the handlers are set
    right after `ray.init`, and now too if Ray already runs."""
    import ray

    if ray.is_initialized():
        _install_drain_handlers()
        return
    start = ray.init

    def init(*args: Any, **kwargs: Any) -> Any:
        ray.init = start
        context = start(*args, **kwargs)
        _install_drain_handlers()
        return context

    ray.init = init


def _install_drain_handlers() -> None:
    """SIGTERM and SIGINT: drain, then KeyboardInterrupt (`serve run` then stops Serve)."""

    def stop(signum: int, _frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.default_int_handler)
        try:
            drain_apps()
        except Exception:  # noqa: BLE001 - draining is best effort; stopping is not
            logger.exception("draining before the stop failed")
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def in_serve_run() -> bool:
    """Is this the `serve run` CLI's process, in its main thread?"""
    import threading

    return (Path(sys.argv[0]).name == "serve" and sys.argv[1:2] == ["run"]
            and threading.current_thread() is threading.main_thread())


