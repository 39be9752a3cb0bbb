"""Bandwidth caps: rates, the time-of-day schedule (boundaries, midnight wrap), the token bucket."""

from __future__ import annotations

import pytest

from hvr_common.pure.bandwidth import (
    DAY_S, MIN_RATE_BYTES_PER_S, BandwidthSchedule, format_rate, parse_rate, parse_schedule_text,
    parse_time_of_day,
)
from hvr_common.pure.token_bucket import BURST_S, TokenBucket
from hvr_common.pure.transfer_settings import TransferSettings, parse_transfer_config

MiB = 1024 * 1024


@pytest.mark.parametrize("text, rate", [
    ("50MiB/s", 50 * MiB), ("10MiB/s", 10 * MiB), ("800KB/s", 800_000), ("1GiB/s", 1024 ** 3),
    ("2.5MB/s", 2_500_000), ("64KiB/s", 64 * 1024), (" 3 mib / s ", 3 * MiB), (1_000_000, 1_000_000),
    ("unlimited", None), ("none", None), (None, None), ("1GB/s", 10 ** 9),
])
def test_rates_parse(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["50MiB", "fast", "10 MiB/h", "-1MiB/s", "", "63KiB/s", 1000, True, 1.5e6, "1TB/s"])
def test_bad_rates_are_refused(text):
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize("rate, text", [(50 * MiB, "50MiB/s"), (800_000, "800KB/s"), (None, "unlimited"),
                                        (1024 ** 3, "1GiB/s"), (100_001, "100001B/s")])
def test_rates_format_back(rate, text):
    assert format_rate(rate) == text
    assert parse_rate(text) == rate


def test_times_of_day():
    assert parse_time_of_day("00:00") == 0
    assert parse_time_of_day("08:30") == 8 * 3600 + 30 * 60
    assert parse_time_of_day("23:59") == DAY_S - 60
    assert parse_time_of_day("24:00", end=True) == 0
    for bad in ("24:00", "8", "08:60", "25:00", "8h", None):
        with pytest.raises(ValueError):
            parse_time_of_day(bad)


H = 3600
DAYTIME = BandwidthSchedule.from_json("50MiB/s", [{"start": "08:00", "end": "18:00", "limit": "10MiB/s"},
                                                   {"start": "22:00", "end": "06:00", "limit": "unlimited"}])

# (second of the day, cap in force)
BOUNDARIES = [
    (0, None),                    # inside the window that wraps past midnight
    (6 * H - 0.001, None),        # its last instant
    (6 * H, 50 * MiB),            # its end: back to the limit
    (8 * H - 1, 50 * MiB),
    (8 * H, 10 * MiB),            # a window covers its start ...
    (18 * H - 0.001, 10 * MiB),
    (18 * H, 50 * MiB),           # ... and not its end
    (22 * H - 1, 50 * MiB),
    (22 * H, None),
    (DAY_S - 0.001, None),        # the wrap: last instant of the day
    (DAY_S, None),                # midnight again (seconds are taken modulo a day)
    (DAY_S + 8 * H, 10 * MiB),
]


@pytest.mark.parametrize("second, rate", BOUNDARIES)
def test_the_schedule_switches_caps_at_its_boundaries(second, rate):
    assert DAYTIME.rate_at(second) == rate


@pytest.mark.parametrize("second, to_change", [(0, 6 * H), (6 * H, 2 * H), (7 * H, H), (8 * H, 10 * H),
                                               (23 * H, 7 * H), (DAY_S - 1, 6 * H + 1)])
def test_seconds_to_the_next_boundary(second, to_change):
    assert DAYTIME.seconds_to_change(second) == to_change


def test_a_window_may_end_at_midnight():
    s = BandwidthSchedule.from_json(None, [{"start": "20:00", "end": "24:00", "limit": "1MiB/s"}])
    assert s.rate_at(20 * H) == MiB and s.rate_at(DAY_S - 1) == MiB
    assert s.rate_at(0) is None and s.rate_at(20 * H - 1) is None
    assert s.to_json() == {"limit": "unlimited", "schedule": [{"start": "20:00", "end": "00:00", "limit": "1MiB/s"}]}
    assert s.seconds_to_change(12 * H) == 8 * H
    assert BandwidthSchedule().seconds_to_change(5) == DAY_S
    assert not BandwidthSchedule().capped and s.capped


def test_a_schedule_round_trips_through_json():
    doc = DAYTIME.to_json()
    assert BandwidthSchedule.from_json(doc["limit"], doc["schedule"]) == DAYTIME


