"""Hyper-V's health rules, one table row at a time, and the monitoring window."""

from __future__ import annotations

import pytest

from hvr_common.pure.errors import UsageError
from hvr_common.pure.health import STATE_RULES, Health, replication_health
from hvr_common.pure.measure import NS, CycleResult, CycleStat
from hvr_common.pure.monitoring import MonitoringSettings, monitoring_settings, parse_start, window

NOW = 1_800_000_000 * NS  # 2027-01-15T08:00:00Z
F = 30
C, W, N = Health.CRITICAL, Health.WARNING, Health.NORMAL

# (role, state, expected level, words the sentence must hold)
STATE_TABLE = [
    ("primary", "Error", C, "in error: boom"),
    ("primary", "WaitingForStartResynchronize", C, "cannot proceed"),
    ("primary", "Resynchronizing", W, "in progress"),
    ("primary", "ResynchronizeSuspended", W, "paused on the primary"),
    ("primary", "Suspended", W, "paused on the primary"),
    ("primary", "ReadyForInitialReplication", W, "Initial replication"),
    ("primary", "InitialReplicationInProgress", W, "Initial replication"),
    ("primary", "PreparedForFailover", W, "not been reversed"),
    ("primary", "FailedOverWaitingCompletion", W, "not been reversed"),
    ("primary", "FailedOver", W, "not been reversed"),
    ("replica", "Error", C, "in error on the replica: boom"),
    ("replica", "WaitingForStartResynchronize", C, "cannot proceed"),
    ("replica", "Resynchronizing", W, "in progress"),
    ("replica", "ResynchronizeSuspended", C, "paused on the replica"),
    ("replica", "Suspended", C, "paused on the replica"),
    ("replica", "WaitingForInitialReplication", W, "Initial replication"),
    ("replica", "InitialReplicationInProgress", W, "Initial replication"),
    ("replica", "FailedOverWaitingCompletion", W, "not been reversed"),
    ("replica", "FailedOver", W, "not been reversed"),
]


def ok(age_s: float, latency_s: float = 2.0, seq: int = 1) -> CycleStat:
    finished = NOW - int(age_s * NS)
    return CycleStat(seq, finished - int(latency_s * NS), finished, 100, 200, CycleResult.OK)


def missed(age_s: float) -> CycleStat:
    t = NOW - int(age_s * NS)
    return CycleStat(None, t - F * NS, t, 0, 0, CycleResult.MISSED)


def health(state, role="primary", rows=(), ack_age_s=10, window_start_ns=None):
    return replication_health(state, frequency_s=F, rows=list(rows), now_ns=NOW,
                              last_ack_ns=None if ack_age_s is None else NOW - int(ack_age_s * NS),
                              replicating_since_ns=NOW - 7200 * NS, state_detail="boom", role=role, vm="web",
                              window_start_ns=window_start_ns)


def test_every_row_of_the_state_table_is_tested():
    assert {(r, s) for r, s, _, _ in STATE_TABLE} == set(STATE_RULES)


@pytest.mark.parametrize("role,state,level,words", STATE_TABLE)
def test_state_rules(role, state, level, words):
    report = health(state, role)
    assert report.health is level
    assert words in report.details[0] and "'web'" in report.details[0]
    assert report.details[0].endswith(".")  # plain sentences


@pytest.mark.parametrize("role", ["primary", "replica"])
def test_replicating_with_cycles_flowing_is_normal(role):
    rows = [ok(30 * i, seq=i) for i in range(1, 30)]
    report = health("Replicating", role, rows)
    assert report.health is N and report.details == ()


def test_primary_critical_when_it_cannot_send_for_two_intervals():
    assert health("Replicating", ack_age_s=2 * F).health is C
    assert health("Replicating", ack_age_s=2 * F - 1).health is N
    # the replica cannot tell a quiet primary from a broken link: only the hour rule applies there
    assert health("Replicating", "replica", ack_age_s=2 * F).health is N


@pytest.mark.parametrize("role,verb", [("primary", "sent"), ("replica", "received")])
def test_warning_an_hour_after_the_last_cycle(role, verb):
    report = health("Replicating", role, ack_age_s=3601)
    assert report.health is (C if role == "primary" else W)
    hour = [d for d in report.details if "more than an hour" in d]
    assert hour and verb in hour[0]
    assert health("Replicating", "replica", ack_age_s=3600).health is N


def test_missed_ratio_counts_only_the_monitoring_window():
    old_misses = [missed(5000 + i) for i in range(10)]
    rows = [ok(30 * i, seq=i) for i in range(1, 9)] + old_misses
    assert health("Replicating", rows=rows, window_start_ns=NOW - 3600 * NS).health is N
    report = health("Replicating", rows=rows, window_start_ns=NOW - 6 * 3600 * NS)
    assert report.health is W and "More than 20 percent" in report.details[0] and "10 of 18" in report.details[0]


def test_missed_ratio_boundary_is_strictly_over_20_percent():
    rows = [ok(30 * i, seq=i) for i in range(1, 9)] + [missed(40), missed(70)]
    assert health("Replicating", rows=rows).health is N
    assert health("Replicating", rows=rows + [missed(100)]).health is W


def test_average_latency_over_the_limit_warns():
    rows = [ok(30 * i, latency_s=250, seq=i) for i in range(1, 5)]
    assert health("Replicating", rows=rows).health is N
    rows.append(ok(10, latency_s=900, seq=9))
    report = health("Replicating", rows=rows)
    assert report.health is W and "latency" in report.details[0]


