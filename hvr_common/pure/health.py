"""Replication health (Normal / Warning / Critical) from state and recorded cycles (pure).

The rules, first match of the worst level wins:

* **Critical**: the VM is in ``Error`` or ``WaitingForStartResynchronize``; or it
  is ``Replicating`` and no cycle has been acknowledged for two intervals or
  more (counted from the last acknowledgement, or from the end of the initial
  copy if none came yet).
* **Warning**: replication is ``Suspended``; or in the last hour more than 20%
  of the cycles were missed; or an upload failed in the last hour.
* **Normal** otherwise.

Each rule that fires adds a sentence to the details, as Hyper-V's
ReplicationHealthDetails does.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from hvr_common.pure.measure import NS, CycleResult, CycleStat
from hvr_common.pure.replication_state import ReplicationState

WARNING_WINDOW_S = 3600
MISSED_WARNING_RATIO = 0.20
CRITICAL_INTERVALS = 2


class Health(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"
    CRITICAL = "Critical"


@dataclass(frozen=True, slots=True)
class HealthReport:
    health: Health
    details: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"health": self.health.value, "details": list(self.details)}


def replication_health(state: ReplicationState, *, frequency_s: int, rows: Iterable[CycleStat], now_ns: int,
                       last_ack_ns: int | None, replicating_since_ns: int | None,
                       state_detail: str | None = None) -> HealthReport:
    critical: list[str] = []
    warning: list[str] = []
    if state is ReplicationState.ERROR:
        critical.append(f"replication is in Error: {state_detail}" if state_detail else "replication is in Error")
    elif state is ReplicationState.WAITING_FOR_START_RESYNCHRONIZE:
        critical.append("resynchronization is required")
    elif state is ReplicationState.SUSPENDED:
        warning.append("replication is suspended")
    if state is ReplicationState.REPLICATING:
        since = last_ack_ns if last_ack_ns is not None else replicating_since_ns
        if since is not None and now_ns - since >= CRITICAL_INTERVALS * frequency_s * NS:
            age_s = (now_ns - since) // NS
            critical.append(f"no cycle acknowledged for {age_s} s ({CRITICAL_INTERVALS} intervals of "
                            f"{frequency_s} s or more)")
    recent = [r for r in rows
              if (r.finished_ns if r.finished_ns is not None else r.started_ns) >= now_ns - WARNING_WINDOW_S * NS]
    cycles = [r for r in recent if r.result in (CycleResult.OK, CycleResult.MISSED)]
    missed = sum(1 for r in cycles if r.result is CycleResult.MISSED)
    if cycles and missed > MISSED_WARNING_RATIO * len(cycles):
        warning.append(f"{missed} of {len(cycles)} cycles missed in the last hour")
    errors = [r for r in recent if r.result is CycleResult.ERROR]
    if errors:
        last = max(errors, key=lambda r: r.finished_ns or r.started_ns)
        warning.append(f"{len(errors)} failed upload(s) in the last hour, last: {last.error or 'unknown error'}")
    if critical:
        return HealthReport(Health.CRITICAL, tuple(critical + warning))
    if warning:
        return HealthReport(Health.WARNING, tuple(warning))
    return HealthReport(Health.NORMAL, ())
