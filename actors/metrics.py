"""Metrics: Prometheus series exported through Ray's metrics agent (`ray.util.metrics`)."""

from __future__ import annotations

from functools import cache

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


class Metrics:
    """Every series Chorus exports, created once per process."""

    def __init__(self) -> None:
        self.requests = Counter(
            "chorus_requests_total", "Requests by route and outcome.", tag_keys=("route", "outcome")
        )
        self.tasks = Counter(
            "chorus_task_outcomes_total", "Task results by expert and status.",
            tag_keys=("expert", "status"),
        )
        self.retries = Counter("chorus_retries_total", "Task retries.", tag_keys=("expert",))
        self.hedges = Counter(
            "chorus_hedges_total", "Hedges of a slow first token by outcome (won: the hedge "
            "answered first, lost: the first attempt did).", tag_keys=("expert", "outcome"))
        self.queue_depth = Gauge("chorus_queue_depth", "Tasks accepted and not yet dispatched.")
        self.in_flight = Gauge("chorus_in_flight", "Outstanding expert ObjectRefs.")
        self.ttft = Histogram(
            "chorus_ttft_seconds", "Time to the first primary token.",
            boundaries=_LATENCY_BUCKETS, tag_keys=("route",),
        )
        self.actor_state = Gauge(
            "chorus_actor_state", "1 for the state each supervised actor is in, else 0.",
            tag_keys=("actor", "role", "state"))
        self.recreations = Counter(
            "chorus_actor_recreations_total", "Actors Chorus re-created after Ray gave up.",
            tag_keys=("actor",))
        self.replicas = Gauge(
            "chorus_replicas", "Replicas per expert by state (ready, starting, draining).",
            tag_keys=("expert", "state"))
        self.replica_in_flight = Gauge(
            "chorus_replica_in_flight", "Tasks in flight on each replica.",
            tag_keys=("expert", "replica"))
        self.scaling = Counter(
            "chorus_scaling_decisions_total",
            "Scaling changes: up, down, removed (drained), gave_up (not placed in time).",
            tag_keys=("expert", "direction"))
        self.tenant_requests = Counter(
            "chorus_tenant_requests_total", "Requests admitted, by tenant and primary expert.",
            tag_keys=("tenant", "expert"))
        self.tenant_tokens = Counter(
            "chorus_tenant_tokens_total", "Tokens the engines counted, by tenant, expert and "
            "kind (in: prompt, out: completion).", tag_keys=("tenant", "expert", "kind"))
        self.tenant_refusals = Counter(
            "chorus_tenant_refusals_total", "Requests refused, by tenant, primary expert and "
            "reason (requests_per_minute, tokens_per_minute, queue_full).",
            tag_keys=("tenant", "expert", "reason"))
        self.tenant_queue = Histogram(
            "chorus_tenant_queue_seconds", "Time a task waited for an expert's slot, by tenant.",
            boundaries=_LATENCY_BUCKETS, tag_keys=("tenant", "expert"))
        self.latency = Histogram(
            "chorus_request_latency_seconds", "Request latency, accepted to terminal event.",
            boundaries=_LATENCY_BUCKETS, tag_keys=("route",),
        )


@cache
def metrics() -> Metrics:
    return Metrics()
