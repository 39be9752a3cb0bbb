"""Replication states and their transitions, as one table (Hyper-V's names).

An invalid transition raises :class:`InvalidTransition`; states appear as-is
in status JSON and in the CLI.

Primary side: suspending is possible once the VM replicates (not during the
initial copy: there is no cycle to hold back yet); resuming a VM in Error
goes back to where it failed (``RESUME`` after the initial copy,
``START_INITIAL`` before it).
"""

from __future__ import annotations

import enum

from hvr_common.pure.errors import ConflictError


class ReplicationState(enum.StrEnum):
    # primary side
    READY_FOR_INITIAL_REPLICATION = "ReadyForInitialReplication"
    INITIAL_REPLICATION_IN_PROGRESS = "InitialReplicationInProgress"
    REPLICATING = "Replicating"
    SUSPENDED = "Suspended"
    WAITING_FOR_START_RESYNCHRONIZE = "WaitingForStartResynchronize"
    RESYNCHRONIZING = "Resynchronizing"
    RESYNCHRONIZE_SUSPENDED = "ResynchronizeSuspended"
    PREPARED_FOR_FAILOVER = "PreparedForFailover"
    FAILED_OVER_WAITING_COMPLETION = "FailedOverWaitingCompletion"
    FAILED_OVER = "FailedOver"
    ERROR = "Error"
    # replica side
    WAITING_FOR_INITIAL_REPLICATION = "WaitingForInitialReplication"


S = ReplicationState


class Action(enum.StrEnum):
    ENABLE = "enable"
    START_INITIAL = "start_initial"
    EXPORT_INITIAL = "export_initial"  # the initial copy goes out on external media (hvrctl initial export)
    COMPLETE_INITIAL = "complete_initial"
    SUSPEND = "suspend"
    RESUME = "resume"
    FAIL = "fail"  # a permanent error
    RECOVER = "recover"  # the operator resumes a VM in Error
    REQUIRE_RESYNC = "require_resync"  # certainty was lost (an offline change, a missing log, a refused cycle)
    RESYNC = "resync"  # the compare starts (hvrctl vm resync, or automatically)
    COMPLETE_RESYNC = "complete_resync"
    CANCEL_RESYNC = "cancel_resync"
    COMPLETE_INITIAL_FROM_COPY = "complete_initial_from_copy"  # the replica adopted a copy: compare it
    FAIL_OVER = "fail_over"  # Start-VMFailover on the replica server (hvr_common.pure.failover)
    CANCEL_FAILOVER = "cancel_failover"  # Stop-VMFailover: a replica back to every point; a prepared primary back to Replicating
    COMPLETE_FAILOVER = "complete_failover"  # Complete-VMFailover: the failover disks are the VM's now
    PREPARE_FAILOVER = "prepare_failover"  # planned failover: everything shipped and verified (Start-VMFailover -Prepare)


class InvalidTransition(ConflictError):
    code = "wrong_state"


