"""The pure Measure-VMReplication and health rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hvr_common.pure.health import Health, replication_health
from hvr_common.pure.measure import NS, CycleResult, CycleStat, measure, missed_intervals, result_for
from hvr_common.pure.replication_state import ReplicationState as S

NOW = 1_800_000_000 * NS
F = 30


def ok(seq: int, age_s: float, latency_s: float = 2.0, size: int = 1000) -> CycleStat:
    finished = NOW - int(age_s * NS)
    return CycleStat(seq, finished - int(latency_s * NS), finished, size, size * 2, CycleResult.OK)


def missed(age_s: float, seq: int | None = None) -> CycleStat:
    t = NOW - int(age_s * NS)
    return CycleStat(seq, t - F * NS, t, 0, 0, CycleResult.MISSED, "replica unreachable")


def error(age_s: float) -> CycleStat:
    t = NOW - int(age_s * NS)
    return CycleStat(None, t, t, 0, 0, CycleResult.ERROR, "replica_unavailable: connection refused")


def test_result_for_and_missed_intervals():
    assert result_for(0, F * NS, F) is CycleResult.OK
    assert result_for(0, F * NS + 1, F) is CycleResult.MISSED
    assert missed_intervals(0, F * NS, F) == 0
    assert missed_intervals(0, 2 * F * NS, F) == 1
    assert missed_intervals(0, 3 * F * NS + 5, F) == 2


def test_measure_fields():
    rows = [ok(1, 100, 1.0, 100), ok(2, 70, 3.0, 300), missed(40), error(35),
            CycleStat(3, NOW - 50 * NS, NOW - 5 * NS, 500, 600, CycleResult.MISSED)]
    m = measure(rows, now_ns=NOW, pending_bytes=4096)
    assert m.AverageReplicationSize == 300
    assert m.MaximumReplicationSize == 500
    assert m.AverageReplicationLatency == round((1 + 3 + 45) / 3, 3)
    assert m.MaximumReplicationLatency == 45.0
    assert m.SuccessfulReplicationCount == 2
    assert m.MissedReplicationCount == 2
    assert m.ReplicationErrors == 1
    assert m.PendingReplicationSize == 4096
    assert m.LastReplicationTime == NOW - 5 * NS
    assert set(m.to_dict()) >= {"AverageReplicationSize", "MaximumReplicationSize", "AverageReplicationLatency",
                                "MaximumReplicationLatency", "SuccessfulReplicationCount",
                                "MissedReplicationCount", "PendingReplicationSize", "LastReplicationTime",
                                "ReplicationErrors"}


def test_measure_of_nothing_and_rows_outside_the_window():
    m = measure([ok(1, 13 * 3600)], now_ns=NOW, pending_bytes=0, last_replication_ns=NOW - 13 * 3600 * NS)
    assert m.SuccessfulReplicationCount == 0
    assert m.AverageReplicationSize is None and m.MaximumReplicationLatency is None
    assert m.LastReplicationTime == NOW - 13 * 3600 * NS  # the newest ever, even if older than the window


rows_strategy = st.lists(st.builds(
    CycleStat,
    sequence=st.one_of(st.none(), st.integers(1, 10_000)),
    started_ns=st.integers(NOW - 20 * 3600 * NS, NOW),
    finished_ns=st.integers(NOW - 20 * 3600 * NS, NOW),
    wire_bytes=st.integers(0, 1 << 40),
    raw_bytes=st.integers(0, 1 << 40),
    result=st.sampled_from(list(CycleResult)),
    error=st.none()), max_size=60)


@given(rows_strategy)
def test_measure_counts_add_up_and_bounds_hold(rows):
    m = measure(rows, now_ns=NOW, pending_bytes=0)
    in_window = [r for r in rows if (r.finished_ns if r.finished_ns is not None else r.started_ns)
                 >= NOW - 12 * 3600 * NS]
    assert m.SuccessfulReplicationCount + m.MissedReplicationCount + m.ReplicationErrors <= len(in_window)
    assert m.ReplicationErrors == sum(r.result is CycleResult.ERROR for r in in_window)
    if m.AverageReplicationSize is not None:
        assert m.AverageReplicationSize <= m.MaximumReplicationSize + 1
    if m.AverageReplicationLatency is not None:
        assert m.AverageReplicationLatency <= m.MaximumReplicationLatency + 0.001


def health(state, rows=(), last_ack_age_s=None, since_age_s=600):
    return replication_health(state, frequency_s=F, rows=list(rows), now_ns=NOW,
                              last_ack_ns=None if last_ack_age_s is None else NOW - int(last_ack_age_s * NS),
                              replicating_since_ns=NOW - since_age_s * NS, state_detail="boom")


def test_normal_when_cycles_flow():
    rows = [ok(i, 30 * i) for i in range(1, 20)]
    assert health(S.REPLICATING, rows, last_ack_age_s=30).health is Health.NORMAL


def test_critical_in_error_or_after_two_silent_intervals():
    r = health(S.ERROR)
    assert r.health is Health.CRITICAL and "boom" in r.details[0]
    assert health(S.REPLICATING, last_ack_age_s=2 * F).health is Health.CRITICAL
    assert health(S.REPLICATING, last_ack_age_s=2 * F - 1).health is Health.NORMAL
    # no acknowledgement yet: counted from the end of the initial copy
    assert health(S.REPLICATING, since_age_s=3 * F).health is Health.CRITICAL
    assert health(S.REPLICATING, since_age_s=F).health is Health.NORMAL
    assert health(S.WAITING_FOR_START_RESYNCHRONIZE).health is Health.CRITICAL


def test_warning_for_missed_cycles_errors_or_suspension():
    rows = [ok(i, 30 * i) for i in range(1, 9)] + [missed(45), missed(75)]  # 2 of 10 missed: exactly 20%
    assert health(S.REPLICATING, rows, last_ack_age_s=10).health is Health.NORMAL
    rows.append(missed(100))  # 3 of 11
    r = health(S.REPLICATING, rows, last_ack_age_s=10)
    assert r.health is Health.WARNING and "missed" in r.details[0]
    assert health(S.REPLICATING, [ok(1, 10), error(20)], last_ack_age_s=10).health is Health.WARNING
    assert health(S.REPLICATING, [ok(1, 10), error(3700)], last_ack_age_s=10).health is Health.NORMAL
    assert health(S.SUSPENDED).health is Health.WARNING


@given(rows_strategy, st.sampled_from(list(S)))
def test_error_state_is_always_critical_and_health_is_always_one_of_three(rows, state):
    r = replication_health(state, frequency_s=F, rows=rows, now_ns=NOW, last_ack_ns=None,
                           replicating_since_ns=None)
    assert r.health in set(Health)
    if state is S.ERROR:
        assert r.health is Health.CRITICAL
    if r.health is not Health.NORMAL:
        assert r.details
