"""Ray's actor table (GCS): what Ray says an actor is, read directly.

Ray's public state API (`ray.util.state`) needs the dashboard, which Chorus does not
require; the GCS table it reads is what `ray._private.state` returns directly.
"""

from __future__ import annotations

from ray.actor import ActorHandle


def ray_state(handle: ActorHandle) -> tuple[str, int]:
    """(state, restarts): ALIVE, RESTARTING, DEAD, PENDING_CREATION, ...; Ray's count
    of the actor's restarts."""
    from ray._private import state

    info = state.actors(actor_id=handle._actor_id.hex())
    return str(info.get("State", "UNKNOWN")), int(info.get("NumRestarts", 0))
