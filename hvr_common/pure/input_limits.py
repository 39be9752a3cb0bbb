"""Bounds on what a peer or an operator sends: numbers, JSON documents and HTTP framing.

Every integer that is stored fits SQLite's signed 64-bit ``INTEGER``
(:data:`MAX_INT64`); a number in a path, a query or a header is 1 to
:data:`MAX_DECIMAL_DIGITS` ASCII digits (``str.isdigit()`` also accepts
``"²"`` and ``"١٢"``, which are refused here); a JSON document is at most
:data:`MAX_JSON_BODY_BYTES` and nests at most :data:`MAX_JSON_DEPTH` deep.
The HTTP limits are what the daemons give their HTTP servers.  Every refusal
is a :class:`UsageError` (400 ``bad_request``) naming the input; nothing has
changed when it is raised.  ``docs/input-limits.md`` lists them all.
"""

from __future__ import annotations

import json
import re

from hvr_common.pure.errors import UsageError

MAX_INT64 = 2 ** 63 - 1  # SQLite's INTEGER
MAX_DECIMAL_DIGITS = 19  # every value up to MAX_INT64
MAX_JSON_BODY_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 16
MAX_REQUEST_LINE_BYTES = 8190  # method, path with its query, version
MAX_HEADER_FIELD_BYTES = 8190  # one header line
MAX_HEADERS = 64
MAX_QUOTED_CHARS = 80  # how much of a refused value an error message repeats

_DECIMAL_RE = re.compile(rf"[0-9]{{1,{MAX_DECIMAL_DIGITS}}}")


def quoted(value: object) -> str:
    """``repr(value)``, cut short: an error message never echoes a whole hostile input."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def decimal(raw: str | None, what: str, *, minimum: int = 0, maximum: int = MAX_INT64) -> int:
    """A number sent as text (a path segment, a query parameter, a header): ASCII digits, in range."""
    if raw is None or _DECIMAL_RE.fullmatch(raw) is None:
        raise UsageError(f"{what} is missing or not a number of 1 to {MAX_DECIMAL_DIGITS} digits 0-9"
                         + ("" if raw is None else f", not {quoted(raw)}"))
    value = int(raw)
    if not minimum <= value <= maximum:
        raise UsageError(f"{what} must be from {minimum} to {maximum}, not {value}")
    return value


def is_int_in(value: object, minimum: int, maximum: int = MAX_INT64) -> bool:
    """A JSON integer (not a boolean) from ``minimum`` to ``maximum``."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def json_depth(doc: object, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``doc`` nests (a scalar is 0, ``[]`` is 1), counted without recursion up to ``limit + 1``."""
    deepest = 0
    stack: list[tuple[object, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def json_object(raw: bytes, what: str = "body", *, max_bytes: int = MAX_JSON_BODY_BYTES,
                max_depth: int = MAX_JSON_DEPTH) -> dict:
    """``raw`` as a JSON object within the bounds (size, depth, integer digits), or a UsageError."""
    if len(raw) > max_bytes:
        raise UsageError(f"{what} is larger than {max_bytes} bytes")
    try:
        doc = json.loads(raw) if raw else {}
    except RecursionError:
        raise UsageError(f"{what} nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and integers of thousands of digits
        raise UsageError(f"{what} is not valid JSON: {quoted(str(exc))}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{what} must be a JSON object")
    if json_depth(doc, max_depth) > max_depth:
        raise UsageError(f"{what} nests deeper than {max_depth} levels")
    return doc
