"""The replication state table: every listed transition works, every other one raises; every primary
state names the step its task runs."""

from __future__ import annotations

import itertools

import pytest

from hvr_common.pure.replication_state import (
    STEPS, TRANSITIONS, Action, InvalidTransition, ReplicationState, Step, allowed_actions, step_for, transition,
)

ROLES = ("primary", "replica")
STATES = [None, *ReplicationState]
ALL = list(itertools.product(ROLES, STATES, Action))


@pytest.mark.parametrize("role,state,action", [k for k in ALL if k in TRANSITIONS],
                         ids=lambda v: getattr(v, "value", str(v)))
def test_every_listed_transition_works(role, state, action):
    assert transition(role, state, action) is TRANSITIONS[(role, state, action)]
    assert action in allowed_actions(role, state)


@pytest.mark.parametrize("role,state,action", [k for k in ALL if k not in TRANSITIONS],
                         ids=lambda v: getattr(v, "value", str(v)))
def test_every_other_transition_raises(role, state, action):
    with pytest.raises(InvalidTransition) as info:
        transition(role, state, action)
    assert info.value.code == "wrong_state"
    assert (state.value if state else "not enabled") in info.value.message
    assert "docs/state-machine.md" in info.value.hint  # what to do, not only what is wrong
    assert action not in allowed_actions(role, state)


def test_the_table_only_names_known_roles_states_and_actions():
    for (role, state, action), new in TRANSITIONS.items():
        assert role in ROLES and (state is None or state in ReplicationState)
        assert action in Action and new in ReplicationState


def test_primary_lifecycle_end_to_end():
    s = transition("primary", None, Action.ENABLE)
    assert s == "ReadyForInitialReplication"
    for action, expected in [(Action.START_INITIAL, "InitialReplicationInProgress"),
                             (Action.FAIL, "Error"),
                             (Action.START_INITIAL, "InitialReplicationInProgress"),
                             (Action.COMPLETE_INITIAL, "Replicating"),
                             (Action.SUSPEND, "Suspended"), (Action.RESUME, "Replicating"),
                             (Action.FAIL, "Error"), (Action.RESUME, "Replicating")]:
        s = transition("primary", s, action)
        assert s == expected


def test_states_serialise_as_hyper_v_names():
    assert str(ReplicationState.READY_FOR_INITIAL_REPLICATION) == "ReadyForInitialReplication"
    assert ReplicationState("WaitingForInitialReplication") is ReplicationState.WAITING_FOR_INITIAL_REPLICATION


def test_replica_lifecycle_end_to_end():
    """The listener's path: enabled, windows stored, initial copy completed, a cycle that cannot be
    applied, the operator's resume."""
    s = transition("replica", None, Action.ENABLE)
    assert s == "WaitingForInitialReplication"
    for action, expected in [(Action.ENABLE, "WaitingForInitialReplication"),
                             (Action.START_INITIAL, "WaitingForInitialReplication"),  # as in Hyper-V
                             (Action.START_INITIAL, "WaitingForInitialReplication"),
                             (Action.COMPLETE_INITIAL, "Replicating"),
                             (Action.COMPLETE_INITIAL, "Replicating"),
                             (Action.FAIL, "Error"), (Action.RECOVER, "Replicating")]:
        s = transition("replica", s, action)
        assert s == expected


@pytest.mark.parametrize("state", [ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                                   ReplicationState.INITIAL_REPLICATION_IN_PROGRESS, ReplicationState.ERROR])
def test_a_replica_fails_only_while_replicating(state):
    """Only the applier fails a replica, and it applies only Replicating ones: an initial window
    that cannot be stored is refused to its sender, the state stays."""
    with pytest.raises(InvalidTransition):
        transition("replica", state, Action.FAIL)


@pytest.mark.parametrize("state", [None, *(s for s in ReplicationState if s is not ReplicationState.ERROR)])
def test_the_operator_resumes_a_replica_only_from_error(state):
    assert Action.RECOVER not in allowed_actions("replica", state)
    with pytest.raises(InvalidTransition) as info:
        transition("replica", state, Action.RECOVER)
    assert "cannot recover" in info.value.message


