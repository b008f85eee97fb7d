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
    format_loc,
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


def _path(link: tuple[Any, str | int] | None) -> str:
    """The field path of a linked (parent, key) chain, built only when reporting."""
    parts: list[str | int] = []
    while link is not None:
        link, key = link
        parts.append(key)
    return format_loc(tuple(reversed(parts)), empty="<body>")


def _check(value: Any, max_depth: int) -> None:
    """Walk the parsed value (iteratively): depth, bad numbers, unencodable text.

    Only containers go on the stack, each with its depth and a link to its parent (no
    path copied per node): a 2 MiB body must not cost the event loop seconds.
    """
    stack: list[tuple[Any, int, tuple[Any, str | int] | None]] = [(value, 0, None)]
    while stack:
        item, depth, link = stack.pop()
        if item and depth >= max_depth:  # its children would lie deeper than max_depth
            raise InvalidJSONError(f"<body>: JSON nested deeper than {max_depth} levels",
                                   field="<body>")
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if isinstance(key, str):
                _encodable(key, link, key=True)
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, (link, key)))
            elif isinstance(child, str):
                _encodable(child, (link, key))
            elif isinstance(child, _Bad):
                where = _path((link, key))
                raise BadRequestError(f"{where}: {child.why}", field=where)


def _encodable(text: str, link: tuple[Any, str | int] | None, key: bool = False) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = _path(link)
        what = "a key" if key else "text"
        raise BadRequestError(
            f"{where}: {what} with characters that are not valid Unicode (e.g. a lone "
            "surrogate such as \\ud800)", field=where) from None


def too_large(size: int, max_bytes: int, declared: bool = True) -> BodyTooLargeError:
    """413 for a body of `size` bytes (`declared`: as its Content-Length says; else at
    least that many, reading stopped there)."""
    what = f"{size} bytes" if declared else f"more than {max_bytes} bytes"
    return BodyTooLargeError(f"<body>: {what}, at most {max_bytes} accepted", field="<body>")


def parse_body(raw: bytes, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx naming what is wrong with it."""
    if len(raw) > max_bytes:
        raise too_large(len(raw), max_bytes)
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
