"""Every error code hvr emits, once: its HTTP status, transient flag and exit code.

A code names one kind of failure for good (it appears in JSON error bodies,
structured logs and ``hvrctl -o json``).  Its entry says how the daemons
answer it over HTTP (``status``), whether trying again later may succeed
(``transient``: only those are retried) and what ``hvrctl`` exits with
(``exit_code``).  Errors of a code are built by :func:`error` (or are the
named class that declares the code, e.g. ``HrlCorruptError``); nothing sets
an error's code after it was made.

The mapping both ways lives here and nowhere else: :func:`status_for` (an
error to the status of its answer) and :func:`error_from_body` (an answer
back to an error, for the CLI and the agent's client of the replica).  An
answer whose status is not its code's (a replica's refusal the agent passes
on as 502, the HTTP layer's own ``http_error`` with 405) becomes a
:class:`RemoteError` that keeps the answer's code and status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from hvr_common.pure.errors import (
    ConfigError, ConflictError, CorruptError, HvrError, NotFoundError, TransientError, UnavailableError, UsageError,
)

EX_NOPERM = 77


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str
    status: int
    base: type[HvrError]  # the class errors of this code are (a subclass of)
    exit_code: int
    meaning: str

    @property
    def transient(self) -> bool:
        return issubclass(self.base, TransientError) or self.code in _TRANSIENT_IN_TRANSIT


# Bytes damaged or cut short on the way: the sender builds the request again and retries.
_TRANSIENT_IN_TRANSIT = frozenset({"digest_mismatch", "body_truncated"})

_E = ErrorCode
_ENTRIES = (
    # the generic codes of the error classes (hvr_common.pure.errors)
    _E("internal", 500, HvrError, 1, "unexpected failure; the daemon's log has the details"),
    _E("config_invalid", 400, ConfigError, 78, "a configuration file or value is invalid"),
    _E("bad_request", 400, UsageError, 2, "the request cannot be done as asked"),
    _E("not_found", 404, NotFoundError, 3, "no such object"),
    _E("conflict", 409, ConflictError, 4, "the request conflicts with the current state"),
    _E("corrupt", 422, CorruptError, 65, "stored or received data fails validation"),
    _E("transient", 503, TransientError, 75, "may succeed when tried again"),
    _E("unavailable", 503, UnavailableError, 69, "a daemon could not be reached (hvrctl)"),
    _E("http_error", 404, NotFoundError, 3, "the HTTP layer's own refusal (404 no route; also 405, 413)"),
    # formats and state
    _E("hrl_corrupt", 422, CorruptError, 65, "an HRL log is damaged"),
    _E("bitmap_corrupt", 422, CorruptError, 65, "a write-intent bitmap is damaged"),
    _E("undo_corrupt", 422, CorruptError, 65, "a recovery point's undo log is damaged"),
    _E("nbd_protocol", 500, HvrError, 1, "an NBD client broke the protocol (never an HTTP answer)"),
    _E("wrong_state", 409, ConflictError, 4, "not allowed in the VM's replication state"),
    _E("test_failover_running", 409, ConflictError, 4, "a test failover of the VM is already running"),
    _E("unknown_recovery_point", 404, NotFoundError, 3, "the VM has no recovery point of that id"),
    _E("recovery_point_changing", 503, TransientError, 75, "the latest recovery point is being replaced by the cycle applying now"),
    # the replication API: authentication and authorisation
    _E("unauthenticated", 401, HvrError, EX_NOPERM, "the request's signature is missing or not accepted"),
    _E("signed_before_restart", 503, TransientError, 75, "signed before the replica server started; sign again"),
    _E("replication_disabled", 403, HvrError, 1, "the replica server does not accept replication"),
    _E("not_authorized", 403, HvrError, EX_NOPERM, "authenticated, but not allowed here (no authorization entry matches)"),
    _E("forbidden", 403, HvrError, EX_NOPERM, "a 403 answer without a code"),
    # the replication API: bodies
    _E("digest_mismatch", 400, UsageError, 75, "the body does not match its X-Hvr-Content-SHA256"),
    _E("body_truncated", 400, CorruptError, 75, "the body ended early or stalled"),
    _E("bundle_corrupt", 400, CorruptError, 65, "the bundle in the body is damaged or not what was asked"),
    _E("body_too_large", 413, UsageError, 2, "the body exceeds the server's limit"),
    _E("length_required", 411, UsageError, 2, "a bundle upload without Content-Length"),
    # the replication API: replicas, fencing and order
    _E("unknown_vm", 404, NotFoundError, 3, "the replica server has no such VM"),
    _E("replica_conflict", 409, ConflictError, 4, "a replica of the VM exists with other settings or data"),
    _E("stale_generation", 409, ConflictError, 4, "the request is for another generation (fencing)"),
    _E("out_of_order", 409, ConflictError, 4, "a cycle out of sequence, or stored before with other contents"),
    _E("initial_gap", 409, ConflictError, 4, "an initial window beyond the durable offset (detail.offset)"),
    _E("initial_incomplete", 409, ConflictError, 4, "initial replication has not reached the end of every disk"),
    # the daemons' state databases
    _E("state_too_new", 500, HvrError, 65, "the state database was written by a newer hvr (schema version)"),
    _E("state_migration_failed", 500, HvrError, 1, "upgrading the state database's schema failed; it is unchanged"),
    # the compare engine (resync, verify)
    _E("compare_mismatch", 409, ConflictError, 4,
       "a compare asked for a disk of another size or nodes outside its tree"),
    _E("adopt_mismatch", 409, ConflictError, 4, "an adopted copy is for another VM id, disk count or disk size"),
    # the agent's client of the replica server
    _E("replica_refused", 502, HvrError, 1, "the replica server refused (passed on by the agent)"),
    _E("replica_unavailable", 503, TransientError, 75, "the replica server could not be reached or failed"),
    # hostile input and exhausted resources
    _E("http_malformed", 400, UsageError, 2, "the request's HTTP framing is broken or over a size limit"),
    _E("storage_full", 507, TransientError, 75, "the replica host's storage is full; retried when space is back"),
    # backup of replicas: the gate's refusals (hvr_common.pure.backup_gate), all transient
    _E("backup_apply_failed", 503, TransientError, 75, "backup refused: the replica is in Error (an apply failed)"),
    _E("backup_resync_required", 503, TransientError, 75, "backup refused: the replica needs resynchronization"),
    _E("backup_resync_running", 503, TransientError, 75, "backup refused: a resynchronization is running"),
    _E("backup_initial_replication", 503, TransientError, 75, "backup refused: initial replication has not completed"),
    _E("backup_failover_running", 503, TransientError, 75, "backup refused: a failover of the VM is running"),
    _E("backup_health_critical", 503, TransientError, 75, "backup refused: the replica's health is Critical"),
    _E("backup_apply_interrupted", 503, TransientError, 75, "backup refused: an interrupted apply is being retried"),
    _E("backup_point_not_applied", 503, TransientError, 75, "backup refused: the chosen recovery point is not applied yet"),
    _E("backup_running", 409, ConflictError, 4, "a backup of the VM is already held"),
    # certificate authentication and TLS
    _E("certificate_invalid", 400, ConfigError, 78, "a certificate, key or CA file is unusable (unreadable, expired, not yet valid, wrong usage, key readable by others)"),
    _E("tls_refused", 401, HvrError, EX_NOPERM, "the TLS handshake failed: a certificate was not accepted by one side"),
    # authorization entries, trust groups, failed authentications (docs/authorization.md)
    _E("other_trust_group", 403, HvrError, EX_NOPERM, "the VM was first replicated by a primary of another trust group"),
    _E("auth_rate_limited", 429, TransientError, 75, "too many failed authentications from this address (detail.retry_after_s)"),
    # initial replication from external media (docs/initial-media.md)
    _E("media_corrupt", 422, CorruptError, 65, "a chunk or the manifest of initial-replication media fails its digest"),
    _E("media_wrong_vm", 409, ConflictError, 4, "the media is for another VM, generation or disk layout"),
    _E("media_stale", 409, ConflictError, 4, "the imported media is not of the primary's export point"),
    # streamed cycle uploads (docs/replication-protocol.md, "Streamed cycles")
    _E("upload_form_mismatch", 400, CorruptError, 65, "a cycle bundle of the other form than its upload (counted vs streamed)"),
    _E("cycle_not_staged", 409, TransientError, 75, "a cycle commit without its streamed body held; the body is sent again"),
    # failover on the replica server (docs/failover.md, docs/state-machine.md)
    _E("primary_running", 409, ConflictError, 4, "failover refused: the primary answered lately and said the VM runs (split-brain guard)"),
    _E("failover_in_progress", 409, ConflictError, 4, "a failover of the VM is waiting completion (stop or complete it first)"),
    _E("not_failed_over", 409, ConflictError, 4, "the VM has no failover to stop or complete"),
    _E("failover_completed", 409, ConflictError, 4, "the VM's failover is completed; it can no longer be cancelled"),
    # failover on the agent (docs/failover.md, "On the primary")
    _E("vm_running", 409, ConflictError, 4, "the VM runs: NBD clients are connected to its disks (detail.nbd_clients)"),
    _E("not_prepared", 409, ConflictError, 4, "the VM is not prepared for a planned failover"),
    _E("hook_failed", 500, HvrError, 1, "a lifecycle hook (agent.toml [hooks]) failed or timed out; the step stopped"),
    _E("not_failed_over_vm", 409, ConflictError, 4, "the VM was not failed over to this host (or its failover is not complete)"),
    # reverse replication: adopting an old primary's images (docs/failover.md)
    _E("adopt_busy", 409, ConflictError, 4, "the VM to adopt from the local agent still has NBD clients (it runs)"),
)

CATALOGUE: MappingProxyType[str, ErrorCode] = MappingProxyType({e.code: e for e in _ENTRIES})
assert len(CATALOGUE) == len(_ENTRIES), "an error code is listed twice"


def _class_for(entry: ErrorCode) -> type[HvrError]:
    base = entry.base
    if base.code == entry.code:
        return base
    name = "".join(part.title() for part in entry.code.split("_")) + "Error"
    attrs = {"code": entry.code, "exit_code": entry.exit_code, "transient": entry.transient,
             "__doc__": entry.meaning, "__module__": __name__, "__qualname__": name}
    return type(name, (base,), attrs)


_CLASSES: MappingProxyType[str, type[HvrError]] = MappingProxyType({e.code: _class_for(e) for e in _ENTRIES})


def error_class(code: str) -> type[HvrError]:
    """The class of errors of ``code`` (for ``except`` clauses and ``isinstance``)."""
    try:
        return _CLASSES[code]
    except KeyError:
        raise ValueError(f"{code!r} is not an hvr error code") from None


def error(code: str, message: str, *, hint: str | None = None, detail: dict | None = None) -> HvrError:
    """An error of ``code``, with everything its catalogue entry says."""
    return error_class(code)(message, hint=hint, detail=detail)


class RemoteError(HvrError):
    """An error answer received from another hvr process, kept as it was answered.

    Its ``code`` is the answer's (``fallback_code`` when the answer had
    none) and ``status`` the answer's HTTP status.  Passed on by an API of
    its own, a permanent one is answered 502 (bad gateway), a transient one
    503.
    """

    fallback_code = "internal"

    def __init__(self, message: str, *, status: int, remote_code: str | None = None,
                 exit_code: int | None = None, **kw):
        super().__init__(message, **kw)
        self.status = status
        self.remote_code = remote_code
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def code(self) -> str:  # type: ignore[override]
        return self.remote_code or self.fallback_code


class RemoteTransientError(RemoteError, TransientError):
    fallback_code = "transient"


def status_for(exc: HvrError) -> int:
    """The HTTP status that answers ``exc``."""
    if isinstance(exc, RemoteError):
        return 503 if exc.transient else 502
    entry = CATALOGUE.get(exc.code)
    return entry.status if entry is not None else 500


# An answer whose status is not its code's catalogue status: the exit code by status.
_EXIT_BY_STATUS = MappingProxyType({400: 2, 404: 3, 409: 4, 422: 65, 503: 75})
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")  # \Z: "code\n" is not a code


def error_from_body(status: int, body: dict) -> HvrError:
    """Rebuild an error from an error answer (its status and JSON body)."""
    code = body.get("code") if isinstance(body.get("code"), str) and _CODE_RE.match(body["code"]) else None
    message = str(body.get("message") or f"HTTP {status}")
    hint = body.get("hint") if isinstance(body.get("hint"), str) else None
    detail = body.get("detail") if isinstance(body.get("detail"), dict) else None
    entry = CATALOGUE.get(code) if code else None
    if entry is not None and entry.status == status:
        return error(entry.code, message, hint=hint, detail=detail)
    if status == 503:
        return RemoteTransientError(message, status=status, remote_code=code, hint=hint, detail=detail)
    exit_code = _EXIT_BY_STATUS.get(status) or (EX_NOPERM if entry and entry.exit_code == EX_NOPERM else 1)
    return RemoteError(message, status=status, remote_code=code, exit_code=exit_code, hint=hint, detail=detail)


def internal_error_body(exc: BaseException) -> dict:
    """The JSON body of an unexpected failure (the traceback goes to the log, not the client)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"I/O error: {exc.strerror}{where}"
    else:
        message = f"internal error: {type(exc).__name__}: {exc}"
    return {"code": "internal", "message": message, "hint": "see the daemon's log for details"}
