"""Replication statistics (Measure-VMReplication), computed from recorded cycles (pure).

The agent records one :class:`CycleStat` row per event of a VM's replication:

* ``ok``: a cycle acknowledged within its interval (``finished_ns - started_ns
  <= frequency_s``); ``started_ns`` is when the cycle was cut;
* ``missed``: a cycle acknowledged late, or (``sequence`` None) an interval
  that passed while an earlier cycle was still being retried;
* ``error``: a failed upload attempt (``error`` says why).

:func:`measure` turns the rows of a window into the Measure-VMReplication
fields; sizes are bytes on the wire (the compressed bundle), latencies seconds
from cut to acknowledgement.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from hvr_common.pure.hrl import END_RECORD_SIZE, HEADER_SIZE

NS = 1_000_000_000
DEFAULT_WINDOW_S = 12 * 3600  # Hyper-V's default monitoring interval


class CycleResult(enum.StrEnum):
    OK = "ok"
    MISSED = "missed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class CycleStat:
    sequence: int | None
    started_ns: int
    finished_ns: int | None
    wire_bytes: int
    raw_bytes: int
    result: CycleResult
    error: str | None = None

    @property
    def shipped(self) -> bool:
        """Acknowledged by the replica (on time or late)."""
        return self.result is not CycleResult.ERROR and self.sequence is not None and self.finished_ns is not None

    @property
    def latency_s(self) -> float | None:
        if not self.shipped:
            return None
        return (self.finished_ns - self.started_ns) / NS


def result_for(started_ns: int, finished_ns: int, frequency_s: int) -> CycleResult:
    """``ok`` if the cycle was acknowledged within its interval, else ``missed``."""
    return CycleResult.OK if finished_ns - started_ns <= frequency_s * NS else CycleResult.MISSED


def missed_intervals(started_ns: int, now_ns: int, frequency_s: int) -> int:
    """Whole intervals after a cycle's own one that passed without it being acknowledged."""
    late = now_ns - started_ns - frequency_s * NS
    return max(0, late // (frequency_s * NS))


@dataclass(frozen=True, slots=True)
class Measurement:
    """Measure-VMReplication's fields (names as the operator knows them)."""

    AverageReplicationSize: int | None
    MaximumReplicationSize: int | None
    AverageReplicationLatency: float | None
    MaximumReplicationLatency: float | None
    SuccessfulReplicationCount: int
    MissedReplicationCount: int
    PendingReplicationSize: int
    LastReplicationTime: int | None  # ns since the epoch
    ReplicationErrors: int
    WindowStartTime: int  # ns since the epoch: rows before it are not counted

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


def in_window(rows: Iterable[CycleStat], now_ns: int, window_s: int, start_ns: int | None = None) -> list[CycleStat]:
    start = start_ns if start_ns is not None else now_ns - window_s * NS
    return [r for r in rows if (r.finished_ns if r.finished_ns is not None else r.started_ns) >= start]


def measure(rows: Iterable[CycleStat], *, now_ns: int, pending_bytes: int,
            window_s: int = DEFAULT_WINDOW_S, last_replication_ns: int | None = None,
            window_start_ns: int | None = None) -> Measurement:
    """Statistics over the rows from ``window_start_ns`` (the monitoring window,
    :mod:`hvr_common.pure.monitoring`), or of the last ``window_s`` seconds.

    ``pending_bytes`` is what waits to be shipped (the shell knows its logs);
    ``last_replication_ns`` is the time of the newest acknowledgement ever, used
    when none falls in the window.
    """
    rows = in_window(rows, now_ns, window_s, window_start_ns)
    shipped = [r for r in rows if r.shipped]
    sizes = [r.wire_bytes for r in shipped]
    latencies = [r.latency_s for r in shipped]
    last = max((r.finished_ns for r in shipped), default=None)
    if last is None or (last_replication_ns is not None and last_replication_ns > last):
        last = last_replication_ns if last_replication_ns is not None else last
    return Measurement(
        AverageReplicationSize=round(sum(sizes) / len(sizes)) if sizes else None,
        MaximumReplicationSize=max(sizes) if sizes else None,
        AverageReplicationLatency=round(sum(latencies) / len(latencies), 3) if latencies else None,
        MaximumReplicationLatency=round(max(latencies), 3) if latencies else None,
        SuccessfulReplicationCount=sum(1 for r in rows if r.result is CycleResult.OK and r.shipped),
        MissedReplicationCount=sum(1 for r in rows if r.result is CycleResult.MISSED),
        PendingReplicationSize=pending_bytes,
        LastReplicationTime=last,
        ReplicationErrors=sum(1 for r in rows if r.result is CycleResult.ERROR),
        WindowStartTime=window_start_ns if window_start_ns is not None else now_ns - window_s * NS,
    )


def pending_log_bytes(file_bytes: int, *, closed: bool) -> int:
    """What a log adds to PendingReplicationSize: its records, not its header (nor a closed log's end
    record), so a log that holds no write counts 0."""
    return max(0, file_bytes - HEADER_SIZE - (END_RECORD_SIZE if closed else 0))
