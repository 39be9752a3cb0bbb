"""The monitoring interval: the window that statistics and health cover (pure).

As in Hyper-V (``Set-VMReplicationServer -MonitoringInterval
-MonitoringStartTime``) the windows are fixed on the clock: they start at the
configured time of day (UTC) and follow each other every interval, so with the
defaults (12 h from 00:00) a window runs 00:00-12:00 or 12:00-24:00, whatever
the time of the query.  ``Reset-VMReplicationStatistics`` starts a new
collection inside the current window: the window then starts at the reset.

The latency limit is the health rule's "average latency within the
configured limit" (Hyper-V's 5 minutes by default): above it, the primary's
health is Warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hvr_common.pure.errors import UsageError

NS = 1_000_000_000
DAY_S = 86_400
DEFAULT_INTERVAL_S = 12 * 3600  # Hyper-V's default monitoring interval
MIN_INTERVAL_S = 3600
MAX_INTERVAL_S = 7 * DAY_S
_HH_MM_RE = re.compile(r"[0-9]{2}:[0-9]{2}")  # ASCII digits only (str.isdigit() takes '²' and '١')
DEFAULT_LATENCY_LIMIT_S = 300  # Hyper-V: average latency within 5 minutes
MAX_LATENCY_LIMIT_S = DAY_S


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    interval_s: int = DEFAULT_INTERVAL_S
    start_s: int = 0  # seconds after midnight UTC when a window starts
    latency_limit_s: int = DEFAULT_LATENCY_LIMIT_S  # over it on average in the window: Warning

    @property
    def start(self) -> str:
        return f"{self.start_s // 3600:02d}:{self.start_s % 3600 // 60:02d}"

    def to_dict(self) -> dict:
        return {"monitoring_interval_s": self.interval_s, "monitoring_start": self.start,
                "latency_limit_s": self.latency_limit_s}


def parse_start(text: str) -> int:
    """``HH:MM`` (UTC) into seconds after midnight."""
    if not isinstance(text, str) or _HH_MM_RE.fullmatch(text) is None:
        raise UsageError(f"monitoring_start {text!r:.80} is not HH:MM", hint="for example 09:00 (UTC)")
    hours, minutes = int(text[:2]), int(text[3:])
    if hours > 23 or minutes > 59:
        raise UsageError(f"monitoring_start {text!r} is not a time of day", hint="00:00 to 23:59 (UTC)")
    return hours * 3600 + minutes * 60


def monitoring_settings(values: dict) -> MonitoringSettings:
    """From stored or requested values (``monitoring_interval_s``, ``monitoring_start``, ``latency_limit_s``);
    others are ignored."""
    interval = values.get("monitoring_interval_s", DEFAULT_INTERVAL_S)
    if isinstance(interval, bool) or not isinstance(interval, int) or \
            not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S or interval % 3600:
        raise UsageError(f"the monitoring interval ({interval!r} s) must be whole hours from 1 h to 7 days",
                         hint="for example hvrctl server set --monitoring-interval 12h (monitoring_interval_s "
                              "43200, the default)")
    start = values.get("monitoring_start", "00:00")
    limit = values.get("latency_limit_s", DEFAULT_LATENCY_LIMIT_S)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LATENCY_LIMIT_S:
        raise UsageError(f"the latency limit ({limit!r} s) must be whole seconds from 1 s to 1 day",
                         hint="for example hvrctl server set --latency-limit 5m (latency_limit_s 300, the default)")
    return MonitoringSettings(interval, parse_start(start), limit)


def window(now_ns: int, settings: MonitoringSettings, reset_ns: int | None = None) -> tuple[int, int]:
    """The current monitoring window ``(start_ns, end_ns)``: fixed on the clock, started later by a reset."""
    step = settings.interval_s * NS
    anchor = settings.start_s * NS  # the first window started at that time on 1970-01-01
    start = anchor + (now_ns - anchor) // step * step
    if reset_ns is not None and start <= reset_ns <= now_ns:
        start = reset_ns
    end = anchor + ((now_ns - anchor) // step + 1) * step
    return start, end
