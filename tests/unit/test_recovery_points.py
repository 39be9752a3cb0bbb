"""Recovery history rules: table tests, and a model run in which every kept point must stay reachable."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from hvr_common.pure.errors import UsageError
from hvr_common.pure.recovery_points import (
    HOUR_NS, NS, DropStep, HistorySettings, Point, StepKind, capture_target, decide_capturing, drop_steps,
    points_to_drop, reach_order, superseded,
)

MIN = 60 * NS


def pt(i, seq=None, t_min=0, capturing=True):
    return Point(i, seq if seq is not None else i, t_min * MIN, capturing=capturing)


# --- settings ---------------------------------------------------------------------------------
def test_settings_defaults_and_round_trip():
    s = HistorySettings.from_json({})
    assert (s.recovery_history, s.fine_window_min, s.app_consistent_hours) == (0, 60, None)
    t = HistorySettings(24, 0, 12)
    assert HistorySettings.from_json(t.to_json()) == t


@pytest.mark.parametrize("body, field", [
    ({"recovery_history": 25}, "recovery_history"),
    ({"recovery_history": -1}, "recovery_history"),
    ({"recovery_history": True}, "recovery_history"),
    ({"recovery_history": "3"}, "recovery_history"),
    ({"fine_window_min": -5}, "fine_window_min"),
    ({"fine_window_min": 1.5}, "fine_window_min"),
    ({"app_consistent_hours": 0}, "app_consistent_hours"),
    ({"app_consistent_hours": 13}, "app_consistent_hours"),
    ({"colour": 1}, "colour"),
])
def test_bad_settings_are_refused_by_name(body, field):
    with pytest.raises(UsageError) as err:
        HistorySettings.from_json(body)
    assert field in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(UsageError) as err:
        HistorySettings.from_json({"recovery_history": 99, "fine_window_min": -1})
    assert "recovery_history" in str(err.value) and "fine_window_min" in str(err.value)


# --- capturing --------------------------------------------------------------------------------
@pytest.mark.parametrize("history, fine, earlier_same_hour, pinned, expected", [
    (0, 0, False, False, False),   # latest point only: nothing to keep
    (0, 0, False, True, True),     # a test failover stands on it
    (0, 60, False, False, True),   # fine window: every cycle is a point
    (4, 0, False, False, True),    # first point of its hour
    (4, 0, True, False, False),    # the hour already has its point
    (4, 0, True, True, True),
])
def test_decide_capturing(history, fine, earlier_same_hour, pinned, expected):
    earlier = [pt(1, t_min=10, capturing=True)] if earlier_same_hour else [pt(1, t_min=-50, capturing=True)]
    points = [*earlier, pt(2, t_min=20, capturing=None)]
    got = decide_capturing(points, HistorySettings(history, fine), [2] if pinned else [])
    assert got is expected


def test_capture_target_is_the_newest_capturing_point():
    points = [pt(1), pt(2, capturing=True), pt(3, capturing=False)]
    assert capture_target(points).id == 2
    assert capture_target([pt(1, capturing=False)]) is None
    assert [p.id for p in superseded(points)] == []
    assert [p.id for p in superseded([pt(1, capturing=False), pt(2, capturing=None)])] == [1]


# --- thinning and pruning --------------------------------------------------------------------
def test_fine_window_keeps_young_points_and_thins_old_ones_to_hourly():
    # points every 20 minutes over 3 hours; now = 180 min; fine window 60 min; 2 hourly points
    points = [pt(i, t_min=20 * i) for i in range(10)]
    now = 180 * MIN
    drop = points_to_drop(points, HistorySettings(2, 60), now, [])
    kept = [p.id for p in points if p.id not in {d.id for d in drop}]
    # fine: t > 120 -> ids 7, 8, 9 (140, 160, 180); hourly: first of hours 2 (id 6 at 120) and 1 (id 3 at 60)
    assert kept == [3, 6, 7, 8, 9]


def test_pruning_keeps_n_hours_and_never_the_pinned_or_newest():
    points = [pt(i, t_min=60 * i) for i in range(6)]
    drop = points_to_drop(points, HistorySettings(2, 0), 400 * MIN, pinned=[1])
    assert [p.id for p in drop] == [0, 2]  # hours 3 and 4 kept, 1 pinned, 5 the newest
    assert points_to_drop(points[:1], HistorySettings(0, 0), 10 ** 15, []) == []


def test_drop_steps_merge_into_the_older_kept_neighbour_and_delete_the_oldest():
    points = [pt(1), pt(2), pt(3), pt(4), pt(5, capturing=None)]
    steps = drop_steps(points, [points[0], points[2], points[3]])
    assert steps == [DropStep(StepKind.DELETE, points[0]), DropStep(StepKind.MERGE, points[2], points[1]),
                     DropStep(StepKind.MERGE, points[3], points[1])]


def test_reach_order_lists_the_target_and_newer_capturing_points_newest_first():
    points = [pt(1), pt(2), pt(3, capturing=False), pt(4, capturing=None)]
    assert [p.id for p in reach_order(points, 1)] == [2, 1]
    assert reach_order(points, 4) == []
    with pytest.raises(KeyError):
        reach_order(points, 9)


# --- the model: apply random cycles, keep every rule, check every kept point reads back -----------
BLOCKS = 16


class Model:
    """A replica of BLOCKS one-byte blocks with undo logs as dicts (block -> pre-image), driven by the rules."""

    def __init__(self, settings: HistorySettings):
        self.settings = settings
        self.image = [0] * BLOCKS
        self.points: list[Point] = []
        self.undo: dict[int, dict[int, int]] = {}
        self.truth: dict[int, list[int]] = {}  # point id -> the image right after its cycle
        self.pinned: set[int] = set()
        self.next_id = 1

    def apply(self, seq: int, time_ns: int, writes: dict[int, int]) -> None:
        if self.points and self.points[-1].capturing is None:
            decided = decide_capturing(self.points, self.settings, self.pinned)
            self.points[-1] = dataclasses.replace(self.points[-1], capturing=decided)
        target = capture_target(self.points)
        for block, value in writes.items():
            if target is not None and block not in self.undo[target.id]:
                self.undo[target.id][block] = self.image[block]
            self.image[block] = value
        p = Point(self.next_id, seq, time_ns)
        self.next_id += 1
        self.points.append(p)
        self.undo[p.id] = {}
        self.truth[p.id] = list(self.image)
        for gone in superseded(self.points):
            self._remove(gone)

    def thin(self, now_ns: int) -> None:
        drop = points_to_drop(self.points, self.settings, now_ns, self.pinned)
        for step in drop_steps(self.points, drop):
            if step.kind is StepKind.MERGE:
                into = self.undo[step.into.id]
                for block, old in self.undo[step.point.id].items():
                    into.setdefault(block, old)
            self._remove(step.point)

    def _remove(self, p: Point) -> None:
        self.points = [q for q in self.points if q.id != p.id]
        del self.undo[p.id]
        del self.truth[p.id]

    def read(self, point_id: int) -> list[int]:
        view = list(self.image)
        for p in reach_order(self.points, point_id):  # newest first; older overrides
            for block, old in self.undo[p.id].items():
                view[block] = old
        return view


@hsettings(max_examples=150, deadline=None)
@given(st.integers(0, 4), st.sampled_from([0, 30, 90]), st.integers(0, 2 ** 32), st.integers(5, 60))
def test_every_kept_point_reads_back_exactly(history, fine, seed, cycles):
    rng = random.Random(seed)
    model = Model(HistorySettings(history, fine))
    now = 0
    for seq in range(1, cycles + 1):
        now += rng.choice([1, 5, 20, 45]) * MIN
        writes = {rng.randrange(BLOCKS): rng.randrange(1, 256) for _ in range(rng.randrange(0, 6))}
        if model.points and rng.random() < 0.1 and model.points[-1].capturing is None:
            model.pinned.add(model.points[-1].id)  # a test failover on the latest point
        if model.pinned and rng.random() < 0.1:
            model.pinned.pop()
        model.apply(seq, now, writes)
        model.thin(now)
        for p in model.points:
            assert model.read(p.id) == model.truth[p.id], f"point {p.id} (seq {p.sequence}) reads wrong"
        assert model.points[-1].sequence == seq  # the latest point always exists
    # retention: at most the newest point, the pinned ones, the fine window's and `history` hourly ones
    fine_ns = fine * MIN
    extra = [p for p in model.points[:-1] if p.id not in model.pinned and now - p.time_ns >= fine_ns]
    assert len(extra) <= history
    assert len({p.time_ns // HOUR_NS for p in extra}) == len(extra)


@pytest.mark.parametrize("history, fine, expected_sequences", [
    (3, 0, [6, 9, 12, 15]),           # the first cycle of each of the 3 hours before the latest, and the latest
    (0, 0, [15]),                      # latest only
    (0, 60, [13, 14, 15]),             # the last hour's cycles
    (2, 30, [9, 12, 14, 15]),          # two hourly points, the fine window's cycle, the latest
])
def test_a_day_of_cycles_keeps_what_the_settings_promise(history, fine, expected_sequences):
    model = Model(HistorySettings(history, fine))
    for seq in range(1, 16):  # one cycle every 20 minutes, 5 hours
        now = seq * 20 * MIN
        model.apply(seq, now, {seq % BLOCKS: seq})
        model.thin(now)
    assert [p.sequence for p in model.points] == expected_sequences
    for p in model.points:
        assert model.read(p.id) == model.truth[p.id]


@pytest.mark.parametrize("hours, last_h, now_h, due", [
    (None, None, 5, False),   # off
    (4, None, 5, True),       # first cut after turning it on
    (4, 2, 5, False),         # 3 h since the last one
    (4, 1, 5, True),          # 4 h since
    (1, 4.5, 5, False),
])
def test_app_consistent_due(hours, last_h, now_h, due):
    from hvr_common.pure.recovery_points import app_consistent_due
    last = None if last_h is None else int(last_h * HOUR_NS)
    assert app_consistent_due(HistorySettings(0, 0, hours), last, int(now_h * HOUR_NS)) is due