# (role, state, action) -> next state.  role: "primary" | "replica".
TRANSITIONS: dict[tuple[str, S | None, Action], S] = {
    ("primary", None, Action.ENABLE): S.READY_FOR_INITIAL_REPLICATION,
    ("primary", S.READY_FOR_INITIAL_REPLICATION, Action.START_INITIAL): S.INITIAL_REPLICATION_IN_PROGRESS,
    ("primary", S.INITIAL_REPLICATION_IN_PROGRESS, Action.START_INITIAL): S.INITIAL_REPLICATION_IN_PROGRESS,
    ("primary", S.INITIAL_REPLICATION_IN_PROGRESS, Action.COMPLETE_INITIAL): S.REPLICATING,
    ("primary", S.REPLICATING, Action.SUSPEND): S.SUSPENDED,
    ("primary", S.SUSPENDED, Action.RESUME): S.REPLICATING,
    ("primary", S.READY_FOR_INITIAL_REPLICATION, Action.FAIL): S.ERROR,
    ("primary", S.INITIAL_REPLICATION_IN_PROGRESS, Action.FAIL): S.ERROR,
    ("primary", S.REPLICATING, Action.FAIL): S.ERROR,
    ("primary", S.ERROR, Action.FAIL): S.ERROR,
    ("primary", S.ERROR, Action.RECOVER): S.REPLICATING,
    ("primary", S.ERROR, Action.RESUME): S.REPLICATING,
    # A permanent error before the initial copy finished: resuming re-enters it (from the durable offsets).
    ("primary", S.ERROR, Action.START_INITIAL): S.INITIAL_REPLICATION_IN_PROGRESS,
    # Initial replication from external media: the primary exports and waits for the replica's import
    # (WaitingForInitialReplication), then completes it like a network copy; exporting again keeps the point.
    ("primary", S.READY_FOR_INITIAL_REPLICATION, Action.EXPORT_INITIAL): S.WAITING_FOR_INITIAL_REPLICATION,
    ("primary", S.WAITING_FOR_INITIAL_REPLICATION, Action.EXPORT_INITIAL): S.WAITING_FOR_INITIAL_REPLICATION,
    ("primary", S.WAITING_FOR_INITIAL_REPLICATION, Action.COMPLETE_INITIAL): S.REPLICATING,
    ("primary", S.WAITING_FOR_INITIAL_REPLICATION, Action.START_INITIAL): S.INITIAL_REPLICATION_IN_PROGRESS,
    # Resynchronization (docs/resync.md): never a blind copy, a compare of the disks.
    ("primary", S.REPLICATING, Action.REQUIRE_RESYNC): S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.SUSPENDED, Action.REQUIRE_RESYNC): S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.ERROR, Action.REQUIRE_RESYNC): S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.WAITING_FOR_START_RESYNCHRONIZE, Action.REQUIRE_RESYNC): S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.WAITING_FOR_START_RESYNCHRONIZE, Action.RESYNC): S.RESYNCHRONIZING,
    ("primary", S.REPLICATING, Action.RESYNC): S.RESYNCHRONIZING,
    ("primary", S.ERROR, Action.RESYNC): S.RESYNCHRONIZING,
    ("primary", S.RESYNCHRONIZING, Action.SUSPEND): S.RESYNCHRONIZE_SUSPENDED,
    ("primary", S.RESYNCHRONIZE_SUSPENDED, Action.RESUME): S.RESYNCHRONIZING,
    ("primary", S.RESYNCHRONIZING, Action.COMPLETE_RESYNC): S.REPLICATING,
    ("primary", S.RESYNCHRONIZING, Action.CANCEL_RESYNC): S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.RESYNCHRONIZE_SUSPENDED, Action.CANCEL_RESYNC): S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.WAITING_FOR_START_RESYNCHRONIZE, Action.CANCEL_RESYNC): S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.WAITING_FOR_START_RESYNCHRONIZE, Action.FAIL): S.ERROR,
    ("primary", S.INITIAL_REPLICATION_IN_PROGRESS, Action.COMPLETE_INITIAL_FROM_COPY):
        S.WAITING_FOR_START_RESYNCHRONIZE,
    ("primary", S.RESYNCHRONIZING, Action.FAIL): S.ERROR,
    # Planned failover (docs/failover.md): the primary ships everything, verifies, then ships nothing more.
    # A prepared primary that is fenced keeps its state (no FAIL row): its exports stay closed to writers.
    ("primary", S.REPLICATING, Action.PREPARE_FAILOVER): S.PREPARED_FOR_FAILOVER,
    ("primary", S.PREPARED_FOR_FAILOVER, Action.PREPARE_FAILOVER): S.PREPARED_FOR_FAILOVER,
    ("primary", S.PREPARED_FOR_FAILOVER, Action.CANCEL_FAILOVER): S.REPLICATING,
    ("replica", None, Action.ENABLE): S.WAITING_FOR_INITIAL_REPLICATION,
    ("replica", S.WAITING_FOR_INITIAL_REPLICATION, Action.ENABLE): S.WAITING_FOR_INITIAL_REPLICATION,
    # As in Hyper-V the replica stays WaitingForInitialReplication while the copy runs.  The rows from
    # InitialReplicationInProgress serve replicas recorded in that state by earlier versions.
    ("replica", S.WAITING_FOR_INITIAL_REPLICATION, Action.START_INITIAL): S.WAITING_FOR_INITIAL_REPLICATION,
    ("replica", S.WAITING_FOR_INITIAL_REPLICATION, Action.COMPLETE_INITIAL): S.REPLICATING,
    ("replica", S.INITIAL_REPLICATION_IN_PROGRESS, Action.START_INITIAL): S.INITIAL_REPLICATION_IN_PROGRESS,
    ("replica", S.INITIAL_REPLICATION_IN_PROGRESS, Action.COMPLETE_INITIAL): S.REPLICATING,
    ("replica", S.REPLICATING, Action.COMPLETE_INITIAL): S.REPLICATING,
    ("replica", S.REPLICATING, Action.FAIL): S.ERROR,
    # paused on the replica (hvrctl replica suspend): cycles are still received and stored, none is applied
    ("replica", S.REPLICATING, Action.SUSPEND): S.SUSPENDED,
    ("replica", S.SUSPENDED, Action.RESUME): S.REPLICATING,
    ("replica", S.ERROR, Action.RECOVER): S.REPLICATING,
    # The primary finished a resync: the stored cycles it replaced are dropped, cycles go on from its sequence.
    ("replica", S.REPLICATING, Action.COMPLETE_RESYNC): S.REPLICATING,
    ("replica", S.ERROR, Action.COMPLETE_RESYNC): S.REPLICATING,
    # Failover (docs/state-machine.md): the generation rises with the first step and falls back on cancel.
    # Cancelled from Error it goes back to Replicating: the applier tries the failed cycle again.
    ("replica", S.REPLICATING, Action.FAIL_OVER): S.FAILED_OVER_WAITING_COMPLETION,
    ("replica", S.ERROR, Action.FAIL_OVER): S.FAILED_OVER_WAITING_COMPLETION,
    ("replica", S.FAILED_OVER_WAITING_COMPLETION, Action.CANCEL_FAILOVER): S.REPLICATING,
    ("replica", S.FAILED_OVER_WAITING_COMPLETION, Action.COMPLETE_FAILOVER): S.FAILED_OVER,
}


