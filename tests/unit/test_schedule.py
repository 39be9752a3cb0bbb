"""The replication schedule: the cut clock, missed cycles, the initial schedule, backoff (pure rules)."""

from __future__ import annotations

import pytest

from hvr_common.pure.schedule import (
    FIRST_BACKOFF_S, FREQUENCIES_S, MAX_BACKOFF_S, NS, Backoff, CutClock, initial_due, initial_is_later,
    initial_wait_s,
)

T0 = 1_700_000_000 * NS  # any instant; the rules never read the clock


def test_frequencies_are_hyper_vs():
    assert FREQUENCIES_S == (30, 300, 900)


@pytest.mark.parametrize("frequency_s", FREQUENCIES_S)
def test_a_started_clock_cuts_one_interval_later(frequency_s):
    clock = CutClock.started(frequency_s, T0)
    assert clock.next_cut_ns == T0 + frequency_s * NS and not clock.sync_requested
    assert not clock.due(T0 + frequency_s * NS - 1)
    assert clock.due(T0 + frequency_s * NS)
    assert clock.seconds_to_cut(T0) == frequency_s
    assert clock.wait_s(T0 + (frequency_s + 5) * NS) == 0.0  # overdue: no negative sleep
    assert clock.seconds_to_cut(T0 + (frequency_s + 5) * NS) == -5


# (frequency_s, seconds after the scheduled cut, cycles pending, sync-now asked)
#   -> (missed cut times as offsets in intervals from the scheduled cut, cut now?, next cut in intervals)
PLANS = [
    # before the cut is due: nothing, unless sync-now asks
    (300, -1, False, False, (), False, 0),
    (300, -1, True, False, (), False, 0),
    (300, -1, False, True, (), True, 0),
    (300, -1, True, True, (), True, 0),
    # on time: cut when nothing is pending
    (30, 0, False, False, (), True, 0),
    (300, 0, False, False, (), True, 0),
    (900, 0, False, False, (), True, 0),
    (300, 299, False, False, (), True, 0),  # late but nothing pending: one cut, no missed cycle
    # a cut due while an earlier cycle waits: that interval is missed, the clock moves on
    (30, 0, True, False, (0,), False, 1),
    (300, 0, True, False, (0,), False, 1),
    (900, 10, True, False, (0,), False, 1),
    # several intervals passed while a cycle waited
    (30, 95, True, False, (0, 1, 2, 3), False, 4),
    (300, 600, True, False, (0, 1, 2), False, 3),
    (900, 900 * 5 - 1, True, False, (0, 1, 2, 3, 4), False, 5),
    # sync-now while cycles wait and a cut is overdue: the misses are counted and the cut is made
    (30, 60, True, True, (0, 1, 2), True, 3),
]


@pytest.mark.parametrize("frequency_s,late_s,pending,sync,missed,cut,next_in", PLANS)
def test_plan(frequency_s, late_s, pending, sync, missed, cut, next_in):
    clock = CutClock(frequency_s, T0, sync_requested=sync)
    now = T0 + late_s * NS
    plan = clock.plan(now, pending)
    step = frequency_s * NS
    assert plan.missed_ns == tuple(T0 + i * step for i in missed)
    assert plan.cut is cut
    assert plan.clock.next_cut_ns == T0 + next_in * step
    assert plan.clock.sync_requested is sync  # the plan decides; the cut itself takes the request
    if missed:
        assert plan.clock.next_cut_ns > now  # the clock is past every missed interval
        assert not plan.clock.due(now)


def test_the_plan_of_a_clock_with_nothing_to_do_changes_nothing():
    clock = CutClock(300, T0)
    assert clock.plan(T0 - NS, pending=True).clock == clock


def test_sync_now_is_answered_by_the_cut_that_begins_after_it():
    clock = CutClock.started(300, T0).with_sync_requested()
    assert clock.wants_cut(T0) and not clock.due(T0)
    begun = clock.cut_begun()
    assert not begun.sync_requested
    asked_during_the_cut = begun.with_sync_requested()  # sync-now while the cut waits for the one before
    made = asked_during_the_cut.cut_made(T0 + 2 * NS)
    assert made.sync_requested  # that request asks for the next cut
    assert made.next_cut_ns == T0 + 2 * NS + 300 * NS


@pytest.mark.parametrize("frequency_s", FREQUENCIES_S)
def test_a_cut_starts_the_next_interval(frequency_s):
    clock = CutClock(frequency_s, T0)
    made = clock.cut_begun().cut_made(T0 + 7 * NS)
    assert made.next_cut_ns == T0 + 7 * NS + frequency_s * NS
    assert made.plan(T0 + 7 * NS, pending=False).cut is False


@pytest.mark.parametrize("frequency_s", FREQUENCIES_S)
def test_after_a_suspension_no_interval_is_missed(frequency_s):
    clock = CutClock(frequency_s, T0)
    resumed_at = T0 + 10 * frequency_s * NS  # ten intervals spent suspended
    restarted = clock.restarted(resumed_at)
    assert restarted.next_cut_ns == resumed_at + frequency_s * NS
    plan = restarted.plan(resumed_at, pending=True)  # logs closed before the suspension: shipped, not missed
    assert plan.missed_ns == () and plan.cut is False
    # without the restart the same moment counts ten missed cycles and more
    assert len(clock.plan(resumed_at, pending=True).missed_ns) == 11


def test_restart_keeps_a_sync_now_request():
    assert CutClock(30, T0, sync_requested=True).restarted(T0).sync_requested


# --- initial replication -------------------------------------------------------------------
@pytest.mark.parametrize("at_ns,now_ns,due,wait_s", [
    (None, T0, False, None),  # not scheduled: wait for the operator
    (T0 + 60 * NS, T0, False, 60.0),
    (T0, T0, True, 0.0),
    (T0 - NS, T0, True, 0.0),
])
def test_initial_schedule(at_ns, now_ns, due, wait_s):
    assert initial_due(at_ns, now_ns) is due
    assert initial_wait_s(at_ns, now_ns) == wait_s


@pytest.mark.parametrize("at_ns,later", [(None, False), (T0 - NS, False), (T0, False), (T0 + 1, True)])
def test_initial_start_at_a_time_still_ahead_schedules_it(at_ns, later):
    assert initial_is_later(at_ns, T0) is later


# --- backoff -------------------------------------------------------------------------------
def test_backoff_doubles_to_its_cap_and_resets():
    backoff = Backoff()
    delays = []
    for _ in range(12):
        delays.append(backoff.delay_s)
        backoff.grow()
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert delays[-1] == MAX_BACKOFF_S == 300.0 and max(delays) == MAX_BACKOFF_S
    backoff.reset()
    assert backoff.delay_s == FIRST_BACKOFF_S == 1.0
