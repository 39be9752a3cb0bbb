"""The failover rules (hvr_common.pure.failover): states, the split-brain guard, the point choice, generations."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from hvr_common.pure.failover import (
    NS, STARTABLE, Failover, FailoverStep, Heartbeat, check_complete, check_restart, check_start, check_stop,
    choose_point, guard, raised_generation,
)
from hvr_common.pure.config import parse_listener_config
from hvr_common.pure.errors import ConfigError
from hvr_common.pure.recovery_points import Point
from hvr_common.pure.replication_state import Action, ReplicationState, transition
from hvr_common.pure.wire.error_catalogue import CATALOGUE

S = ReplicationState


def _row(step=FailoverStep.WAITING_COMPLETION, point_id=3) -> Failover:
    return Failover(point_id, 30, 0, 1, 2, step, 0)


@pytest.mark.parametrize("state", list(S), ids=str)
def test_only_replicating_or_error_replicas_may_fail_over(state):
    if state in STARTABLE:
        check_start("vm1", state, test_failover=False)
        assert transition("replica", state, Action.FAIL_OVER) is S.FAILED_OVER_WAITING_COMPLETION
        return
    with pytest.raises(Exception) as info:
        check_start("vm1", state, test_failover=False)
    assert info.value.code in {"wrong_state", "failover_in_progress", "failover_completed"}
    assert state.value in info.value.message


def test_resync_states_are_refused_with_their_reason():
    with pytest.raises(Exception) as info:
        check_start("vm1", S.RESYNCHRONIZING, test_failover=False)
    assert info.value.code == "wrong_state" and "in sync" in info.value.message


def test_a_running_test_failover_refuses_a_failover():
    with pytest.raises(Exception) as info:
        check_start("vm1", S.REPLICATING, test_failover=True)
    assert info.value.code == "test_failover_running" and "--as-test" in info.value.hint


def test_the_replica_state_table_goes_there_and_back():
    s = transition("replica", S.REPLICATING, Action.FAIL_OVER)
    assert transition("replica", s, Action.CANCEL_FAILOVER) is S.REPLICATING
    assert transition("replica", s, Action.COMPLETE_FAILOVER) is S.FAILED_OVER
    with pytest.raises(Exception):
        transition("replica", S.FAILED_OVER, Action.CANCEL_FAILOVER)


@given(age_s=st.integers(0, 10_000), alive_s=st.integers(1, 3600), running=st.booleans(), force=st.booleans(),
       clients=st.integers(0, 5))
def test_the_guard_refuses_exactly_a_fresh_running_heartbeat_without_force(age_s, alive_s, running, force, clients):
    now = 10**18
    beat = Heartbeat(now - age_s * NS, running, clients)
    refuse = running and not force and age_s < alive_s
    if refuse:
        with pytest.raises(Exception) as info:
            guard("vm1", "siteA.example", beat, now, alive_s, force)
        err = info.value
        assert err.code == "primary_running" and CATALOGUE["primary_running"].status == 409
        assert "siteA.example" in err.message and f"{age_s} s ago" in err.message
        assert "--force" in err.hint and "--prepare" in err.hint
    else:
        guard("vm1", "siteA.example", beat, now, alive_s, force)


def test_no_heartbeat_at_all_lets_the_failover_go():
    guard("vm1", "a", None, 10**18, 30, False)


def test_a_heartbeat_from_the_future_counts_as_fresh():
    with pytest.raises(Exception):
        guard("vm1", "a", Heartbeat(10**18 + 5 * NS, True, 1), 10**18, 30, False)


POINTS = [Point(1, 10, 100, capturing=True), Point(2, 11, 200, capturing=False), Point(3, 12, 300, capturing=True),
          Point(4, 13, 400, capturing=None)]


def test_the_latest_point_by_default_and_any_reachable_one_by_id():
    assert choose_point("vm1", POINTS, None).id == 4
    assert choose_point("vm1", POINTS, 1).id == 1
    assert choose_point("vm1", POINTS, 3).id == 3
    assert choose_point("vm1", POINTS, 4).id == 4


@pytest.mark.parametrize("point_id", [2, 5, 99])
def test_unreachable_or_unknown_points_are_refused(point_id):
    with pytest.raises(Exception) as info:
        choose_point("vm1", POINTS, point_id)
    assert info.value.code == "unknown_recovery_point" and str(point_id) in info.value.message


@pytest.mark.parametrize("bad", [0, -1, True, "3"])
def test_a_point_id_must_be_a_positive_integer(bad):
    with pytest.raises(Exception) as info:
        choose_point("vm1", POINTS, bad)
    assert info.value.code == "bad_request"


def test_the_latest_point_being_replaced_without_capture_is_refused_for_now():
    changing = [*POINTS[:-1], Point(4, 13, 400, capturing=False)]
    with pytest.raises(Exception) as info:
        choose_point("vm1", changing, None)
    assert info.value.code == "recovery_point_changing" and info.value.transient
    assert choose_point("vm1", changing, 3).id == 3


def test_no_point_yet_is_refused():
    with pytest.raises(Exception) as info:
        choose_point("vm1", [], None)
    assert info.value.code == "unknown_recovery_point"


@given(st.integers(1, 2**62))
def test_a_failover_raises_the_generation_and_cancel_restores_it(g):
    new = raised_generation(g)
    assert new > g
    assert Failover(1, 1, 0, g, new, FailoverStep.WAITING_COMPLETION, 0).old_generation == g


def test_repeating_a_start_answers_the_same_failover_and_refuses_another_point():
    check_restart("vm1", _row(), None)
    check_restart("vm1", _row(), 3)
    with pytest.raises(Exception) as info:
        check_restart("vm1", _row(), 1)
    assert info.value.code == "failover_in_progress" and "failover stop" in info.value.hint
    check_restart("vm1", _row(FailoverStep.COMPLETED), 3)
    with pytest.raises(Exception) as info:
        check_restart("vm1", _row(FailoverStep.COMPLETED), 1)
    assert info.value.code == "failover_completed"


def test_stop_until_completed_and_complete_needs_a_failover():
    check_stop("vm1", _row())
    for step in (FailoverStep.COMPLETING, FailoverStep.COMPLETED):
        with pytest.raises(Exception) as info:
            check_stop("vm1", _row(step))
        assert info.value.code == "failover_completed"
    with pytest.raises(Exception) as info:
        check_stop("vm1", None)
    assert info.value.code == "not_failed_over"
    with pytest.raises(Exception) as info:
        check_complete("vm1", None)
    assert info.value.code == "not_failed_over"
    check_complete("vm1", _row(FailoverStep.COMPLETED))


def test_primary_alive_s_in_listener_toml():
    base = {"state_dir": "/var/lib/hvr/listener", "admin_socket": "/run/hvr/listener.sock",
            "listen": "127.0.0.1:8443", "storage": "/srv/replicas"}
    assert parse_listener_config(base).primary_alive_s == 30
    assert parse_listener_config({**base, "primary_alive_s": 90}).primary_alive_s == 90
    for bad in (0, -5, "30", True):
        with pytest.raises(ConfigError) as info:
            parse_listener_config({**base, "primary_alive_s": bad})
        assert any(p.startswith("primary_alive_s:") for p in info.value.problems)