def transition(role: str, state: S | None, action: Action) -> S:
    try:
        return TRANSITIONS[(role, state, action)]
    except KeyError:
        shown = state.value if state is not None else "not enabled"
        raise InvalidTransition(f"cannot {action.value.replace('_', ' ')} a VM whose {role} replication state "
                                f"is {shown}", hint=f"what a {shown} VM allows is in docs/state-machine.md; "
                                                    "hvrctl vm get NAME (or replica get NAME) shows its state "
                                                    "and why") from None


def allowed_actions(role: str, state: S | None) -> list[Action]:
    return [a for (r, s, a) in TRANSITIONS if r == role and s == state]


class Step(enum.StrEnum):
    """What a relationship's task runs while the relationship is in a state."""

    WAIT_FOR_SCHEDULE = "wait_for_schedule"  # start the initial copy when its scheduled time comes
    INITIAL_COPY = "initial_copy"  # the initial cut and the copy of the images
    CYCLES = "cycles"  # cut, build and ship cycles
    WAIT_FOR_IMPORT = "wait_for_import"  # ask the replica whether the media was imported, then complete
    WAIT_FOR_RESYNC = "wait_for_resync"  # start the resync when its time comes (at once, --at, the window)
    RESYNC = "resync"  # compare the disks with the replica, re-journal what differs
    IDLE = "idle"  # nothing: wait until a verb changes the state


# (role, state) -> the step the relationship's task runs in that state.  Every primary state has a row;
# the states reserved for failover have no transitions yet, so they idle.
STEPS: dict[tuple[str, S], Step] = {
    ("primary", S.READY_FOR_INITIAL_REPLICATION): Step.WAIT_FOR_SCHEDULE,
    ("primary", S.INITIAL_REPLICATION_IN_PROGRESS): Step.INITIAL_COPY,
    ("primary", S.REPLICATING): Step.CYCLES,
    ("primary", S.WAITING_FOR_INITIAL_REPLICATION): Step.WAIT_FOR_IMPORT,
    ("primary", S.SUSPENDED): Step.IDLE,
    ("primary", S.ERROR): Step.IDLE,
    ("primary", S.WAITING_FOR_START_RESYNCHRONIZE): Step.WAIT_FOR_RESYNC,
    ("primary", S.RESYNCHRONIZING): Step.RESYNC,
    ("primary", S.RESYNCHRONIZE_SUSPENDED): Step.IDLE,
    ("primary", S.PREPARED_FOR_FAILOVER): Step.IDLE,
    ("primary", S.FAILED_OVER_WAITING_COMPLETION): Step.IDLE,
    ("primary", S.FAILED_OVER): Step.IDLE,
}


def step_for(role: str, state: S) -> Step:
    """The step to run; a (role, state) without a row has nothing to run (``IDLE``), so a task never spins."""
    return STEPS.get((role, state), Step.IDLE)
