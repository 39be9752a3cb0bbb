"""The backup gate (pure): whether a backup of a replica VM's recovery point can be begun now.

A backup is a frozen view of one recovery point.  It is refused at once, with
a transient error whose code names the condition, wherever the replica cannot
guarantee that the point is consistent; a backup product retries later.  The
checks, in order (the first that holds decides):

| condition | code |
|---|---|
| the replica is in Error (an apply failed) | ``backup_apply_failed`` |
| resynchronization is required | ``backup_resync_required`` |
| resynchronization is running | ``backup_resync_running`` |
| initial replication has not completed | ``backup_initial_replication`` |
| a failover of the VM is running | ``backup_failover_running`` |
| replica health is Critical | ``backup_health_critical`` |
| the applier is retrying an interrupted apply | ``backup_apply_interrupted`` |
| the chosen point (or any point) is not applied yet | ``backup_point_not_applied`` |
| the latest point is being replaced by the cycle applying | ``recovery_point_changing`` |

A test failover running does not refuse a backup: the test writes to its own
overlay, never to the replica image or the undo logs, and both pin their
points.

Any other state that is not ``Replicating`` is refused with ``wrong_state``
(permanent).  A requested point older than the latest and no longer kept (or
never a capturing point) is ``unknown_recovery_point`` (permanent).

States are compared by their names, so the resynchronization states of either
naming (``Resynchronizing``, ``WaitingForStartResynchronize``,
``ResynchronizeSuspended``) refuse alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hvr_common.pure.recovery_points import Point

ERROR = frozenset({"Error"})
RESYNC_REQUIRED = frozenset({"WaitingForStartResynchronize"})
RESYNC_RUNNING = frozenset({"Resynchronizing", "ResynchronizeSuspended"})
INITIAL = frozenset({"WaitingForInitialReplication", "InitialReplicationInProgress", "ReadyForInitialReplication"})
FAILOVER = frozenset({"PreparedForFailover", "FailedOverWaitingCompletion"})
REPLICATING = "Replicating"

# every code the gate answers with, transient first (a backup product retries those)
TRANSIENT_CODES = ("backup_apply_failed", "backup_resync_required", "backup_resync_running",
                   "backup_initial_replication", "backup_failover_running", "backup_health_critical",
                   "backup_apply_interrupted", "backup_point_not_applied", "recovery_point_changing")
PERMANENT_CODES = ("wrong_state", "unknown_recovery_point")


@dataclass(frozen=True, slots=True)
class GateInput:
    """What the gate looks at, read at one instant under the replica's locks."""

    vm: str
    state: str  # the replica's ReplicationState value
    health: str  # Normal | Warning | Critical (the replica's view)
    points: Sequence[Point]  # oldest first; the last one is the latest
    requested_point: int | None = None  # None: the latest
    apply_interrupted: str | None = None  # why the applier is retrying this VM's apply, if it is
    failover_running: bool = False
    state_detail: str | None = None
    resync_running: bool = False  # a primary compares the replica by digest tree now (its state stays Replicating)


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    point: Point


def backup_gate(g: GateInput) -> Admitted | Refusal:
    """Admit a backup of the chosen point, or say why not (first condition that holds)."""
    retry = "a backup product retries later; hvrctl replica get " + g.vm + " shows the state"
    if g.state in ERROR:
        detail = f": {g.state_detail}" if g.state_detail else ""
        return Refusal("backup_apply_failed", f"VM {g.vm} is in Error (an apply failed{detail})",
                       f"fix the cause and resume it: hvrctl replica resume {g.vm}")
    if g.state in RESYNC_REQUIRED:
        return Refusal("backup_resync_required", f"VM {g.vm} needs resynchronization: its replica is not "
                       "known to match any point of the primary", retry)
    if g.resync_running and g.state not in RESYNC_RUNNING:
        return Refusal("backup_resync_running", f"VM {g.vm} is being resynchronized by its primary (its images "
                       "are compared because they are not trusted)", retry)
    if g.state in RESYNC_RUNNING:
        return Refusal("backup_resync_running", f"VM {g.vm} is being resynchronized ({g.state})", retry)
    if g.state in INITIAL:
        return Refusal("backup_initial_replication", f"initial replication of VM {g.vm} has not completed "
                       f"({g.state})", retry)
    if g.failover_running or g.state in FAILOVER:
        return Refusal("backup_failover_running", f"a failover of VM {g.vm} is running ({g.state})", retry)
    if g.state != REPLICATING:
        return Refusal("wrong_state", f"VM {g.vm} is {g.state}: only a replicating VM can be backed up")
    if g.health == "Critical":
        return Refusal("backup_health_critical", f"replication health of VM {g.vm} is Critical", retry)
    if g.apply_interrupted is not None:
        return Refusal("backup_apply_interrupted", f"applying a cycle of VM {g.vm} was interrupted and is being "
                       f"retried: {g.apply_interrupted}", retry)
    points = list(g.points)
    if not points:
        return Refusal("backup_point_not_applied", f"VM {g.vm} has no applied recovery point yet",
                       "one appears once the first cycle after the initial copy is applied")
    latest = points[-1]
    if g.requested_point is None:
        point = latest
    else:
        point = next((p for p in points if p.id == g.requested_point), None)
        if point is None and g.requested_point > latest.id:
            return Refusal("backup_point_not_applied", f"recovery point {g.requested_point} of VM {g.vm} is not "
                           f"applied yet (the latest is {latest.id})", retry)
        if point is None or (point is not latest and not point.capturing):
            return Refusal("unknown_recovery_point", f"VM {g.vm} has no recovery point {g.requested_point}",
                           f"hvrctl recovery-points list {g.vm} shows them")
    if point is latest and latest.capturing is False:
        return Refusal("recovery_point_changing", f"the latest recovery point of VM {g.vm} is being replaced by "
                       "the cycle now applying", "try again once that cycle is applied")
    return Admitted(point)
