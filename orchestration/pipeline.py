"""Pipeline: the executor's raw events in, the caller's events out (guarded, fused, final).

Shared by the Serve ingress and `Client.local`, so HTTP and Python callers see the same
sequence: plan, primary deltas, expert results, fusion, then exactly one done or error.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from orchestration.config import ChorusConfig
from orchestration.models import (
    DoneEvent,
    ErrorEvent,
    ExpertEvent,
    ExpertTask,
    FusionEvent,
    PlanEvent,
    PrimaryDelta,
    TaskResult,
)

Synthesize = Callable[[ExpertTask], AsyncIterator[Any]]


def primary_failure(request_id: str, primary: TaskResult) -> ErrorEvent:
    """A clear terminal error for a primary that failed for good."""
    served = " -> ".join(primary.served_by) or primary.expert
    return ErrorEvent(
        request_id=request_id,
        code=f"primary_{primary.status.value}",
        message=(
            f"primary expert {primary.expert!r} failed with status {primary.status.value} "
            f"after {primary.attempts} attempt(s) on {served}: {primary.error}"
        ),
        status=504 if primary.status.value == "timeout" else 502,
    )


async def finish_stream(
    first: PlanEvent,
    events: AsyncIterator[Any],
    config: ChorusConfig,
    synthesize: Synthesize | None = None,
) -> AsyncIterator[Any]:
    """Guard every text that leaves, fuse at the end, and close with done or error."""
    started = time.monotonic()
    first_delta_at: float | None = None
    yield first
    async for event in events:
        if isinstance(event, PrimaryDelta):
            first_delta_at = first_delta_at or time.monotonic()
            yield event
        elif isinstance(event, ExpertEvent):
            yield event
        elif isinstance(event, DoneEvent):
            assert event.primary is not None
            if not event.primary.ok:
                yield primary_failure(first.request_id, event.primary)
                return
            content = event.primary.result or ""
            yield FusionEvent(request_id=first.request_id, strategy="primary", content=content,
                              failed=[r for r in event.experts if not r.ok])
            timings = {"total_s": time.monotonic() - started}
            if first_delta_at is not None:
                timings["ttft_s"] = first_delta_at - started
            yield event.model_copy(update={"content": content, "timings": timings})
            return
        else:
            yield event
