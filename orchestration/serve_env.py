"""The environment Chorus runs Ray Serve with: HAProxy in front, HTTP served by replicas.

Ray Serve 2.60's high-throughput mode (docs.ray.io, "Enable high throughput"): an
HAProxy ingress on each node instead of the Python proxy actor, and each ingress
replica serving HTTP itself ("direct ingress"), so a streamed chunk is written by the
replica's own HTTP server instead of travelling to a proxy as a Ray object. Measured
with `make bench-http` (docs/token-path.md). Serve reads these variables when its
processes start, so they must be set before Ray starts: `chorus serve` sets them for
the Ray instance it starts; a cluster sets them on `ray start` (cluster.yaml).
"""

from __future__ import annotations


def serve_env() -> dict[str, str]:
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # The replica's HTTP server and Chorus's code on one event loop, not two threads
        # handing every ASGI message across (measured: the GIL ping-pong was a third of
        # the ingress's CPU). Chorus's request path never blocks its loop.
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        # A stopping ingress replica stays reachable this long (default 30 s) so that load
        # balancers deregister it. HAProxy here learns of a stop from Serve's controller
        # within a broadcast (0.1 s); the replica's own requests are waited for anyway
        # (`graceful_shutdown_timeout_s` = `server.drain_s`).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        # Request headers up to 64 KB reach Chorus, which refuses what is too long with a
        # 4xx naming the header (HAProxy's default 16 KB buffer answers its own 400).
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "65536",
    }
