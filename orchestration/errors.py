"""Errors Chorus raises on purpose, each with a stable code and the HTTP status it maps to.

They cross Ray boundaries (wrapped in `RayTaskError`, whose `.cause` is the original),
so they are plain picklable exceptions with simple constructor arguments. Ray's own
exceptions are translated into these in one place, `actors/boundary.py`.

    ChorusError (500 chorus_error)
    ├── ConfigError ................ invalid_config: a config file names a bad field
    ├── BadRequestError (422) ...... invalid_request: the caller's input; never retried
    │   ├── InvalidJSONError (400) . invalid_json: not JSON, not an object, too deep
    │   ├── BodyTooLargeError (413)  body_too_large
    │   ├── InvalidHeaderError (400) invalid_header: e.g. an oversized X-Request-ID
    │   ├── UnsupportedParameterError (400) unsupported_parameter: cannot be honoured
    │   └── UnknownExpertError (404) unknown_expert / unknown model
    ├── UnauthorizedError (401)
    ├── NotFoundError (404) ........ not_found: no such route
    ├── MethodNotAllowedError (405)  method_not_allowed
    ├── ForbiddenError (403) ....... forbidden: not for this tenant (priority_max)
    ├── QueueFullError (429) ....... queue_full: admission refused, Retry-After
    │   └── RateLimitedError ....... rate_limited: the tenant is over a per-minute limit
    ├── NoHealthyExpertError (503) . no expert could serve the request
    ├── RouterModelError (503) ..... router_model_unavailable: the embedding model failed
    ├── ServiceUnavailableError (503) unavailable: router/executor down or restarting
    │   └── ShuttingDownError (503) shutting_down: the server is draining (being stopped)
    ├── PlacementError (503) ....... placement_failed: the cluster cannot hold the team
    ├── InternalError (500) ........ internal_error: a bug; the message says where
    ├── TaskCancelledError (499) ... cancelled: the request (or the call) was cancelled
    ├── AnswerInterruptedError ..... answer_interrupted: an answer broke off after part of
    │                                it reached the caller, and it cannot be continued
    ├── DeadlineError .............. timeout: the task's deadline (its whole answer,
    │                                retries included) passed; nothing more is started
    └── TransientError ............. worth a retry (then a fallback)
        ├── EngineError ............ engine_error: the engine failed this attempt
        ├── TaskTimeoutError ....... timeout: an attempt's own limit
        │   └── StalledError ....... stalled: no first token in time, or no new token
        │                            for too long (never retried on that replica)
        └── ExpertUnavailableError . expert_unavailable: the expert's process is down
"""

from __future__ import annotations

from pydantic import ValidationError


class ChorusError(Exception):
    """Base: a failure we can name, with the field or resource it is about."""

    code = "chorus_error"
    status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self):  # keep `field` (and any attribute) across pickling (Ray re-raises remote errors)
        return (_rebuild, (type(self), self.message, self.field), dict(self.__dict__))

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "field": self.field}


def _rebuild(cls: type[ChorusError], message: str, field: str | None) -> ChorusError:
    return cls(message, field=field)


class ConfigError(ChorusError):
    code = "invalid_config"


class BadRequestError(ChorusError):
    """The caller's input is invalid; never retried."""

    code = "invalid_request"
    status = 422


class InvalidJSONError(BadRequestError):
    code = "invalid_json"
    status = 400


class BodyTooLargeError(BadRequestError):
    code = "body_too_large"
    status = 413


class InvalidHeaderError(BadRequestError):
    code = "invalid_header"
    status = 400


class UnauthorizedError(ChorusError):
    code = "unauthorized"
    status = 401


class NotFoundError(ChorusError):
    code = "not_found"
    status = 404


class MethodNotAllowedError(ChorusError):
    code = "method_not_allowed"
    status = 405


class ServiceUnavailableError(ChorusError):
    """A control actor (router, executor) is down or restarting: retry shortly."""

    code = "unavailable"
    status = 503


class ShuttingDownError(ServiceUnavailableError):
    """This server is draining (being stopped): its streams finish, new work goes elsewhere."""

    code = "shutting_down"


class InternalError(ChorusError):
    code = "internal_error"
    status = 500


class UnsupportedParameterError(BadRequestError):
    """A parameter Chorus cannot honour for this model: refused, never dropped."""

    code = "unsupported_parameter"
    status = 400


class UnknownExpertError(BadRequestError):
    code = "unknown_expert"
    status = 404


