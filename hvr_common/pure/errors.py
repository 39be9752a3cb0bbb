"""The one error root of hvr.

Every error hvr raises on purpose is an :class:`HvrError`.  It carries

* ``code``: a stable, machine-readable name (appears in JSON error bodies,
  structured logs and ``hvrctl -o json``);
* ``transient``: whether retrying the same operation later may succeed.
  Only transient errors are ever retried;
* ``exit_code``: what ``hvrctl`` exits with when this error ends a command;
* ``hint``: optional sentence telling the operator what to do.

Foreign exceptions (``OSError``, ``sqlite3.Error``, aiohttp errors) are
translated into these at the boundary of the shell that met them.
"""

from __future__ import annotations


class HvrError(Exception):
    code = "internal"
    transient = False
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, detail: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail or {}

    def to_dict(self) -> dict:
        body: dict = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        if self.detail:
            body["detail"] = self.detail
        return body

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(HvrError):
    """A configuration file or value is invalid.  ``problems`` lists each one with its key."""

    code = "config_invalid"
    exit_code = 78  # EX_CONFIG

    def __init__(self, message: str, problems: list[str] | None = None, **kw):
        super().__init__(message, **kw)
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return super().__str__()
        return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class UsageError(HvrError):
    """The operator asked for something that cannot be done as asked."""

    code = "bad_request"
    exit_code = 2


class NotFoundError(HvrError):
    code = "not_found"
    exit_code = 3


class ConflictError(HvrError):
    code = "conflict"
    exit_code = 4


class CorruptError(HvrError):
    """Data read from disk or network fails validation (checksum, magic, bounds)."""

    code = "corrupt"
    exit_code = 65  # EX_DATAERR


class TransientError(HvrError):
    """Something that may succeed when tried again (network, peer restarting, disk full)."""

    code = "transient"
    transient = True
    exit_code = 75  # EX_TEMPFAIL


class UnavailableError(TransientError):
    """A daemon could not be reached."""

    code = "unavailable"
    exit_code = 69  # EX_UNAVAILABLE
