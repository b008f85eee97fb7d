"""The one place where Ray's exceptions become Chorus's.

Everything above this module (the task runner, the pipeline, the HTTP layer) sees
only `orchestration.errors`. The translation, by what Ray raised:

    RayTaskError whose cause is a ChorusError ... that ChorusError (raised on purpose
                                                   in a remote method, e.g. bad input)
    RayTaskError with any other cause ........... EngineError from an expert (worth a
                                                   retry), InternalError elsewhere
    ray.exceptions.TaskCancelledError ........... TaskCancelledError: the call was
                                                   cancelled (a deadline we enforce, or
                                                   Ray cancelling the children of a
                                                   cancelled request). Never retried.
    RayActorError (ActorDiedError: the process died, restarting or for good;
      ActorUnavailableError: unreachable for now)
                                   from an expert ... ExpertUnavailableError (retried)
                                   from the router or the executor
                                                  ... ServiceUnavailableError (503,
                                                   the caller may retry shortly)
    a ChorusError raised locally ................ unchanged

The Chorus side of the tree is drawn in `orchestration/errors.py`.
"""

from __future__ import annotations

import ray.exceptions as rex

from orchestration.errors import (
    ChorusError,
    EngineError,
    ExpertUnavailableError,
    InternalError,
    ServiceUnavailableError,
    TaskCancelledError,
)


def translate(exc: BaseException, *, expert: str | None = None, actor: str = "") -> ChorusError:
    """Ours for what Ray raised from a call to `expert` (or to the control actor `actor`)."""
    # First: Ray re-raises a remote ChorusError as `RayTaskError(ThatError)`, an instance
    # of both; ours is its `cause`, with every attribute it had (e.g. `generated`).
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        if isinstance(cause, ChorusError):
            return cause
        if isinstance(cause, rex.TaskCancelledError):
            return TaskCancelledError(f"{expert or actor}: call cancelled")
        what = f"{type(cause).__name__}: {cause}"
        if expert is not None:
            return EngineError(f"{expert}: {what}")
        return InternalError(f"{actor or 'chorus'} failed: {what}")
    if isinstance(exc, ChorusError):
        return exc
    if isinstance(exc, rex.TaskCancelledError):
        return TaskCancelledError(f"{expert or actor}: call cancelled")
    if isinstance(exc, rex.RayActorError):
        if expert is not None:
            return ExpertUnavailableError(f"{expert}: expert process died or is restarting")
        return ServiceUnavailableError(
            f"the Chorus {actor or 'service'} is down or restarting; retry shortly")
    if expert is not None:
        return EngineError(f"{expert}: {type(exc).__name__}: {exc}")
    return InternalError(f"{actor or 'chorus'} failed: {type(exc).__name__}: {exc}")


def cause_of(exc: BaseException) -> str:
    """What really failed inside a remote call, in one line (`OSError: no such model`)."""
    cause = exc.cause if isinstance(exc, rex.RayTaskError) else exc
    if isinstance(cause, ChorusError):
        return cause.message
    return f"{type(cause).__name__}: {cause}".splitlines()[0]
