"""Bandwidth caps: byte rates, the time-of-day schedule, the cap in force at an instant (pure rules).

A cap is a rate in bytes per second, or ``None`` for no cap.  Operators
write rates with a unit (``"50MiB/s"``, ``"800KB/s"``, ``"unlimited"``);
programs may give whole bytes per second.

A :class:`BandwidthSchedule` has a cap that holds at all times (``limit``)
and windows of the day (``start`` to ``end``, local time, ``HH:MM``) with a
cap of their own.  A window whose end is not after its start wraps past
midnight (``22:00`` to ``06:00``); ``end = "24:00"`` (or ``"00:00"``) is
midnight.  Windows never overlap, so at any second of the day exactly one
cap is in force: the window's, or else ``limit``.  A window covers its start
and not its end (``08:00``-``18:00`` is in force from 08:00:00 to 17:59:59.999).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DAY_S = 24 * 3600
MIN_RATE_BYTES_PER_S = 64 * 1024
MAX_RATE_BYTES_PER_S = 1024 ** 4  # 1 TiB/s: more than any link; a bigger number is a mistake (or an attack)
MAX_WINDOWS = 48

_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000 ** 2, "mib": 1024 ** 2, "gb": 1000 ** 3, "gib": 1024 ** 3}
_RATE_RE = re.compile(r"\s*([0-9]{1,16}(?:\.[0-9]{1,9})?)\s*([kmg]i?b|b)\s*/\s*s\s*", re.IGNORECASE)  # ASCII, whole
_TIME_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})")  # ASCII digits, matched whole
UNLIMITED = ("unlimited", "none", "off")


def parse_rate(value) -> int | None:
    """``"50MiB/s"`` -> 52428800; ``"unlimited"`` or ``None`` -> None; an int is bytes per second.

    Raises ``ValueError`` (with the reason) for anything else or a rate below the minimum.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in UNLIMITED):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a rate")
    if isinstance(value, int):
        rate = value
    elif isinstance(value, str):
        m = _RATE_RE.fullmatch(value)
        if m is None:
            raise ValueError(f"{value!r:.80} is not a rate: write a number and a unit, e.g. \"50MiB/s\", \"800KB/s\" "
                             f"(B, KB, KiB, MB, MiB, GB, GiB per second), or \"unlimited\"")
        rate = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"{value!r} is not a rate")
    if rate < MIN_RATE_BYTES_PER_S:
        raise ValueError(f"{value!r:.80} is below the smallest cap, {format_rate(MIN_RATE_BYTES_PER_S)}")
    if rate > MAX_RATE_BYTES_PER_S:
        raise ValueError(f"{value!r:.80} is above the largest cap, {format_rate(MAX_RATE_BYTES_PER_S)}")
    return rate


def format_rate(rate: int | None) -> str:
    """The shortest exact spelling of a rate: 52428800 -> ``"50MiB/s"``; None -> ``"unlimited"``."""
    if rate is None:
        return "unlimited"
    for unit in ("GiB", "MiB", "KiB", "GB", "MB", "KB"):
        size = _UNITS[unit.lower()]
        if rate % size == 0:
            return f"{rate // size}{unit}/s"
    return f"{rate}B/s"


def parse_time_of_day(text, *, end: bool = False) -> int:
    """``"08:30"`` -> seconds after midnight; ``"24:00"`` only as an ``end`` (midnight, taken as 0)."""
    m = _TIME_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a time of day HH:MM")
    hours, minutes = int(m.group(1)), int(m.group(2))
    if end and (hours, minutes) == (24, 0):
        return 0
    if hours > 23 or minutes > 59:
        raise ValueError(f"{text!r} is not a time of day from 00:00 to 23:59")
    return hours * 3600 + minutes * 60


