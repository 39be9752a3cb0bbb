"""The automatic resync window (agent.toml ``[resync]``): when a resync hvr starts by itself may begin.

``window = "22:00-06:00"`` (local time of day, start-end; may wrap midnight)
for every VM, ``[resync.vm.NAME] window = ...`` for one VM, ``window = ""``
for none: at once (the default).  A resync the operator starts (``vm resync``)
ignores the window; ``--at`` chooses the time instead.  The window says when
an automatic resync starts; one that is still running when the window ends
goes on (it changes nothing on the replica until its cycle is applied).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

_WINDOW_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})-([0-9]{1,2}):([0-9]{2})")  # ASCII digits, matched whole


@dataclass(frozen=True, slots=True)
class ResyncWindow:
    start_min: int  # minutes after local midnight
    end_min: int

    def contains(self, minute: int) -> bool:
        if self.start_min <= self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min

    def next_open(self, now: datetime.datetime) -> datetime.datetime:
        """``now`` if it lies in the window, else the window's next start (``now`` is timezone-aware local time)."""
        minute = now.hour * 60 + now.minute
        if self.contains(minute):
            return now
        start = now.replace(hour=self.start_min // 60, minute=self.start_min % 60, second=0, microsecond=0)
        return start if start > now else start + datetime.timedelta(days=1)

    def __str__(self) -> str:
        return (f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-"
                f"{self.end_min // 60:02d}:{self.end_min % 60:02d}")


def parse_window(text: str) -> ResyncWindow | None:
    """``"HH:MM-HH:MM"`` into a window; ``""`` into None (at once); ValueError otherwise."""
    if text == "":
        return None
    m = _WINDOW_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = map(int, m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59 or (h1, m1) == (h2, m2):
        raise ValueError(f"{text!r} is not a window of the day (HH 0-23, MM 0-59, start != end)")
    return ResyncWindow(h1 * 60 + m1, h2 * 60 + m2)


@dataclass(frozen=True, slots=True)
class ResyncConfig:
    """``[resync]``: the default window, and ``[resync.vm.NAME]`` for one VM."""

    window: ResyncWindow | None = None
    per_vm: tuple[tuple[str, ResyncWindow | None], ...] = ()

    def window_for(self, vm: str) -> ResyncWindow | None:
        for name, window in self.per_vm:
            if name == vm:
                return window
        return self.window


def _window(table: dict, where: str, problems: list[str]) -> ResyncWindow | None:
    raw = table.get("window", "")
    if not isinstance(raw, str):
        problems.append(f"{where}.window: must be a string \"HH:MM-HH:MM\" (or \"\" for at once)")
        return None
    try:
        return parse_window(raw)
    except ValueError as exc:
        problems.append(f"{where}.window: {exc}")
        return None


def parse_resync(table, problems: list[str]) -> ResyncConfig:
    if table is None:
        return ResyncConfig()
    if not isinstance(table, dict):
        problems.append("resync: must be a table")
        return ResyncConfig()
    for key in set(table) - {"window", "vm"}:
        problems.append(f"resync.{key}: unknown key")
    default = _window(table, "resync", problems)
    per_vm = []
    vms = table.get("vm", {})
    if not isinstance(vms, dict):
        problems.append("resync.vm: must be a table of VM names")
        vms = {}
    for name, sub in vms.items():
        if not isinstance(sub, dict):
            problems.append(f"resync.vm.{name}: must be a table")
            continue
        for key in set(sub) - {"window"}:
            problems.append(f"resync.vm.{name}.{key}: unknown key")
        per_vm.append((name, _window(sub, f"resync.vm.{name}", problems)))
    return ResyncConfig(default, tuple(per_vm))