def test_a_replica_waits_for_initial_replication_until_the_copy_completes():
    """As in Hyper-V the replica shows WaitingForInitialReplication during the whole copy (the listener
    refuses the completion while a disk is short of its end); a replica recorded
    InitialReplicationInProgress by an earlier version still completes."""
    waiting = ReplicationState.WAITING_FOR_INITIAL_REPLICATION
    assert transition("replica", waiting, Action.START_INITIAL) is waiting
    assert transition("replica", waiting, Action.COMPLETE_INITIAL) is ReplicationState.REPLICATING
    assert transition("replica", ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
                      Action.COMPLETE_INITIAL) is ReplicationState.REPLICATING
    with pytest.raises(InvalidTransition):
        transition("replica", ReplicationState.REPLICATING, Action.START_INITIAL)


# --- the step each state runs ---------------------------------------------------------------
PRIMARY_STATES = list(ReplicationState)
EXPECTED_STEPS = {
    ReplicationState.READY_FOR_INITIAL_REPLICATION: Step.WAIT_FOR_SCHEDULE,
    ReplicationState.INITIAL_REPLICATION_IN_PROGRESS: Step.INITIAL_COPY,
    ReplicationState.REPLICATING: Step.CYCLES,
    ReplicationState.WAITING_FOR_INITIAL_REPLICATION: Step.WAIT_FOR_IMPORT,  # exported to media
    ReplicationState.WAITING_FOR_START_RESYNCHRONIZE: Step.WAIT_FOR_RESYNC,
    ReplicationState.RESYNCHRONIZING: Step.RESYNC,
}


@pytest.mark.parametrize("state", PRIMARY_STATES, ids=str)
def test_every_primary_state_has_a_step(state):
    assert ("primary", state) in STEPS
    assert step_for("primary", state) is STEPS[("primary", state)]
    assert step_for("primary", state) is EXPECTED_STEPS.get(state, Step.IDLE)


def test_only_states_with_work_run_something():
    busy = {state for (role, state), step in STEPS.items() if step is not Step.IDLE}
    assert busy == set(EXPECTED_STEPS)
    assert set(STEPS.values()) == set(Step)  # no step is unreachable


def test_every_state_a_primary_transition_reaches_has_a_step():
    reached = {new for (role, _state, _action), new in TRANSITIONS.items() if role == "primary"}
    assert reached <= {state for (role, state) in STEPS if role == "primary"}


@pytest.mark.parametrize("role,state", [("replica", ReplicationState.WAITING_FOR_INITIAL_REPLICATION),
                                        ("replica", ReplicationState.REPLICATING),
                                        ("elsewhere", ReplicationState.REPLICATING)], ids=str)
def test_a_state_without_a_row_idles(role, state):
    assert (role, state) not in STEPS
    assert step_for(role, state) is Step.IDLE


def test_resync_states_follow_hyper_v():
    p, S = "primary", ReplicationState
    assert transition(p, S.REPLICATING, Action.REQUIRE_RESYNC) is S.WAITING_FOR_START_RESYNCHRONIZE
    assert transition(p, S.WAITING_FOR_START_RESYNCHRONIZE, Action.RESYNC) is S.RESYNCHRONIZING
    assert transition(p, S.RESYNCHRONIZING, Action.SUSPEND) is S.RESYNCHRONIZE_SUSPENDED
    assert transition(p, S.RESYNCHRONIZE_SUSPENDED, Action.RESUME) is S.RESYNCHRONIZING
    assert transition(p, S.RESYNCHRONIZING, Action.COMPLETE_RESYNC) is S.REPLICATING
    assert transition(p, S.RESYNCHRONIZING, Action.CANCEL_RESYNC) is S.WAITING_FOR_START_RESYNCHRONIZE
    with pytest.raises(InvalidTransition):
        transition(p, S.RESYNCHRONIZE_SUSPENDED, Action.COMPLETE_RESYNC)
    assert "ResynchronizationRequired" not in {s.value for s in ReplicationState}