def format_time_of_day(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


@dataclass(frozen=True)
class Window:
    """From ``start_s`` (included) to ``end_s`` (excluded), seconds after midnight; wraps when end <= start."""

    start_s: int
    end_s: int
    rate: int | None

    def covers(self, second_of_day: float) -> bool:
        s = second_of_day % DAY_S
        if self.start_s < self.end_s:
            return self.start_s <= s < self.end_s
        return s >= self.start_s or s < self.end_s

    def minutes(self) -> set[int]:
        return {m for m in range(DAY_S // 60) if self.covers(m * 60)}

    def to_json(self) -> dict:
        return {"start": format_time_of_day(self.start_s), "end": format_time_of_day(self.end_s),
                "limit": format_rate(self.rate)}


@dataclass(frozen=True)
class BandwidthSchedule:
    """``limit`` at all times, except inside a window, where the window's cap holds."""

    limit: int | None = None
    windows: tuple[Window, ...] = ()

    def rate_at(self, second_of_day: float) -> int | None:
        """The cap in force at this second of the (local) day."""
        for w in self.windows:
            if w.covers(second_of_day):
                return w.rate
        return self.limit

    def seconds_to_change(self, second_of_day: float) -> float:
        """Seconds from this instant to the next window boundary (``DAY_S`` when there is none)."""
        s = second_of_day % DAY_S
        edges = [(e - s) % DAY_S or DAY_S for w in self.windows for e in (w.start_s, w.end_s)]
        return min(edges, default=DAY_S)

    @property
    def capped(self) -> bool:
        return self.limit is not None or any(w.rate is not None for w in self.windows)

    def to_json(self) -> dict:
        return {"limit": format_rate(self.limit), "schedule": [w.to_json() for w in self.windows]}

    @classmethod
    def from_json(cls, limit, schedule, where: str = "bandwidth") -> BandwidthSchedule:
        """From a table or JSON body; raises ``ValueError`` listing every problem, each with its key."""
        problems: list[str] = []
        try:
            cap = parse_rate(limit)
        except ValueError as exc:
            problems.append(f"{where}.limit: {exc}")
            cap = None
        windows = _windows(schedule, f"{where}.schedule", problems)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(cap, windows)


def _windows(schedule, where: str, problems: list[str]) -> tuple[Window, ...]:
    if schedule is None:
        return ()
    if not isinstance(schedule, list) or len(schedule) > MAX_WINDOWS:
        problems.append(f"{where}: must be a list of at most {MAX_WINDOWS} tables "
                        "{start = \"HH:MM\", end = \"HH:MM\", limit = RATE}")
        return ()
    out: list[Window] = []
    taken: set[int] = set()
    for i, entry in enumerate(schedule):
        here = f"{where}[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{here}: must be a table {{start, end, limit}}")
            continue
        for key in sorted(set(entry) - {"start", "end", "limit"}):
            problems.append(f"{here}.{key}: unknown key")
        try:
            start = parse_time_of_day(entry.get("start"))
            end = parse_time_of_day(entry.get("end"), end=True)
            rate = parse_rate(entry["limit"]) if "limit" in entry else _missing()
        except ValueError as exc:
            problems.append(f"{here}: {exc}")
            continue
        if start == end:
            problems.append(f"{here}: start and end are the same time (an empty window)")
            continue
        window = Window(start, end, rate)
        minutes = window.minutes()
        if minutes & taken:
            problems.append(f"{here}: overlaps an earlier window "
                            f"(at {format_time_of_day(min(minutes & taken) * 60)})")
            continue
        taken |= minutes
        out.append(window)
    return tuple(out)


def _missing():
    raise ValueError("limit is required (a rate such as \"10MiB/s\", or \"unlimited\")")


def parse_schedule_text(text: str) -> list[dict]:
    """The command line's ``08:00-18:00=10MiB/s,22:00-06:00=unlimited`` as JSON windows; ``none`` is []."""
    if text.strip().lower() in ("none", ""):
        return []
    out = []
    for part in text.split(","):
        span, sep, rate = part.strip().partition("=")
        start, dash, end = span.partition("-")
        if not sep or not dash:
            raise ValueError(f"{part.strip()!r} is not START-END=RATE (e.g. 08:00-18:00=10MiB/s)")
        out.append({"start": start.strip(), "end": end.strip(), "limit": rate.strip()})
    return out
