"""The status snapshots the admin APIs answer (``hvrctl vm get``, ``hvrctl replica get``).

Frozen values built from a daemon's records at one instant and turned into
JSON in one place, so a field is named once.  The replication API's own view
of a replica (what the primary asks for) is :class:`messages.ReplicaView`.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hvr_common.pure.recovery_points import DEFAULT_FINE_WINDOW_MIN
from hvr_common.pure.replication_state import ReplicationState


@dataclass(frozen=True, slots=True)
class PrimaryStatus:
    """One VM's replication on the primary (Get-VMReplication): the agent's ``/v1/replication`` views."""

    vm: str
    vm_id: uuid.UUID | None
    state: ReplicationState
    state_detail: str | None
    health: str
    health_details: tuple[str, ...]
    frequency_s: int
    compression: bool
    primary_server: str
    principal: str
    replica_server: str
    replica_port: int
    generation: int
    next_sequence: int | None
    pending_cycles: int
    last_replication_time: str | None
    last_error: str | None
    enabled_at: str | None
    initial: Mapping[str, Any] | None  # initial replication: times, bytes, rate, per-disk progress
    mode: str = "Primary"
    recovery_history: int = 0  # the recovery history settings (HistorySettings), as vm enable / vm set gave them
    fine_window_min: int = DEFAULT_FINE_WINDOW_MIN
    app_consistent_hours: int | None = None
    settings_pending: bool = False  # not yet acknowledged by the replica server
    last_app_consistent_time: str | None = None  # the last cut taken between freeze and thaw
    tracking: str | None = None  # the VM's tracking mode (journal, bitmap)
    resync: Mapping[str, Any] | None = None  # the resync running (bytes compared, sent, ETA) or the last one
    verify: Mapping[str, Any] | None = None  # the verify running (progress) or the last one's result
    prepared_sequence: int | None = None  # PreparedForFailover: the last cycle shipped, applied and verified
    tracking_switch: Mapping[str, Any] | None = None  # bitmap tracking while the journal's backlog ships: why

    def to_json(self) -> dict:
        return {
            "vm": self.vm, "vm_id": str(self.vm_id) if self.vm_id else None, "state": self.state.value,
            "state_detail": self.state_detail, "health": self.health, "health_details": list(self.health_details),
            "mode": self.mode, "frequency_s": self.frequency_s, "compression": self.compression,
            "primary_server": self.primary_server, "principal": self.principal,
            "replica_server": self.replica_server, "replica_port": self.replica_port,
            "generation": self.generation, "next_sequence": self.next_sequence,
            "pending_cycles": self.pending_cycles, "last_replication_time": self.last_replication_time,
            "last_error": self.last_error, "enabled_at": self.enabled_at,
            "initial": dict(self.initial) if self.initial is not None else None,
            "recovery_history": self.recovery_history, "fine_window_min": self.fine_window_min,
            "app_consistent_hours": self.app_consistent_hours, "settings_pending": self.settings_pending,
            "last_app_consistent_time": self.last_app_consistent_time, "tracking": self.tracking,
            "resync": dict(self.resync) if self.resync is not None else None,
            "verify": dict(self.verify) if self.verify is not None else None,
            "prepared_sequence": self.prepared_sequence,
            "tracking_switch": dict(self.tracking_switch) if self.tracking_switch is not None else None,
        }


@dataclass(frozen=True, slots=True)
class ReplicaDiskStatus:
    disk_id: uuid.UUID
    name: str
    size_bytes: int
    path: str
    initial_offset: int

    def to_json(self) -> dict:
        return {"disk_id": str(self.disk_id), "name": self.name, "size_bytes": self.size_bytes, "path": self.path,
                "initial_offset": self.initial_offset}


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica VM on the replica server: the listener's ``/v1/replicas`` views."""

    name: str
    vm_id: uuid.UUID
    state: ReplicationState
    state_detail: str | None
    primary_server: str
    generation: int
    frequency_s: int
    compression: bool
    storage: str
    next_sequence: int
    last_received_sequence: int
    last_applied_sequence: int
    last_replication_time_ns: int | None
    last_applied_log_time_ns: int | None
    last_applied_time_ns: int | None
    disks: tuple[ReplicaDiskStatus, ...]
    role: str = "replica"
    trust_group: str = "DEFAULT"  # of the primary that created the replica (docs/authorization.md)

    @classmethod
    def from_replica(cls, rep: Any) -> ReplicaStatus:
        """From the listener's replica record (``hvr_listener.store.Replica``)."""
        return cls(rep.name, rep.vm_id, rep.state, rep.state_detail, rep.principal, rep.generation,
                   rep.frequency_s, rep.compression, str(rep.storage_dir), rep.next_sequence,
                   rep.last_received_sequence, rep.last_applied_sequence, rep.last_replication_ns,
                   rep.last_applied_log_ns, rep.last_applied_ns,
                   tuple(ReplicaDiskStatus(d.disk_id, d.name, d.size_bytes, str(d.path), d.initial_offset)
                         for d in rep.disks), trust_group=getattr(rep, "trust_group", "DEFAULT"))

    def to_json(self) -> dict:
        return {
            "name": self.name, "vm_id": str(self.vm_id), "role": self.role, "state": self.state.value,
            "state_detail": self.state_detail, "primary_server": self.primary_server,
            "trust_group": self.trust_group, "generation": self.generation,
            "frequency_s": self.frequency_s, "compression": self.compression, "storage": self.storage,
            "next_sequence": self.next_sequence, "last_received_sequence": self.last_received_sequence,
            "last_applied_sequence": self.last_applied_sequence,
            "last_replication_time_ns": self.last_replication_time_ns,
            "last_applied_log_time_ns": self.last_applied_log_time_ns,
            "last_applied_time_ns": self.last_applied_time_ns,
            "disks": [d.to_json() for d in self.disks],
        }


def iso_time(ns: int | None) -> str | None:
    """UTC ISO 8601 to the second (``2026-12-05T17:04:09Z``), or None."""
    if ns is None:
        return None
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RecoveryPointView:
    """One recovery point as ``hvrctl recovery-points list`` shows it."""

    id: int
    time_ns: int  # when its cycle was cut on the primary
    sequence: int
    consistency: str  # crash | application
    size_bytes: int  # its undo data on the replica server
    latest: bool
    test_failover: bool  # a test failover stands on it
    label: str | None = None  # "kept-aside": an adopted old primary's own state, pinned until released

    @classmethod
    def of(cls, point: Any, *, latest: bool, test_failover: bool, label: str | None = None) -> RecoveryPointView:
        return cls(point.id, point.time_ns, point.sequence, str(point.consistency), point.undo_bytes, latest,
                   test_failover, label)

    def to_json(self) -> dict:
        return {"id": self.id, "time": iso_time(self.time_ns), "time_ns": self.time_ns, "sequence": self.sequence,
                "consistency": self.consistency, "size_bytes": self.size_bytes, "latest": self.latest,
                "test_failover": self.test_failover, "label": self.label}


def recovery_history_settings(rep: Any, points: list, test: dict | None) -> dict:
    """The recovery-history part of a replica's status: its settings, its points, its test failover."""
    return {
        "recovery_history": rep.history.recovery_history,
        "fine_window_min": rep.history.fine_window_min,
        "app_consistent_hours": rep.history.app_consistent_hours,
        "recovery_points": len(points),
        "recovery_points_bytes": sum(p.undo_bytes for p in points),
        "last_test_failover_time": iso_time(rep.last_test_failover_ns),
        "test_failover": test,
    }
