"""The agent's state database (SQLite in WAL mode under ``state_dir``).

Holds the registered VMs and their disks, so exports survive a restart, and
each VM's replication relationship: its settings and state, the initial
copy's progress per disk, and one row per recorded cycle (statistics).
Schema version 2 adds the recovery history settings of each relationship
(what ``vm enable`` / ``vm set`` gave, whether the replica still has to be
told), and the application-consistent cuts: the last one that succeeded,
the failures, and which unacknowledged cycles were cut frozen.  Version 3 adds
each VM's tracking mode (``journal`` or ``bitmap``; existing VMs journal);
version 5 the failover columns (:mod:`hvr_agent.store_schema` holds the ladder).
The schema is versioned: opening a database of an older version upgrades it
through ``MIGRATIONS`` in one transaction; a newer one is refused
(:mod:`hvr_common.shell.state_db`).
Methods are synchronous and short; the daemon calls them through
``asyncio.to_thread``.  One connection, serialised by a lock.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path

from hvr_common.shell.state_db import StateDatabase
from hvr_common.pure.errors import ConflictError, NotFoundError
from hvr_common.pure.measure import CycleResult, CycleStat
from hvr_common.pure.recovery_points import DEFAULT_FINE_WINDOW_MIN, Consistency, HistorySettings
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.tracking_mode import TrackingMode

from hvr_agent.store_schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION  # noqa: F401 (the store's schema)

_OPTIONAL_PATHS = frozenset({"key_file", "ca_file", "cert_file", "cert_key_file"})  # None is stored as ''



@dataclass(frozen=True)
class DiskRecord:
    name: str
    disk_id: uuid.UUID
    path: Path


@dataclass(frozen=True)
class VmRecord:
    name: str
    vm_id: uuid.UUID
    generation: int
    next_sequence: int
    read_only: bool
    disks: tuple[DiskRecord, ...]
    tracking: TrackingMode = TrackingMode.JOURNAL
    failover: str | None = None  # schema 5: a failed-over VM served here (waiting_completion | completed)


@dataclass(frozen=True)
class ReplicationRecord:
    vm: str
    replica_host: str
    replica_port: int
    key_file: Path | None  # None in certificate mode
    principal: str
    frequency_s: int
    compression: bool
    state: ReplicationState
    state_detail: str | None
    generation: int
    base_sequence: int | None
    next_sequence: int | None
    initial_at_ns: int | None
    initial_started_ns: int | None
    initial_completed_ns: int | None
    last_replication_ns: int | None
    enabled_ns: int
    # schema version 2: recovery history settings (HistorySettings, see ``history``)
    recovery_history: int = 0
    fine_window_min: int = DEFAULT_FINE_WINDOW_MIN
    app_consistent_hours: int | None = None
    settings_pending: bool = False  # changed here, not yet acknowledged by the replica
    # application-consistent cuts
    last_app_consistent_ns: int | None = None  # the last cut taken frozen (None: never)
    app_consistent_failures: int = 0  # cuts that were due frozen but are crash-consistent
    app_consistent_sequences: tuple[int, ...] = ()  # unacknowledged cycles cut frozen, oldest first
    # schema version 3: how the agent authenticates and protects the connection (ReplicaCredentials)
    auth: str = "token"
    ca_file: Path | None = None
    cert_file: Path | None = None
    cert_key_file: Path | None = None
    # schema version 5: PreparedForFailover: the last cycle shipped and applied before the failover
    prepared_sequence: int | None = None

    @property
    def history(self) -> HistorySettings:
        return HistorySettings(self.recovery_history, self.fine_window_min, self.app_consistent_hours)

    def with_history(self, settings: HistorySettings) -> "ReplicationRecord":
        return replace(self, recovery_history=settings.recovery_history, fine_window_min=settings.fine_window_min,
                       app_consistent_hours=settings.app_consistent_hours)

    def consistency_of(self, sequence: int) -> Consistency:
        """How cycle ``sequence`` was cut: an upload, or a rebuilt one after a restart, says so."""
        return Consistency.APPLICATION if sequence in self.app_consistent_sequences else Consistency.CRASH

    def replace(self, **changes) -> "ReplicationRecord":
        return replace(self, **changes)

    def _row(self) -> tuple:
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = ",".join(map(str, v))
            if v is None and f.name in _OPTIONAL_PATHS:
                v = ""
            out.append(str(v) if isinstance(v, (Path, ReplicationState)) else int(v) if isinstance(v, bool) else v)
        return tuple(out)

    @staticmethod
    def _from_row(row) -> "ReplicationRecord":
        (vm, host, port, key_file, principal, freq, comp, state, detail, gen, base, nxt, at, started, completed,
         last, enabled, history, fine, app, pending, last_app, app_failures, app_seqs, auth, ca, cert, cert_key,
         prepared) = row
        return ReplicationRecord(vm, host, port, _path(key_file), principal, freq, bool(comp), ReplicationState(state),
                                 detail, gen, base, nxt, at, started, completed, last, enabled, history, fine, app,
                                 bool(pending), last_app, app_failures,
                                 tuple(int(s) for s in app_seqs.split(",") if s), auth, _path(ca), _path(cert),
                                 _path(cert_key), prepared)


def _path(value: str) -> Path | None:
    return Path(value) if value else None


@dataclass(frozen=True)
class InitialProgress:
    disk_id: uuid.UUID
    size_bytes: int
    durable_offset: int
    allocated_bytes: int
    done_bytes: int


_REPLICATION_COLUMNS = tuple(f.name for f in fields(ReplicationRecord))


class AgentStore(StateDatabase):
    def __init__(self, path: Path):
        super().__init__(path, SCHEMA, SCHEMA_VERSION, "agent", MIGRATIONS)

    def list_vms(self) -> list[VmRecord]:
        with self._lock:
            vms = self._db.execute(
                "SELECT name, vm_id, generation, next_sequence, read_only, tracking, failover FROM vms ORDER BY name"
            ).fetchall()
            out = []
            for name, vm_id, gen, seq, ro, tracking, failover in vms:
                disks = self._db.execute(
                    "SELECT name, disk_id, path FROM disks WHERE vm=? ORDER BY position", (name,)).fetchall()
                out.append(VmRecord(name, uuid.UUID(vm_id), gen, seq, bool(ro),
                                    tuple(DiskRecord(d, uuid.UUID(i), Path(p)) for d, i, p in disks),
                                    TrackingMode(tracking), failover))
            return out

    def add_vm(self, name: str, disks: list[tuple[str, Path]], read_only: bool,
               tracking: TrackingMode = TrackingMode.JOURNAL) -> VmRecord:
        recs = tuple(DiskRecord(dname, uuid.uuid4(), path) for dname, path in disks)
        return self.insert_vm(VmRecord(name, uuid.uuid4(), 1, 1, read_only, recs, tracking))

    def insert_vm(self, rec: VmRecord) -> VmRecord:
        """Record a VM as given (a new one, or a failed-over one served with its ids and generation)."""
        with self._lock:
            try:
                with self.transaction() as db:
                    db.execute("INSERT INTO vms (name, vm_id, generation, next_sequence, read_only, created_ns, "
                               "tracking, failover) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (rec.name, str(rec.vm_id), rec.generation, rec.next_sequence, int(rec.read_only),
                                time.time_ns(), rec.tracking.value, rec.failover))
                    for pos, d in enumerate(rec.disks):
                        db.execute("INSERT INTO disks VALUES (?, ?, ?, ?, ?)",
                                   (rec.name, d.name, str(d.disk_id), str(d.path), pos))
            except sqlite3.IntegrityError as exc:
                if "vms.name" in str(exc):
                    raise ConflictError(f"a VM named {rec.name!r} is already registered") from None
                if "disks.path" in str(exc):
                    raise ConflictError("one of the disk images already belongs to a registered VM",
                                        hint="hvrctl vm list shows which") from None
                raise ConflictError(f"cannot register VM {rec.name!r}: {exc}") from None
        return rec

    def set_failover(self, name: str, failover: str | None) -> None:
        with self._lock:
            if self._db.execute("UPDATE vms SET failover=? WHERE name=?", (failover, name)).rowcount == 0:
                raise NotFoundError(f"no VM named {name!r} is registered")

    def remove_vm(self, name: str) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM vms WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise NotFoundError(f"no VM named {name!r} is registered")

    def set_tracking(self, name: str, tracking: TrackingMode) -> None:
        with self._lock:
            if self._db.execute("UPDATE vms SET tracking=? WHERE name=?", (tracking.value, name)).rowcount == 0:
                raise NotFoundError(f"no VM named {name!r} is registered")

    def set_next_sequence(self, name: str, next_sequence: int) -> None:
        with self._lock:
            self._db.execute("UPDATE vms SET next_sequence=? WHERE name=?", (next_sequence, name))

    # --- replication ------------------------------------------------------------------------
    def add_replication(self, rec: ReplicationRecord) -> None:
        marks = ", ".join("?" for _ in _REPLICATION_COLUMNS)
        with self._lock:
            try:
                self._db.execute(f"INSERT INTO replication ({', '.join(_REPLICATION_COLUMNS)}) VALUES ({marks})",
                                 rec._row())
            except sqlite3.IntegrityError:
                raise ConflictError(f"replication of VM {rec.vm!r} is already enabled",
                                    hint="hvrctl vm get shows it; remove it first with "
                                         "hvrctl vm remove NAME --replication-only") from None

    def save_replication(self, rec: ReplicationRecord) -> None:
        """Write every field of an existing relationship (one transaction: the commit point)."""
        sets = ", ".join(f"{c}=?" for c in _REPLICATION_COLUMNS[1:])
        with self._lock:
            cur = self._db.execute(f"UPDATE replication SET {sets} WHERE vm=?", rec._row()[1:] + (rec.vm,))
            if cur.rowcount == 0:
                raise NotFoundError(f"replication of VM {rec.vm!r} is not enabled")

    def list_replications(self) -> list[ReplicationRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_REPLICATION_COLUMNS)} FROM replication ORDER BY vm")
            return [ReplicationRecord._from_row(r) for r in rows.fetchall()]

    def remove_replication(self, vm: str) -> None:
        with self._lock, self.transaction() as db:
            db.execute("DELETE FROM replication_cycles WHERE vm=?", (vm,))
            db.execute("DELETE FROM replication_initial WHERE vm=?", (vm,))
            db.execute("DELETE FROM meta WHERE key=?", (f"statistics_reset_ns:{vm}",))
            cur = db.execute("DELETE FROM replication WHERE vm=?", (vm,))
            if cur.rowcount == 0:
                raise NotFoundError(f"replication of VM {vm!r} is not enabled")

    def set_initial_progress(self, vm: str, p: InitialProgress) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO replication_initial VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (vm, disk_id) DO UPDATE SET "
                "size_bytes=excluded.size_bytes, durable_offset=excluded.durable_offset, "
                "allocated_bytes=excluded.allocated_bytes, done_bytes=excluded.done_bytes",
                (vm, str(p.disk_id), p.size_bytes, p.durable_offset, p.allocated_bytes, p.done_bytes))

    def initial_progress(self, vm: str) -> list[InitialProgress]:
        with self._lock:
            rows = self._db.execute("SELECT disk_id, size_bytes, durable_offset, allocated_bytes, done_bytes "
                                    "FROM replication_initial WHERE vm=?", (vm,)).fetchall()
        return [InitialProgress(uuid.UUID(d), s, o, a, n) for d, s, o, a, n in rows]

    def clear_initial_progress(self, vm: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM replication_initial WHERE vm=?", (vm,))

    def add_cycle_stat(self, vm: str, stat: CycleStat) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO replication_cycles (vm, sequence, started_ns, finished_ns, wire_bytes, raw_bytes, "
                "result, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (vm, stat.sequence, stat.started_ns, stat.finished_ns, stat.wire_bytes, stat.raw_bytes,
                 stat.result.value, stat.error))

    def cycle_stats(self, vm: str, since_ns: int) -> list[CycleStat]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, started_ns, finished_ns, wire_bytes, raw_bytes, result, error "
                "FROM replication_cycles WHERE vm=? AND COALESCE(finished_ns, started_ns) >= ? ORDER BY id",
                (vm, since_ns)).fetchall()
        return [CycleStat(q, s, f, w, r, CycleResult(res), e) for q, s, f, w, r, res, e in rows]

    def prune_cycle_stats(self, vm: str, before_ns: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM replication_cycles WHERE vm=? AND COALESCE(finished_ns, started_ns) < ?",
                             (vm, before_ns))

    # --- settings the operator changed at run time (meta rows other than the schema version) -----
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        """Store ``value`` under ``key`` (``None`` deletes the row)."""
        if key == "schema_version":
            raise ValueError("the schema version is the database's own")
        with self._lock:
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # --- monitoring settings and statistics resets (in ``meta``: no schema change) ------------------
    def monitoring(self) -> dict:
        """The stored monitoring settings (``monitoring_interval_s``, ``monitoring_start``,
        ``latency_limit_s``); {} = defaults."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM meta WHERE key IN "
                                    "('monitoring_interval_s', 'monitoring_start', 'latency_limit_s')").fetchall()
        return {k: v if k == "monitoring_start" else int(v) for k, v in rows}

    def set_monitoring(self, values: dict) -> None:
        with self._lock, self.transaction():
            for key in ("monitoring_interval_s", "monitoring_start", "latency_limit_s"):
                if key in values:
                    self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                     (key, str(values[key])))

    def statistics_reset_ns(self, vm: str) -> int | None:
        """When the VM's statistics were last reset (Reset-VMReplicationStatistics); None: never."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (f"statistics_reset_ns:{vm}",)).fetchone()
        return int(row[0]) if row else None

    def reset_statistics(self, vm: str, now_ns: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             (f"statistics_reset_ns:{vm}", str(now_ns)))
