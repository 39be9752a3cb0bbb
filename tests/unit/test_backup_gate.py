"""The backup gate: every condition refuses with its own code; the first that holds decides."""

from __future__ import annotations

import pytest

from hvr_common.pure.backup_gate import (
    PERMANENT_CODES, TRANSIENT_CODES, Admitted, GateInput, Refusal, backup_gate,
)
from hvr_common.pure.recovery_points import Consistency, Point
from hvr_common.pure.wire.error_catalogue import CATALOGUE

P1 = Point(1, 10, 1_000, Consistency.CRASH, True)
P2 = Point(2, 11, 2_000, Consistency.APPLICATION, False)  # older, did not capture: unreachable
P3 = Point(3, 12, 3_000, Consistency.CRASH, True)
LATEST_UNDECIDED = Point(4, 13, 4_000, Consistency.APPLICATION, None)
LATEST_REPLACED = Point(4, 13, 4_000, Consistency.CRASH, False)
POINTS = (P1, P2, P3, LATEST_UNDECIDED)


def gate(**kw) -> Admitted | Refusal:
    base = dict(vm="web", state="Replicating", health="Normal", points=POINTS)
    base.update(kw)
    return backup_gate(GateInput(**base))


@pytest.mark.parametrize("kw, code", [
    (dict(state="Error", state_detail="applying cycle 5 failed"), "backup_apply_failed"),
    (dict(state="WaitingForStartResynchronize"), "backup_resync_required"),
    (dict(state="Resynchronizing"), "backup_resync_running"),
    (dict(state="ResynchronizeSuspended"), "backup_resync_running"),
    (dict(state="WaitingForInitialReplication", points=()), "backup_initial_replication"),
    (dict(state="InitialReplicationInProgress", points=()), "backup_initial_replication"),
    (dict(state="FailedOverWaitingCompletion"), "backup_failover_running"),
    (dict(state="PreparedForFailover"), "backup_failover_running"),
    (dict(failover_running=True), "backup_failover_running"),
    (dict(state="FailedOver"), "wrong_state"),
    (dict(state="Suspended"), "wrong_state"),
    (dict(health="Critical"), "backup_health_critical"),
    (dict(apply_interrupted="No such file or directory"), "backup_apply_interrupted"),
    (dict(points=()), "backup_point_not_applied"),
    (dict(requested_point=5), "backup_point_not_applied"),
    (dict(requested_point=99), "backup_point_not_applied"),
    (dict(requested_point=2), "unknown_recovery_point"),  # kept no pre-images: cannot be reached
    (dict(requested_point=0), "unknown_recovery_point"),  # pruned long ago
    (dict(points=(P1, P3, LATEST_REPLACED)), "recovery_point_changing"),
    (dict(points=(P1, P3, LATEST_REPLACED), requested_point=4), "recovery_point_changing"),
])
def test_each_condition_refuses_with_its_code(kw, code):
    result = gate(**kw)
    assert isinstance(result, Refusal), result
    assert result.code == code and "web" in result.message
    assert CATALOGUE[code].transient is (code in TRANSIENT_CODES)


@pytest.mark.parametrize("kw, point", [
    (dict(), LATEST_UNDECIDED),
    (dict(requested_point=4), LATEST_UNDECIDED),
    (dict(requested_point=1), P1),
    (dict(requested_point=3), P3),
    (dict(health="Warning"), LATEST_UNDECIDED),  # only Critical refuses
    (dict(points=(P1, P3), requested_point=1), P1),
])
def test_a_consistent_point_is_admitted(kw, point):
    assert gate(**kw) == Admitted(point)


def test_the_first_condition_that_holds_decides():
    everything = dict(state="Error", health="Critical", apply_interrupted="disk full", points=(),
                      failover_running=True)
    assert gate(**everything).code == "backup_apply_failed"
    assert gate(**{**everything, "state": "Replicating"}).code == "backup_failover_running"
    assert gate(**{**everything, "state": "Replicating", "failover_running": False}).code == "backup_health_critical"
    assert gate(health="Normal", apply_interrupted="disk full", points=()).code == "backup_apply_interrupted"


def test_every_gate_code_is_catalogued_with_its_transience():
    for code in TRANSIENT_CODES:
        assert CATALOGUE[code].transient and CATALOGUE[code].status == 503, code
    for code in PERMANENT_CODES:
        assert not CATALOGUE[code].transient, code


def test_a_resync_the_primary_runs_refuses_a_backup_though_the_replica_replicates():
    admitted = backup_gate(GateInput(vm="web", state="Replicating", health="Normal", points=(P1, P3)))
    assert isinstance(admitted, Admitted)
    refused = backup_gate(GateInput(vm="web", state="Replicating", health="Normal", points=(P1, P3),
                                    resync_running=True))
    assert refused.code == "backup_resync_running"
