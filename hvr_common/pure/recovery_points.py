"""Recovery history rules (pure): which points exist, which capture pre-images, which are dropped.

A recovery point P(S) stands at sequence S: the replica disks as they were
right after cycle S was applied.  The replica image always holds the newest
state; a point older than that is reached by laying undo logs over the image,
newest first, each older log overriding the newer ones.  The undo log of a
point holds the pre-images of the blocks first overwritten while it was the
*capture target* (see :func:`capture_target`).

The rules, all decided here from values the listener passes in:

* After cycle S is applied, a row P(S) is created (it is the latest point).
* When the next cycle starts applying, :func:`decide_capturing` fixes, once
  and for good, whether P(S) captures pre-images: it does when the fine
  window is on, when it is the first point of its clock hour and hourly
  points are kept, or when a test failover stands on it.  The decision is
  stored with the row: a re-applied cycle after a crash captures into the
  same point.
* A point that does not capture is the latest point only while nothing newer
  exists: it is deleted when the next point is created (nothing can reach it
  any more).
* :func:`points_to_drop` thins the capturing points: the fine window keeps
  every point younger than ``fine_window_min``; beyond it, only the first
  point of each of the newest ``recovery_history`` clock hours (the latest
  point does not count as one of them) is kept; pinned
  points (a test failover stands on them) and the newest point are never
  dropped.
* :func:`drop_steps` turns the dropped points into steps: a dropped point with
  an older capturing neighbour has its undo log merged into that neighbour's
  (only the ranges the neighbour has not captured are appended: for those the
  state at the dropped point equals the state at the neighbour, so a crash
  that leaves some appended is harmless); the oldest one's log is deleted.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hvr_common.pure.errors import UsageError
from hvr_common.pure.input_limits import quoted

NS = 1_000_000_000
HOUR_NS = 3600 * NS
MAX_RECOVERY_HISTORY = 24
MAX_FINE_WINDOW_MIN = 7 * 24 * 60
DEFAULT_FINE_WINDOW_MIN = 60
APP_CONSISTENT_HOURS = range(1, 13)


class Consistency(enum.StrEnum):
    CRASH = "crash"
    APPLICATION = "application"


@dataclass(frozen=True, slots=True)
class HistorySettings:
    """Per-VM recovery history settings, as ``hvrctl vm enable`` / ``vm set`` give them."""

    recovery_history: int = 0  # hourly points kept besides the latest, 0..24
    fine_window_min: int = DEFAULT_FINE_WINDOW_MIN  # every applied cycle is a point for this long; 0 = off
    app_consistent_hours: int | None = None  # 1..12, or None (off)

    @property
    def fine_window_ns(self) -> int:
        return self.fine_window_min * 60 * NS

    def to_json(self) -> dict:
        return {"recovery_history": self.recovery_history, "fine_window_min": self.fine_window_min,
                "app_consistent_hours": self.app_consistent_hours}

    @classmethod
    def from_json(cls, body: dict) -> HistorySettings:
        """Validate settings from a request body or the database; every problem named by its field."""
        if not isinstance(body, dict):
            raise UsageError("recovery history settings must be a JSON object")
        unknown = sorted(set(body) - {"recovery_history", "fine_window_min", "app_consistent_hours"})
        if unknown:
            raise UsageError(f"unknown recovery history setting(s): {quoted(', '.join(map(str, unknown)))}")
        history = body.get("recovery_history", 0)
        fine = body.get("fine_window_min", DEFAULT_FINE_WINDOW_MIN)
        app = body.get("app_consistent_hours")
        problems = []
        if not _is_int(history) or not 0 <= history <= MAX_RECOVERY_HISTORY:
            problems.append(f"recovery_history must be a whole number from 0 to {MAX_RECOVERY_HISTORY}, "
                            f"not {quoted(history)}")
        if not _is_int(fine) or not 0 <= fine <= MAX_FINE_WINDOW_MIN:
            problems.append(f"fine_window_min must be a whole number of minutes from 0 to {MAX_FINE_WINDOW_MIN}, "
                            f"not {quoted(fine)}")
        if app is not None and (not _is_int(app) or app not in APP_CONSISTENT_HOURS):
            problems.append(f"app_consistent_hours must be from 1 to 12 (or null for off), not {quoted(app)}")
        if problems:
            raise UsageError("; ".join(problems))
        return cls(history, fine, app)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Point:
    """One recovery point as the rules see it."""

    id: int
    sequence: int
    time_ns: int  # when the cycle was cut on the primary
    consistency: Consistency = Consistency.CRASH
    capturing: bool | None = None  # None: not decided yet (it is the latest point, nothing applies after it)
    undo_bytes: int = 0


def hour_of(time_ns: int) -> int:
    return time_ns // HOUR_NS


def decide_capturing(points: Sequence[Point], settings: HistorySettings, pinned: Iterable[int]) -> bool:
    """Whether the newest point captures pre-images while the next cycle applies.

    ``points`` are the rows, oldest first; the last one is the newest.
    """
    newest = points[-1]
    if newest.id in set(pinned) or settings.fine_window_min > 0:
        return True
    if settings.recovery_history == 0:
        return False
    hour = hour_of(newest.time_ns)
    return not any(p.capturing and hour_of(p.time_ns) == hour for p in points[:-1])


def capture_target(points: Sequence[Point]) -> Point | None:
    """The point whose undo log receives pre-images: the newest capturing point (``None``: capture nothing)."""
    for p in reversed(points):
        if p.capturing:
            return p
    return None


def superseded(points: Sequence[Point]) -> list[Point]:
    """Points that no longer can be reached: non-capturing ones with a newer point after them."""
    return [p for p in points[:-1] if not p.capturing]


def points_to_drop(points: Sequence[Point], settings: HistorySettings, now_ns: int,
                   pinned: Iterable[int]) -> list[Point]:
    """The capturing points retention no longer keeps, oldest first (never the newest, never a pinned one)."""
    if not points:
        return []
    pinned = set(pinned)
    candidates = [p for p in points[:-1] if p.capturing]
    keep: set[int] = {points[-1].id} | pinned
    if settings.fine_window_min > 0:
        keep.update(p.id for p in candidates if now_ns - p.time_ns < settings.fine_window_ns)
    if settings.recovery_history > 0:
        first_of_hour: dict[int, Point] = {}
        for p in candidates:  # oldest first: the first seen in each hour is its representative
            first_of_hour.setdefault(hour_of(p.time_ns), p)
        for hour in sorted(first_of_hour, reverse=True)[:settings.recovery_history]:
            keep.add(first_of_hour[hour].id)
    return [p for p in candidates if p.id not in keep]


class StepKind(enum.StrEnum):
    MERGE = "merge"  # append the dropped point's uncaptured ranges to the older neighbour's log
    DELETE = "delete"  # the dropped point is the oldest: its log is simply deleted


@dataclass(frozen=True, slots=True)
class DropStep:
    kind: StepKind
    point: Point
    into: Point | None = None


def drop_steps(points: Sequence[Point], drop: Iterable[Point]) -> list[DropStep]:
    """The steps that drop ``drop`` from ``points`` (both oldest first), in the order to run them.

    Each step leaves every kept point reachable, so a crash between two steps
    needs no repair: the remaining steps are planned again at the next start.
    """
    dropped = {p.id for p in drop}
    steps: list[DropStep] = []
    kept_older: Point | None = None
    for p in points:
        if not p.capturing:
            continue
        if p.id in dropped:
            if kept_older is None:
                steps.append(DropStep(StepKind.DELETE, p))
            else:
                steps.append(DropStep(StepKind.MERGE, p, kept_older))
        else:
            kept_older = p
    return steps


def reach_order(points: Sequence[Point], target_id: int) -> list[Point]:
    """The capturing points whose undo logs are laid over the image to reach ``target_id``, newest first.

    A read of the view at the target takes, for each byte, the pre-image of
    the *oldest* of these logs that holds it, or else the image.
    """
    ids = [p.id for p in points]
    if target_id not in ids:
        raise KeyError(target_id)
    at = ids.index(target_id)
    return [p for p in reversed(points[at:]) if p.capturing]


def app_consistent_due(settings: HistorySettings, last_app_consistent_ns: int | None, now_ns: int) -> bool:
    """Whether the cut made now should be application-consistent (frozen).

    The first cut after the setting is turned on is; then one every
    ``app_consistent_hours`` (counted from the last one that succeeded, so a
    failed freeze is tried again at the next cut).
    """
    hours = settings.app_consistent_hours
    if hours is None:
        return False
    return last_app_consistent_ns is None or now_ns - last_app_consistent_ns >= hours * HOUR_NS