class QueueFullError(ChorusError):
    """Admission refused: the executor's queue is at `max_queue`."""

    code = "queue_full"
    status = 429


class RateLimitedError(QueueFullError):
    """A tenant is over its requests or tokens per minute; `headers` are its
    `x-ratelimit-*` and `retry_after_s` its `Retry-After` (orchestration/ledger.py)."""

    code = "rate_limited"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: int = 1,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class ForbiddenError(ChorusError):
    """The caller's tenant may not ask for this (e.g. a priority above its `priority_max`)."""

    code = "forbidden"
    status = 403


class NoHealthyExpertError(ChorusError):
    code = "no_healthy_expert"
    status = 503


class RouterModelError(ChorusError):
    """The router's embedding model cannot load (missing package, unreadable files)."""

    code = "router_model_unavailable"
    status = 503


class PlacementError(ChorusError):
    """The cluster cannot hold an actor (not enough GPUs or custom resources)."""

    code = "placement_failed"
    status = 503


# ------------------------------------------------------------ engine / task failures


class TransientError(ChorusError):
    """A failure worth retrying: engine error, timeout, expert restarting.

    `generated` is the text the failed attempt had generated when the expert knows it
    (an engine error, a stall): the next attempt continues from it. None when the
    process died with it (then the caller, if one reads the text live, says what it has).
    """

    code = "transient"
    generated: str | None = None


class EngineError(TransientError):
    code = "engine_error"


class TaskTimeoutError(TransientError):
    code = "timeout"


class StalledError(TaskTimeoutError):
    """An attempt sent no first token within `ttft_timeout_s`, or no new token for
    `stall_timeout_s`: its engine is stuck or overloaded, so the next attempt goes to
    another replica (or the fallback), never to the same one."""

    code = "stalled"


class DeadlineError(ChorusError):
    """The task's deadline (`timeout_s`: the whole answer, retries included) passed."""

    code = "timeout"
    status = 504


class ExpertUnavailableError(TransientError):
    """The expert's actor died or is restarting."""

    code = "expert_unavailable"


class AnswerInterruptedError(ChorusError):
    """Part of an answer reached the caller, then its attempt failed, and the answer cannot
    be continued (docs/failover.md): ends the task, no retry, no fallback."""

    code = "answer_interrupted"
    status = 502


class TaskCancelledError(ChorusError):
    """The request was cancelled (caller gone, or explicit cancel); never retried."""

    code = "cancelled"
    status = 499


class QuorumReachedError(TaskCancelledError):
    """A specialist cut because enough others answered (`min_experts`): not a failure
    of the expert, so fusion lists it in `failed` but not among the unavailable."""

    code = "quorum_reached"


class BudgetError(ChorusError):
    """The request's latency budget (`budget_s`) cut the task, or left no room for the
    attempt it would have started (docs/budget.md); never retried."""

    code = "budget"
    status = 504


# ------------------------------------------------------------ validation messages


class FieldError(ValueError):
    """A cross-field error that knows its own path (pydantic only knows the model's)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _union_tag(part: str) -> bool:
    """A segment pydantic adds for a union's member (`str`, `list[str]`, `NamedToolChoice`)."""
    return part in _TYPE_TAGS or "[" in part or part[:1].isupper() or part.startswith(
        ("function-", "literal", "tagged-union"))


def format_loc(loc: tuple[int | str, ...], drop_tags: bool = False, empty: str = "<root>") -> str:
    """A field path as pydantic's errors are written here: `messages[0].content`."""
    path = ""
    for part in loc:
        if drop_tags and isinstance(part, str) and _union_tag(part):
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or empty


def format_validation_error(error: ValidationError, prefix: str = "",
                            drop_tags: bool = False) -> str:
    """One line per problem, each starting with the field path (`experts[1].num_gpus`);
    `drop_tags` leaves out the segments pydantic adds for union members."""
    lines = []
    for item in error.errors():
        ctx_error = (item.get("ctx") or {}).get("error")
        if isinstance(ctx_error, FieldError):
            lines.append(f"{prefix}{ctx_error}")
            continue
        path = format_loc(tuple(item["loc"]), drop_tags)
        lines.append(f"{prefix}{path}: {item['msg']}")
    return "\n".join(lines)


def bad_request(error: ValidationError) -> BadRequestError:
    """A 422 whose message names every offending field and whose `field` is the first."""
    message = format_validation_error(error, drop_tags=True)
    return BadRequestError(message, field=message.split(":", 1)[0])
