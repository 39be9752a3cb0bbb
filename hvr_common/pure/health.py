"""Replication health (Normal / Warning / Critical) as Hyper-V defines it (pure).

Two inputs decide it: the state, through :data:`STATE_RULES` (a table keyed
on the role and the state's name), and, in a state where cycles should flow,
the statistics of the monitoring window (:mod:`hvr_common.pure.monitoring`):

* **Critical**: replication cannot proceed (``Error``, a resynchronization
  required); it is paused on the replica; on the primary, no cycle has been
  acknowledged for two intervals or more (the primary cannot send).
* **Warning**: more than 20% of the window's cycles were missed; more than an
  hour since the last cycle was sent (primary) or received (replica); the
  average latency of the window is over the limit (``hvrctl server set --latency-limit``, 5 minutes by default); an
  upload failed in the last hour of the window; initial replication is not complete; a
  failover has not been reversed; replication is paused on the primary.
* **Normal** otherwise.

Each rule that fires adds a plain sentence to the details, as Hyper-V's
ReplicationHealthDetails does; the worst level wins.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from hvr_common.pure.measure import NS, CycleResult, CycleStat
from hvr_common.pure.monitoring import DEFAULT_INTERVAL_S, DEFAULT_LATENCY_LIMIT_S

ERROR_WINDOW_S = 3600
LAST_CYCLE_WARNING_S = 3600
MISSED_WARNING_RATIO = 0.20
CRITICAL_INTERVALS = 2


class Health(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"
    CRITICAL = "Critical"


N, W, C = Health.NORMAL, Health.WARNING, Health.CRITICAL
_ORDER = {N: 0, W: 1, C: 2}

_CANNOT_PROCEED = "Replication for {vm} cannot proceed: resynchronization is required."
_INITIAL = "Initial replication of {vm} is not complete."
_NOT_REVERSED = "{vm} was failed over and replication has not been reversed."

# (role, state name) -> (level, sentence).  A state without a row adds nothing; its statistics may.
# Resynchronizing: the reference names no level; the replica is not usable while it runs, as during the
# initial copy, so it is Warning like an incomplete initial replication.
STATE_RULES: dict[tuple[str, str], tuple[Health, str]] = {
    ("primary", "Error"): (C, "Replication for {vm} is in error{detail}. Fix the error(s) and resume replication."),
    ("primary", "WaitingForStartResynchronize"): (C, _CANNOT_PROCEED),
    ("primary", "Resynchronizing"): (W, "Resynchronization of {vm} is in progress."),
    ("primary", "ResynchronizeSuspended"): (W, "Resynchronization of {vm} is paused on the primary."),
    ("primary", "Suspended"): (W, "Replication for {vm} is paused on the primary."),
    ("primary", "ReadyForInitialReplication"): (W, _INITIAL),
    ("primary", "InitialReplicationInProgress"): (W, _INITIAL),
    ("primary", "PreparedForFailover"): (W, "A planned failover of {vm} was started and replication has not "
                                            "been reversed."),
    ("primary", "FailedOverWaitingCompletion"): (W, _NOT_REVERSED),
    ("primary", "FailedOver"): (W, _NOT_REVERSED),
    ("replica", "Error"): (C, "Replication for {vm} is in error on the replica{detail}. Fix the error(s) and "
                              "resume replication."),
    ("replica", "WaitingForStartResynchronize"): (C, _CANNOT_PROCEED),
    ("replica", "Resynchronizing"): (W, "Resynchronization of {vm} is in progress."),
    ("replica", "ResynchronizeSuspended"): (C, "Resynchronization of {vm} is paused on the replica."),
    ("replica", "Suspended"): (C, "Replication for {vm} is paused on the replica."),
    ("replica", "WaitingForInitialReplication"): (W, _INITIAL),
    ("replica", "InitialReplicationInProgress"): (W, _INITIAL),
    ("replica", "FailedOverWaitingCompletion"): (W, _NOT_REVERSED),
    ("replica", "FailedOver"): (W, _NOT_REVERSED),
}

# States in which cycles flow, so the statistics rules apply.
FLOWING_STATES = frozenset({"Replicating"})


@dataclass(frozen=True, slots=True)
class HealthReport:
    health: Health
    details: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"health": self.health.value, "details": list(self.details)}


def _worst(findings: list[tuple[Health, str]]) -> HealthReport:
    if not findings:
        return HealthReport(N, ())
    level = max((lvl for lvl, _ in findings), key=_ORDER.__getitem__)
    ordered = sorted(findings, key=lambda f: -_ORDER[f[0]])  # stable: rule order within a level
    return HealthReport(level, tuple(sentence for _, sentence in ordered))


def replication_health(state: str, *, frequency_s: int, rows: Iterable[CycleStat], now_ns: int,
                       last_ack_ns: int | None, replicating_since_ns: int | None,
                       state_detail: str | None = None, role: str = "primary", vm: str | None = None,
                       window_start_ns: int | None = None,
                       latency_limit_s: float = DEFAULT_LATENCY_LIMIT_S) -> HealthReport:
    """Health of one VM as ``role`` sees it.

    ``last_ack_ns`` is the last cycle acknowledged (primary) or received
    (replica); ``replicating_since_ns`` the end of the initial copy;
    ``rows`` the recorded cycles, of which those from ``window_start_ns`` (the
    monitoring window; default the last 12 hours) count.
    """
    who = f"virtual machine '{vm}'" if vm else "the virtual machine"
    name = str(state)
    findings: list[tuple[Health, str]] = []
    rule = STATE_RULES.get((role, name))
    if rule is not None:
        level, text = rule
        findings.append((level, text.format(vm=who, detail=f": {state_detail}" if state_detail else "")))
    rows = list(rows)
    start = window_start_ns if window_start_ns is not None else now_ns - DEFAULT_INTERVAL_S * NS
    if name in FLOWING_STATES:
        findings += _flow_findings(role, who, frequency_s, now_ns, last_ack_ns, replicating_since_ns)
        findings += _window_findings(who, [r for r in rows if _when(r) >= start], latency_limit_s)
    # failures of the last hour, within the window (a statistics reset clears them, as in Hyper-V)
    since = max(now_ns - ERROR_WINDOW_S * NS, start)
    errors = [r for r in rows if r.result is CycleResult.ERROR and _when(r) >= since]
    if errors:
        last = max(errors, key=_when)
        findings.append((W, f"{len(errors)} replication attempt(s) of {who} failed in the last hour; the last: "
                            f"{last.error or 'unknown error'}."))
    return _worst(findings)


def _when(r: CycleStat) -> int:
    return r.finished_ns if r.finished_ns is not None else r.started_ns


def _flow_findings(role: str, who: str, frequency_s: int, now_ns: int, last_ack_ns: int | None,
                   replicating_since_ns: int | None) -> list[tuple[Health, str]]:
    since = last_ack_ns if last_ack_ns is not None else replicating_since_ns
    if since is None:
        return []
    age_s = (now_ns - since) // NS
    out: list[tuple[Health, str]] = []
    if role == "primary" and now_ns - since >= CRITICAL_INTERVALS * frequency_s * NS:
        out.append((C, f"The primary cannot send replication traffic for {who}: no cycle acknowledged for "
                       f"{age_s} s ({CRITICAL_INTERVALS} intervals of {frequency_s} s or more)."))
    if now_ns - since > LAST_CYCLE_WARNING_S * NS:
        verb = "sent" if role == "primary" else "received"
        out.append((W, f"Replica {who} is behind the primary by more than an hour: the last cycle was {verb} "
                       f"{age_s} s ago."))
    return out


def _window_findings(who: str, rows: list[CycleStat], latency_limit_s: float) -> list[tuple[Health, str]]:
    out: list[tuple[Health, str]] = []
    cycles = [r for r in rows if r.result in (CycleResult.OK, CycleResult.MISSED)]
    missed = sum(1 for r in cycles if r.result is CycleResult.MISSED)
    if cycles and missed > MISSED_WARNING_RATIO * len(cycles):
        out.append((W, f"More than 20 percent of replication cycles have been missed for {who}: {missed} of "
                       f"{len(cycles)} in the monitoring interval."))
    latencies = [r.latency_s for r in rows if r.shipped]
    if latencies:
        average = sum(latencies) / len(latencies)
        if average > latency_limit_s:
            out.append((W, f"The average replication latency of {who} is {average:.0f} s, over the limit of "
                           f"{latency_limit_s:.0f} s."))
    return out


def replica_health(state: str, *, name: str, frequency_s: int, last_received_ns: int | None,
                   last_applied_ns: int | None, state_detail: str | None, now_ns: int) -> HealthReport:
    """The replica server's own view: its state, and how long ago a cycle was received."""
    return replication_health(state, frequency_s=frequency_s, rows=(), now_ns=now_ns, last_ack_ns=last_received_ns,
                              replicating_since_ns=last_applied_ns, state_detail=state_detail, role="replica",
                              vm=name)
