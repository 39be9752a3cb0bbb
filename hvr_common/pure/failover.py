"""Failover of a replica VM on the replica server (Start/Stop/Complete-VMFailover): the rules, no I/O.

The listener's :mod:`hvr_listener.failover` asks these functions before it
changes anything, and records each step in its failover row:

* :func:`check_start`: which replica states may fail over (Replicating, or
  Error: every applied point is still sound) and which not (no point yet,
  a test failover standing on the history);
* :func:`guard`: the split-brain guard, from the primary's last heartbeat;
* :func:`choose_point`: the recovery point (the latest by default);
* :func:`raised_generation`: the generation a failover moves to (fencing: the
  old primary's requests of the previous one are refused from then on);
* :func:`check_stop`, :func:`check_complete`: cancel until completed, complete once.

The steps of a failover row (:class:`FailoverStep`) and what each leaves
behind are in ``docs/state-machine.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from hvr_common.pure.input_limits import is_int_in
from hvr_common.pure.recovery_points import Point
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire.error_catalogue import error

NS = 1_000_000_000
DEFAULT_PRIMARY_ALIVE_S = 30

S = ReplicationState
# Replica states from which a failover may start.  Error: an apply failed, but the points already
# applied are whole; cancelling goes back to Replicating, where the applier tries that cycle again.
STARTABLE = frozenset({S.REPLICATING, S.ERROR})


class FailoverStep(enum.StrEnum):
    """Where a failover stands (the failover row's ``step``)."""

    WAITING_COMPLETION = "waiting_completion"  # generation raised; the point's disks are (being) made
    COMPLETING = "completing"  # complete began: the replica's images and history are being removed
    COMPLETED = "completed"  # the failover disks are the VM's disks; no way back but reverse replication


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The primary's last word about the VM, as the listener received it."""

    received_ns: int
    running: bool
    nbd_clients: int


@dataclass(frozen=True, slots=True)
class Failover:
    """A failover row: the chosen point and the generations around it."""

    point_id: int
    point_sequence: int
    point_time_ns: int
    old_generation: int
    generation: int
    step: FailoverStep
    started_ns: int
    forced: bool = False
    completed_ns: int | None = None


def check_start(name: str, state: ReplicationState, test_failover: bool) -> None:
    """Refuse a failover the replica's state does not allow (409 ``wrong_state`` / ``test_failover_running``)."""
    if state in (S.FAILED_OVER_WAITING_COMPLETION, S.FAILED_OVER):
        raise error("failover_in_progress" if state is S.FAILED_OVER_WAITING_COMPLETION else "failover_completed",
                    f"VM {name} is {state.value}", hint=f"hvrctl replica get {name}")
    if state in (S.WAITING_FOR_START_RESYNCHRONIZE, S.RESYNCHRONIZING, S.RESYNCHRONIZE_SUSPENDED):
        raise error("wrong_state", f"VM {name} is {state.value}: its replica is being brought in sync and is "
                    "no recovery point of the primary", hint="let the resynchronization finish, or fail over with "
                    "the recovery points kept before it once it completes")
    if state not in STARTABLE:
        raise error("wrong_state", f"VM {name} is {state.value}: only a replicating VM (or one in Error) can fail "
                    "over", hint=f"initial replication must complete first (hvrctl replica get {name})"
                    if state in (S.WAITING_FOR_INITIAL_REPLICATION, S.INITIAL_REPLICATION_IN_PROGRESS) else None)
    if test_failover:
        raise error("test_failover_running", f"a test failover of VM {name} is running",
                    hint=f"stop it first: hvrctl failover stop {name} --as-test")


def guard(name: str, primary: str, heartbeat: Heartbeat | None, now_ns: int, primary_alive_s: int,
          force: bool) -> None:
    """The split-brain guard: 409 ``primary_running`` while the primary answered less than
    ``primary_alive_s`` ago and said the VM runs there; ``force`` overrides (that site is lost)."""
    if force or heartbeat is None or not heartbeat.running:
        return
    age_s = max(0, now_ns - heartbeat.received_ns) / NS
    if age_s >= primary_alive_s:
        return
    raise error("primary_running",
                f"the primary {primary} answered {age_s:.0f} s ago and says VM {name} is running there "
                f"({heartbeat.nbd_clients} NBD client(s) on its disks)",
                hint=f"stop the VM there (or run hvrctl failover start {name} --prepare there for a planned "
                     f"failover), or add --force if that site is lost",
                detail={"primary": primary, "age_s": round(age_s, 1), "nbd_clients": heartbeat.nbd_clients})


def choose_point(name: str, points: Sequence[Point], point_id: int | None) -> Point:
    """The point to fail over to: ``point_id``, or the latest; 404 ``unknown_recovery_point`` otherwise.

    Only the latest point and points that capture can be reached (the others
    are about to be dropped); the latest one not while a cycle that does not
    capture is replacing it (503 ``recovery_point_changing``)."""
    if point_id is not None and not is_int_in(point_id, 1):  # 1 to 2^63 - 1, as stored
        raise error("bad_request", f"recovery_point must be a point id (a positive whole number), not {point_id!r:.80}")
    if not points:
        raise error("unknown_recovery_point", f"VM {name} has no recovery point yet",
                    hint="one appears once the first cycle after the initial copy is applied")
    latest = points[-1]
    chosen = latest if point_id is None else next(
        (p for p in points if p.id == point_id and (p is latest or p.capturing)), None)
    if chosen is None:
        raise error("unknown_recovery_point", f"VM {name} has no recovery point {point_id}",
                    hint=f"hvrctl recovery-points list {name} shows them")
    if chosen is latest and latest.capturing is False:  # a cycle began replacing it without capturing
        raise error("recovery_point_changing", f"the latest recovery point of VM {name} is being replaced by "
                    "the cycle now applying", hint="try again once that cycle is applied, or choose an older point")
    return chosen


def raised_generation(generation: int) -> int:
    """The generation a failover moves the relationship to (F1 in docs/state-machine.md)."""
    return generation + 1


def same_request(row: Failover, point_id: int | None) -> bool:
    """Whether a start repeated while ``row`` exists asks for the same failover (no point: the one chosen)."""
    return point_id is None or point_id == row.point_id


def check_restart(name: str, row: Failover, point_id: int | None) -> None:
    """A start while a failover exists: the same one is answered again; another point is refused."""
    if row.step is not FailoverStep.WAITING_COMPLETION:
        if same_request(row, point_id):
            return
        raise error("failover_completed", f"VM {name} was failed over to recovery point {row.point_id} and that "
                    "failover is completed", hint="set up reverse replication (hvrctl vm set NAME --reverse ...)")
    if not same_request(row, point_id):
        raise error("failover_in_progress", f"VM {name} is failed over to recovery point {row.point_id}, waiting "
                    "completion", hint=f"cancel it first (hvrctl failover stop {name}), then fail over to point "
                                       f"{point_id}")


def check_stop(name: str, row: Failover | None) -> None:
    """Stop-VMFailover is allowed until the failover is completed."""
    if row is None:
        raise error("not_failed_over", f"VM {name} is not failed over", hint=f"hvrctl replica get {name}")
    if row.step is not FailoverStep.WAITING_COMPLETION:
        raise error("failover_completed", f"the failover of VM {name} is completed and cannot be cancelled",
                    hint="fail back with reverse replication (docs/failover.md)")


def check_complete(name: str, row: Failover | None) -> None:
    """Complete-VMFailover needs a failover; completing again is answered as done."""
    if row is None:
        raise error("not_failed_over", f"VM {name} is not failed over",
                    hint=f"fail over first: hvrctl failover start {name}")