def test_the_latency_limit_is_the_configured_one():
    rows = [ok(30 * i, latency_s=40, seq=i) for i in range(1, 5)]
    assert replication_health("Replicating", frequency_s=F, rows=rows, now_ns=NOW, last_ack_ns=NOW - 10 * NS,
                              replicating_since_ns=NOW - 7200 * NS, vm="web").health is N  # 5 minutes
    report = replication_health("Replicating", frequency_s=F, rows=rows, now_ns=NOW, last_ack_ns=NOW - 10 * NS,
                                replicating_since_ns=NOW - 7200 * NS, vm="web", latency_limit_s=30)
    assert report.health is W and "over the limit of 30 s" in report.details[0]


def test_a_failed_upload_in_the_last_hour_warns_in_any_state():
    failed = CycleStat(None, NOW - 20 * NS, NOW - 20 * NS, 0, 0, CycleResult.ERROR, "replica_unavailable")
    assert health("Replicating", rows=[ok(10), failed]).health is W
    report = health("Suspended", rows=[failed])
    assert report.health is W and len(report.details) == 2


def test_worst_first_and_every_sentence_kept():
    report = health("Replicating", rows=[missed(10), missed(20), ok(30)], ack_age_s=4000)
    assert report.health is C
    assert "cannot send" in report.details[0]
    assert any("more than an hour" in d for d in report.details)
    assert any("More than 20 percent" in d for d in report.details)


def test_transitions_of_health_follow_the_state():
    """A VM's life: each change of state moves its health the way Hyper-V's does."""
    life = [("ReadyForInitialReplication", W), ("InitialReplicationInProgress", W), ("Replicating", N),
            ("Suspended", W), ("Replicating", N), ("Error", C), ("Replicating", N),
            ("WaitingForStartResynchronize", C), ("Resynchronizing", W), ("Replicating", N)]
    assert [health(state).health for state, _ in life] == [level for _, level in life]


# --- the monitoring window ---------------------------------------------------------------------
HOUR = 3600 * NS


def test_the_window_is_fixed_on_the_clock_not_now_minus_the_interval():
    day = NOW - NOW % (86400 * NS)  # 00:00 UTC of NOW's day; NOW is 08:00
    assert window(NOW, MonitoringSettings()) == (day, day + 12 * HOUR)
    assert window(day + 13 * HOUR, MonitoringSettings()) == (day + 12 * HOUR, day + 24 * HOUR)
    nine = MonitoringSettings(12 * 3600, 9 * 3600)
    assert window(NOW, nine) == (day - 3 * HOUR, day + 9 * HOUR)  # 21:00 the day before to 09:00
    assert window(day + 9 * HOUR, nine) == (day + 9 * HOUR, day + 21 * HOUR)
    assert window(NOW, MonitoringSettings(24 * 3600, 6 * 3600)) == (day + 6 * HOUR, day + 30 * HOUR)


def test_a_reset_starts_a_new_collection_inside_the_window():
    s = MonitoringSettings()
    start, end = window(NOW, s)
    assert window(NOW, s, reset_ns=NOW - HOUR) == (NOW - HOUR, end)
    assert window(NOW, s, reset_ns=start - HOUR) == (start, end)  # a reset of an earlier window is over


def test_monitoring_settings_are_validated():
    assert monitoring_settings({}) == MonitoringSettings(12 * 3600, 0)
    got = monitoring_settings({"monitoring_interval_s": 6 * 3600, "monitoring_start": "09:30"})
    assert got == MonitoringSettings(6 * 3600, 9 * 3600 + 1800) and got.start == "09:30"
    assert got.to_dict() == {"monitoring_interval_s": 21600, "monitoring_start": "09:30", "latency_limit_s": 300}
    assert monitoring_settings({"latency_limit_s": 30}).latency_limit_s == 30
    for bad in ({"monitoring_interval_s": 1800}, {"monitoring_interval_s": 8 * 86400},
                {"monitoring_interval_s": 5400}, {"monitoring_interval_s": True},
                {"monitoring_start": "9:30"}, {"monitoring_start": "24:00"}, {"monitoring_start": "12:60"},
                {"latency_limit_s": 0}, {"latency_limit_s": 86401}, {"latency_limit_s": 1.5},
                {"latency_limit_s": True}, {"latency_limit_s": "300"}):
        with pytest.raises(UsageError):
            monitoring_settings(bad)
    assert parse_start("23:59") == 86340
    with pytest.raises(UsageError) as refused:  # said in the operator's words as well as the field's
        monitoring_settings({"monitoring_interval_s": 0})
    assert "--monitoring-interval 12h" in refused.value.hint and "monitoring interval" in refused.value.message


def test_the_replica_view_from_its_own_record():
    from hvr_common.pure.health import replica_health

    def view(state, received_age_s):
        return replica_health(state, name="web", frequency_s=F, last_received_ns=NOW - received_age_s * NS,
                              last_applied_ns=NOW - received_age_s * NS, state_detail=None, now_ns=NOW)
    assert view("Replicating", 60).health is N
    late = view("Replicating", 3700)
    assert late.health is W and "received" in late.details[0]
    assert view("Suspended", 10).health is C
    assert view("WaitingForInitialReplication", 10).health is W


def test_a_statistics_reset_clears_the_warnings_of_the_window():
    """Reset-VMReplicationStatistics: Warning becomes Normal (the window starts at the reset)."""
    failed = CycleStat(None, NOW - 600 * NS, NOW - 600 * NS, 0, 0, CycleResult.ERROR, "replica_unavailable")
    rows = [ok(30 * i, seq=i) for i in range(1, 5)] + [missed(700 + i) for i in range(5)] + [failed]
    assert health("Replicating", rows=rows).health is W
    assert health("Replicating", rows=rows, window_start_ns=NOW - 300 * NS).health is N