@pytest.mark.parametrize("schedule, problem", [
    ([{"start": "08:00", "end": "18:00", "limit": "1MiB/s"}, {"start": "17:00", "end": "19:00", "limit": "2MiB/s"}],
     "schedule[1]: overlaps an earlier window (at 17:00)"),
    ([{"start": "22:00", "end": "06:00", "limit": "1MiB/s"}, {"start": "05:00", "end": "07:00", "limit": "2MiB/s"}],
     "schedule[1]: overlaps"),
    ([{"start": "08:00", "end": "08:00", "limit": "1MiB/s"}], "empty window"),
    ([{"start": "08:00", "end": "09:00"}], "limit is required"),
    ([{"start": "08:00", "end": "09:00", "limit": "1MiB/s", "days": "mon"}], "schedule[0].days: unknown key"),
    ([{"start": "8", "end": "09:00", "limit": "1MiB/s"}], "not a time of day"),
    ("08:00-09:00", "must be a list"),
    (["08:00"], "must be a table"),
])
def test_bad_schedules_are_refused_with_their_key(schedule, problem):
    with pytest.raises(ValueError, match="bandwidth.schedule") as info:
        BandwidthSchedule.from_json("1MiB/s", schedule)
    assert problem in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        BandwidthSchedule.from_json("slow", [{"start": "08:00", "end": "08:00", "limit": "1MiB/s"}])
    assert "bandwidth.limit" in str(info.value) and "empty window" in str(info.value)


def test_the_command_line_schedule():
    assert parse_schedule_text("08:00-18:00=10MiB/s, 22:00-06:00=unlimited") == [
        {"start": "08:00", "end": "18:00", "limit": "10MiB/s"},
        {"start": "22:00", "end": "06:00", "limit": "unlimited"}]
    assert parse_schedule_text("none") == []
    with pytest.raises(ValueError, match="START-END=RATE"):
        parse_schedule_text("08:00=10MiB/s")


# --- the token bucket -------------------------------------------------------------------------
def test_a_full_bucket_lets_its_burst_go_at_once_then_paces():
    b = TokenBucket(10 * MiB, 100.0)
    assert b.take(int(10 * MiB * BURST_S), 100.0) == 0.0
    assert b.take(MiB, 100.0) == pytest.approx(0.1)  # debt: a tenth of a second at 10 MiB/s
    assert b.take(MiB, 100.1) == pytest.approx(0.1)  # the first debt paid, the new one waits


def test_the_long_run_rate_is_the_cap_whatever_the_piece_sizes():
    rate = 4 * MiB
    b = TokenBucket(rate, 0.0)
    now = 0.0
    sent = 0
    for i in range(2000):
        size = (i * 7919) % (3 * MiB) + 1
        now += b.take(size, now)
        sent += size
    assert sent / now == pytest.approx(rate, rel=0.01)


def test_a_rate_change_keeps_the_debt_and_clamps_the_saving():
    b = TokenBucket(MiB, 0.0)
    assert b.take(2 * MiB, 0.0) == pytest.approx(2 - BURST_S)
    b.set_rate(2 * MiB, 0.0)  # the debt is paid at the new rate
    assert b.take(0, 0.0) == pytest.approx((2 - BURST_S) / 2)
    b = TokenBucket(10 * MiB, 0.0)
    b.set_rate(MiB, 0.0)
    assert b.tokens == pytest.approx(MiB * BURST_S)


def test_a_clock_stepping_back_adds_no_tokens():
    b = TokenBucket(MiB, 10.0)
    b.take(MiB, 10.0)
    before = b.tokens
    b.take(0, 5.0)
    assert b.tokens == before


def test_the_bucket_refuses_a_rate_of_nothing():
    with pytest.raises(ValueError):
        TokenBucket(0, 0.0)


# --- the transfer settings ---------------------------------------------------------------------
def test_transfer_settings_from_agent_toml():
    problems: list[str] = []
    s = parse_transfer_config({"bandwidth": {"limit": "50MiB/s", "schedule": [
        {"start": "08:00", "end": "18:00", "limit": "10MiB/s"}]}, "max_active_transfers": 5}, problems)
    assert problems == []
    assert s.max_active_transfers == 5 and s.bandwidth.rate_at(9 * H) == 10 * MiB
    assert parse_transfer_config({}, problems) == TransferSettings() and TransferSettings().max_active_transfers == 3
    parse_transfer_config({"bandwidth": {"limit": "x", "burst": 1}, "max_active_transfers": 0}, problems)
    assert any(p.startswith("bandwidth.limit:") for p in problems)
    assert "bandwidth.burst: unknown key" in problems
    assert any(p.startswith("max_active_transfers:") for p in problems)


def test_transfer_settings_change_whole_or_not_at_all():
    s = TransferSettings()
    t = s.changed({"bandwidth_limit": "20MiB/s", "max_active_transfers": 2})
    assert t.bandwidth.limit == 20 * MiB and t.max_active_transfers == 2 and t.bandwidth.windows == ()
    u = t.changed({"bandwidth_schedule": [{"start": "01:00", "end": "02:00", "limit": "1MiB/s"}]})
    assert u.bandwidth.limit == 20 * MiB and len(u.bandwidth.windows) == 1  # the limit stays
    assert u.to_json()["bandwidth_schedule"] == [{"start": "01:00", "end": "02:00", "limit": "1MiB/s"}]
    with pytest.raises(ValueError) as info:
        t.changed({"bandwidth_limit": "x", "max_active_transfers": 2000, "speed": 1})
    text = str(info.value)
    assert "bandwidth.limit" in text and "max_active_transfers" in text and "speed: unknown setting" in text
    assert MIN_RATE_BYTES_PER_S == 64 * 1024
