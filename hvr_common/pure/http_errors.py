"""How an :class:`HvrError` maps to an HTTP status (pure; shared by both daemons' APIs)."""

from __future__ import annotations

from hvr_common.pure.errors import (
    ConfigError, ConflictError, CorruptError, HvrError, NotFoundError, TransientError, UsageError,
)

_STATUS = [
    (UsageError, 400),
    (ConfigError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (CorruptError, 422),
    (TransientError, 503),
]


def status_for(exc: HvrError) -> int:
    explicit = getattr(exc, "http_status", None)
    if explicit:
        return explicit
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


_BY_CODE = {
    400: UsageError, 404: NotFoundError, 409: ConflictError, 422: CorruptError, 503: TransientError,
}


AUTH_CODES = frozenset({"unauthenticated", "forbidden", "not_authorized"})


def error_from_body(status: int, body: dict) -> HvrError:
    """Rebuild an error from an API error body (the CLI side)."""
    cls = _BY_CODE.get(status, HvrError)
    exc = cls(str(body.get("message") or f"HTTP {status}"), hint=body.get("hint"), detail=body.get("detail"))
    if body.get("code"):
        exc.code = body["code"]
        if exc.code in AUTH_CODES:
            exc.exit_code = 77  # EX_NOPERM
    return exc


def internal_error_body(exc: BaseException) -> dict:
    """The JSON body of an unexpected failure (the traceback goes to the log, not the client)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"I/O error: {exc.strerror}{where}"
    else:
        message = f"internal error: {type(exc).__name__}: {exc}"
    return {"code": "internal", "message": message, "hint": "see the daemon's log for details"}
