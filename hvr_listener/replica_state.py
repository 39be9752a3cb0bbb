"""A replica's replication state: the one module that changes it.

Every change of a replica's ``state`` (and of what a change sets with it:
``state_detail``, the initial offset a stored window moves, the sequences the
completed initial copy starts from) is decided here by
:func:`hvr_common.pure.replication_state.transition` with role ``replica``
and then persisted by the store; no other module calls the store methods that
write the state (``tests/unit/test_layering.py`` checks it).

Each change is conditional: it is written only while the replica is the one
the decision was made about (its ``created_ns``) and still in the state the
decision started from, so a replica removed (and perhaps enabled again)
meanwhile is left alone.

| event | who | action |
|---|---|---|
| a primary enables a new replica | :mod:`hvr_listener.enablement` | ``enable`` |
| an initial window became durable | :mod:`hvr_listener.initial_copy` | ``start_initial`` |
| initial-replication media was imported | :mod:`hvr_listener.initial_import` | ``start_initial`` |
| the primary completes the initial copy | :mod:`hvr_listener.initial_copy` | ``complete_initial`` |
| a stored cycle cannot be applied | :mod:`hvr_listener.applier` | ``fail`` |
| the operator resumes a replica in Error | :mod:`hvr_listener.operator_verbs` | ``recover`` |
| the operator fails over / cancels / completes | :mod:`hvr_listener.failover` | ``fail_over`` / ``cancel_failover`` / ``complete_failover`` |

The methods block (SQLite): call them in a worker thread.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from hvr_common.pure.authorization import DEFAULT_TRUST_GROUP
from hvr_common.pure.failover import Failover
from hvr_common.pure.replication_state import TRANSITIONS, Action, ReplicationState, transition
from hvr_listener.store import ListenerStore, Replica

ROLE = "replica"


def enabled_again_unchanged(rep: Replica) -> bool:
    """Whether enabling ``rep`` again (same settings) is the same enabling, answered without a change.

    Only a replica that received nothing yet: its state takes ``enable`` again
    and no initial window became durable.
    """
    return (ROLE, rep.state, Action.ENABLE) in TRANSITIONS and all(d.initial_offset == 0 for d in rep.disks)


def _window_stored(state: ReplicationState) -> ReplicationState | None:
    """The state a replica in ``state`` takes when an initial window became durable; None: the window
    does not count (the replica is not in initial replication)."""
    if (ROLE, state, Action.START_INITIAL) not in TRANSITIONS:
        return None
    return transition(ROLE, state, Action.START_INITIAL)


class ReplicaStates:
    """Decides every change of a replica's state and has the store persist it."""

    def __init__(self, store: ListenerStore):
        self.store = store

    def enable(self, vm_id: uuid.UUID, name: str, principal: str, generation: int, frequency_s: int,
               compression: bool, storage_dir: Path, disks: list[tuple[uuid.UUID, str, int, Path]],
               trust_group: str = DEFAULT_TRUST_GROUP) -> None:
        """Record a new replica (its images exist already) of the creating primary's ``trust_group``."""
        state = transition(ROLE, None, Action.ENABLE)
        self.store.create_replica(vm_id, name, principal, generation, frequency_s, compression, storage_dir, disks,
                                  state=state, trust_group=trust_group)

    def window_stored(self, rep: Replica, disk_id: uuid.UUID, generation: int, start: int,
                      end: int) -> tuple[int, ReplicationState, int] | None:
        """An initial window ``[start, end)`` of a disk of ``rep`` is durable in its image.

        In one store transaction: the disk's durable offset moves to ``end`` and
        the replica stays ``WaitingForInitialReplication`` (as in Hyper-V), if the replica is still
        ``rep``, at ``generation``, in initial replication and the offset lies in
        ``[start, end)``. Returns (generation, state, offset) afterwards, or None
        if the replica or the disk is gone.
        """
        return self.store.advance_initial_offset(rep.vm_id, rep.created_ns, disk_id, generation, start, end,
                                                 _window_stored)

    def media_loaded(self, rep: Replica) -> bool:
        """Media was imported into every image of ``rep`` (durably): every disk's initial offset is its size and
        the replica is ``InitialReplicationInProgress``, waiting for the primary's completion.

        Raises :class:`InvalidTransition` if ``rep``'s state does not allow it;
        False if the replica changed meanwhile (nothing written).
        """
        state = transition(ROLE, rep.state, Action.START_INITIAL)
        return self.store.mark_loaded(rep.vm_id, rep.created_ns, rep.generation, rep.state, state)

    def complete_initial(self, rep: Replica, next_sequence: int, now_ns: int) -> bool:
        """The initial copy of ``rep`` is complete: it replicates, expecting cycle ``next_sequence``.

        Raises :class:`InvalidTransition` if ``rep``'s state does not allow it;
        False if the replica changed meanwhile (nothing written).
        """
        state = transition(ROLE, rep.state, Action.COMPLETE_INITIAL)
        return self.store.change_replica_state(
            rep.vm_id, rep.created_ns, rep.state, state, next_sequence=next_sequence,
            last_received_sequence=next_sequence - 1, last_applied_sequence=next_sequence - 1,
            last_replication_ns=now_ns, last_applied_ns=now_ns)

    def complete_resync(self, rep: Replica, next_sequence: int) -> list[Path] | None:
        """The primary finished a resync of ``rep``: unapplied stored cycles are dropped, ``next_sequence`` is
        expected next.  Raises :class:`InvalidTransition` if the state does not allow it; None if the replica
        changed meanwhile (nothing written); else the dropped cycles' files."""
        state = transition(ROLE, rep.state, Action.COMPLETE_RESYNC)
        return self.store.rebase_replica(rep.vm_id, rep.created_ns, rep.state, state, next_sequence)

    def fail(self, rep: Replica, detail: str) -> bool:
        """A permanent error (a stored cycle cannot be applied): ``rep`` goes to Error with ``detail``.

        Raises :class:`InvalidTransition` if ``rep``'s state cannot fail; False
        if the replica changed meanwhile (removed, say): nothing is written.
        """
        state = transition(ROLE, rep.state, Action.FAIL)
        return self.store.change_replica_state(rep.vm_id, rep.created_ns, rep.state, state, state_detail=detail)

    def suspend(self, rep: Replica) -> bool:
        """The operator pauses ``rep`` on the replica: cycles are still stored, none is applied.

        Raises :class:`InvalidTransition` unless ``rep`` is Replicating; False if it changed meanwhile.
        """
        state = transition(ROLE, rep.state, Action.SUSPEND)
        return self.store.change_replica_state(rep.vm_id, rep.created_ns, rep.state, state, state_detail=None)

    def resume(self, rep: Replica) -> bool:
        """The operator resumes ``rep`` paused on the replica: the stored cycles are applied."""
        state = transition(ROLE, rep.state, Action.RESUME)
        return self.store.change_replica_state(rep.vm_id, rep.created_ns, rep.state, state, state_detail=None)

    def recover(self, rep: Replica) -> bool:
        """The operator resumes ``rep`` (in Error): it replicates again and its detail is cleared.

        Raises :class:`InvalidTransition` (``wrong_state``) unless ``rep`` is in
        Error; False if the replica changed meanwhile.
        """
        state = transition(ROLE, rep.state, Action.RECOVER)
        return self.store.change_replica_state(rep.vm_id, rep.created_ns, rep.state, state, state_detail=None)

    def fail_over(self, rep: Replica, row: Failover) -> bool:
        """Start-VMFailover: ``rep`` goes to FailedOverWaitingCompletion at ``row.generation`` with its failover
        row, in one transaction.  Raises :class:`InvalidTransition`; False if the replica changed meanwhile."""
        state = transition(ROLE, rep.state, Action.FAIL_OVER)
        return self.store.begin_failover(rep.vm_id, rep.created_ns, rep.state, state, row)

    def cancel_failover(self, rep: Replica, row: Failover) -> bool:
        """Stop-VMFailover: back to Replicating at the generation before the failover; the row goes."""
        state = transition(ROLE, rep.state, Action.CANCEL_FAILOVER)
        return self.store.undo_failover(rep.vm_id, rep.created_ns, rep.state, state, row.old_generation)

    def complete_failover(self, rep: Replica, now_ns: int) -> bool:
        """Complete-VMFailover: FailedOver, the row completed."""
        state = transition(ROLE, rep.state, Action.COMPLETE_FAILOVER)
        return self.store.finish_failover(rep.vm_id, rep.created_ns, rep.state, state, now_ns)
