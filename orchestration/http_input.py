"""Request bodies and headers from strangers: bounded, decoded, every problem named.

`parse_body` turns raw bytes into a JSON object or raises a 4xx `ChorusError` naming
the problem, never anything else:

    larger than `max_bytes` ............................. 413 body_too_large
    not UTF-8, not JSON, not an object .................. 400 invalid_json  (<body>)
    nested deeper than `max_depth` ...................... 400 invalid_json  (<body>)
    integer of more than 30 digits, NaN, ±Infinity,
      or a float that overflows (1e309) ................. 422 invalid_request (its field)
    a string (or key) that is not valid Unicode (a lone
      surrogate such as "\\ud800") ........................ 422 invalid_request (its field)

Field paths are written as pydantic's errors are (`messages[0].content`), so every
4xx names the field the same way. No I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any

from orchestration.errors import (
    BadRequestError,
    BodyTooLargeError,
    InvalidHeaderError,
    InvalidJSONError,
)

MAX_INT_DIGITS = 30  # far beyond any count or seed Chorus takes; bounds the work


class _Bad:
    """A JSON value that parsed but cannot be a number: reported with its field path."""

    def __init__(self, why: str) -> None:
        self.why = why


def _int(text: str) -> Any:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Bad(f"integer out of range ({digits} digits)")
    return int(text)


def _float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _Bad(f"number out of range ({text[:20]})")


def _constant(name: str) -> Any:
    return _Bad(f"{name} is not a valid JSON number")


def _path(parts: list[str | int]) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "<body>"


def _check(value: Any, max_depth: int) -> None:
    """Walk the parsed value (iteratively): depth, bad numbers, unencodable text."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > max_depth:
            raise InvalidJSONError(f"<body>: JSON nested deeper than {max_depth} levels",
                                   field="<body>")
        if isinstance(item, _Bad):
            raise BadRequestError(f"{_path(path)}: {item.why}", field=_path(path))
        if isinstance(item, str):
            _encodable(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _encodable(key, path, key=True)
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, i]) for i, child in enumerate(item))


def _encodable(text: str, path: list[str | int], key: bool = False) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = _path(path)
        what = "a key" if key else "text"
        raise BadRequestError(
            f"{where}: {what} with characters that are not valid Unicode (e.g. a lone "
            "surrogate such as \\ud800)", field=where) from None


def parse_body(raw: bytes, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx naming what is wrong with it."""
    if len(raw) > max_bytes:
        raise BodyTooLargeError(f"<body>: {len(raw)} bytes, at most {max_bytes} accepted",
                                field="<body>")
    try:
        body = json.loads(raw or b"null", parse_int=_int, parse_float=_float,
                          parse_constant=_constant)
    except RecursionError:
        raise InvalidJSONError(f"<body>: JSON nested deeper than {max_depth} levels",
                               field="<body>") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSONError(f"<body>: invalid JSON: {exc}", field="<body>") from None
    if not isinstance(body, dict):
        raise InvalidJSONError("<body>: must be a JSON object", field="<body>")
    _check(body, max_depth)
    return body


def correlation_id(header: str | None, max_chars: int) -> str | None:
    """The caller's X-Request-ID as a label: printable ASCII up to `max_chars`, or a 400."""
    if header is None or header == "":
        return None
    if len(header) > max_chars or not (header.isascii() and header.isprintable()):
        shown = f"{len(header)} characters" if len(header) > max_chars else "unprintable"
        raise InvalidHeaderError(
            f"x-request-id: must be printable ASCII of at most {max_chars} characters "
            f"({shown}); it is only a correlation label, the server assigns request ids",
            field="x-request-id")
    return header
