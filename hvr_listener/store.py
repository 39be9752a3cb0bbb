"""The listener's state database (SQLite, WAL): settings, keys, authorization entries, replicas, cycles.

Synchronous short transactions; the daemon calls them via ``asyncio.to_thread``.
The commit point of a received cycle is :meth:`ListenerStore.record_cycle`;
of an applied cycle :meth:`ListenerStore.mark_applied`.
The schema is versioned: opening a database of an older version upgrades it
through ``MIGRATIONS`` in one transaction; a newer one is refused
(:mod:`hvr_common.shell.state_db`).

The store persists a replica's replication state but never decides it: the
methods that write it (:meth:`ListenerStore.create_replica`,
:meth:`ListenerStore.change_replica_state`,
:meth:`ListenerStore.advance_initial_offset`) write the state they are given
and are called only by :mod:`hvr_listener.replica_state`.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hvr_common.shell.state_db import Migration, StateDatabase
from hvr_common.pure.errors import ConflictError, NotFoundError
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.recovery_points import HistorySettings
from hvr_common.pure.authorization import DEFAULT_TRUST_GROUP
from hvr_common.pure.failover import Failover
from hvr_listener.auth_store import AuthRows, migrate_v3
from hvr_listener.failover_rows import SCHEMA_V4, FailoverRows
from hvr_listener.point_store import SCHEMA_V2, PointRows

# Version 1 is SCHEMA; each later version is one step of MIGRATIONS, (version, SQL or function),
# numbered 2, 3, ...  (hvr_common/shell/state_db.py runs them; never edit a released step, add one).
SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (principal TEXT PRIMARY KEY, secret BLOB NOT NULL, added_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (
    vm_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    principal TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    state_detail TEXT,
    frequency_s INTEGER NOT NULL,
    compression INTEGER NOT NULL,
    storage_dir TEXT NOT NULL,
    next_sequence INTEGER NOT NULL DEFAULT 0,
    last_received_sequence INTEGER NOT NULL DEFAULT 0,
    last_applied_sequence INTEGER NOT NULL DEFAULT 0,
    last_replication_ns INTEGER,
    last_applied_log_ns INTEGER,
    last_applied_ns INTEGER,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replica_disks (
    vm_id TEXT NOT NULL REFERENCES replicas(vm_id) ON DELETE CASCADE,
    disk_id TEXT NOT NULL,
    name TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    path TEXT NOT NULL,
    initial_offset INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL,
    PRIMARY KEY (vm_id, disk_id)
);
CREATE TABLE IF NOT EXISTS cycles (
    vm_id TEXT NOT NULL REFERENCES replicas(vm_id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    digest TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    path TEXT NOT NULL,
    log_created_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    applied_ns INTEGER,
    PRIMARY KEY (vm_id, sequence)
);
"""
MIGRATIONS: tuple[Migration, ...] = (
    (2, SCHEMA_V2),  # recovery points, test failovers
    (3, migrate_v3),  # key ids (two keys per principal), authorization entries, trust groups
    (4, SCHEMA_V4),  # failovers, the primary's last heartbeat
)

DEFAULT_SETTINGS = {
    "enabled": False,
    "auth_modes": ["token"],
    "allow_any_authenticated": True,
}


@dataclass(frozen=True)
class ReplicaDisk:
    disk_id: uuid.UUID
    name: str
    size_bytes: int
    path: Path
    initial_offset: int


@dataclass(frozen=True)
class Replica:
    vm_id: uuid.UUID
    name: str
    principal: str
    generation: int
    state: ReplicationState
    state_detail: str | None
    frequency_s: int
    compression: bool
    storage_dir: Path
    next_sequence: int
    last_received_sequence: int
    last_applied_sequence: int
    last_replication_ns: int | None
    last_applied_log_ns: int | None
    last_applied_ns: int | None
    disks: tuple[ReplicaDisk, ...] = field(default=())
    created_ns: int = 0  # tells this replica from an earlier one of the same VM (removed, enabled again)
    history: HistorySettings = HistorySettings()  # recovery history settings, as the primary sent them
    last_test_failover_ns: int | None = None
    trust_group: str = DEFAULT_TRUST_GROUP  # of the primary that created it (docs/authorization.md)

    def disk(self, disk_id: uuid.UUID) -> ReplicaDisk:
        for d in self.disks:
            if d.disk_id == disk_id:
                return d
        raise NotFoundError(f"VM {self.name} has no disk {disk_id}", detail={"code": "unknown_disk"})


@dataclass(frozen=True)
class CycleRow:
    vm_id: uuid.UUID
    sequence: int
    generation: int
    digest: str
    bytes: int
    path: Path
    log_created_ns: int
    received_ns: int
    applied_ns: int | None
    consistency: str = "crash"  # application: frozen by the primary's hooks around the cut


class ListenerStore(AuthRows, PointRows, FailoverRows, StateDatabase):
    def __init__(self, path: Path):
        super().__init__(path, SCHEMA, SCHEMA_VERSION, "listener", MIGRATIONS)

    # --- settings (keys and authorization entries: auth_store.AuthRows) --
    def settings(self) -> dict:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM settings").fetchall()
        out = dict(DEFAULT_SETTINGS)
        out.update({k: json.loads(v) for k, v in rows})
        return out

    def update_settings(self, changes: dict) -> dict:
        with self._lock, self.transaction():
            for k, v in changes.items():
                self._db.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                                 (k, json.dumps(v)))
        return self.settings()

    # --- replicas ---------------------------------------------------------
    _REPLICA_COLS = ("vm_id, name, principal, generation, state, state_detail, frequency_s, compression, "
                     "storage_dir, next_sequence, last_received_sequence, last_applied_sequence, "
                     "last_replication_ns, last_applied_log_ns, last_applied_ns, created_ns, "
                     "recovery_history, fine_window_min, app_consistent_hours, last_test_failover_ns, trust_group")

    def _replica_from_row(self, row) -> Replica:
        (vm_id, name, principal, gen, state, detail, freq, comp, sdir, nseq, lrecv, lapp, lrep, lalog,
         lapplied, created, history, fine, app, last_test, trust_group) = row
        disks = self._db.execute(
            "SELECT disk_id, name, size_bytes, path, initial_offset FROM replica_disks WHERE vm_id=? "
            "ORDER BY position", (vm_id,)).fetchall()
        return Replica(uuid.UUID(vm_id), name, principal, gen, ReplicationState(state), detail, freq, bool(comp),
                       Path(sdir), nseq, lrecv, lapp, lrep, lalog, lapplied,
                       tuple(ReplicaDisk(uuid.UUID(i), n, s, Path(p), o) for i, n, s, p, o in disks), created,
                       HistorySettings(history, fine, app), last_test, trust_group)

    def replica(self, vm_id: uuid.UUID) -> Replica | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._REPLICA_COLS} FROM replicas WHERE vm_id=?",
                                   (str(vm_id),)).fetchone()
            return self._replica_from_row(row) if row else None

    def replica_by_name(self, name: str) -> Replica | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._REPLICA_COLS} FROM replicas WHERE name=?", (name,)).fetchone()
            return self._replica_from_row(row) if row else None

    def replicas(self) -> list[Replica]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._REPLICA_COLS} FROM replicas ORDER BY name").fetchall()
            return [self._replica_from_row(r) for r in rows]

    def create_replica(self, vm_id: uuid.UUID, name: str, principal: str, generation: int, frequency_s: int,
                       compression: bool, storage_dir: Path, disks: list[tuple[uuid.UUID, str, int, Path]], *,
                       state: ReplicationState, trust_group: str = DEFAULT_TRUST_GROUP) -> None:
        """Insert a replica in ``state`` (decided by :mod:`hvr_listener.replica_state`) with its disks."""
        with self._lock, self.transaction():
            try:
                self._db.execute(
                    "INSERT INTO replicas (vm_id, name, principal, generation, state, frequency_s, compression, "
                    "storage_dir, created_ns, trust_group) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (str(vm_id), name, principal, generation, ReplicationState(state).value,
                     frequency_s, int(compression), str(storage_dir), time.time_ns(), trust_group))
            except sqlite3.IntegrityError:
                raise ConflictError(f"a replica named {name!r} already exists for another VM",
                                    detail={"code": "replica_conflict"}) from None
            for pos, (disk_id, dname, size, path) in enumerate(disks):
                self._db.execute("INSERT INTO replica_disks (vm_id, disk_id, name, size_bytes, path, position) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (str(vm_id), str(disk_id), dname, size, str(path), pos))

    # Columns a state change may set together with ``state``.
    _STATE_CHANGE_FIELDS = frozenset({"state_detail", "next_sequence", "last_received_sequence",
                                      "last_applied_sequence", "last_replication_ns", "last_applied_ns"})

    def change_replica_state(self, vm_id: uuid.UUID, created_ns: int, old: ReplicationState,
                             new: ReplicationState, **fields) -> bool:
        """Write ``new`` (and ``fields``) only while the replica is the one created at ``created_ns`` and in ``old``.

        True if it was written; False if that replica is gone or its state moved meanwhile.
        """
        unknown = set(fields) - self._STATE_CHANGE_FIELDS
        if unknown:
            raise ValueError(f"not state columns: {sorted(unknown)}")
        cols = ", ".join(f"{k}=?" for k in ("state", *fields))
        with self._lock:
            cur = self._db.execute(f"UPDATE replicas SET {cols} WHERE vm_id=? AND created_ns=? AND state=?",
                                   (ReplicationState(new).value, *fields.values(), str(vm_id), created_ns,
                                    ReplicationState(old).value))
            return cur.rowcount == 1

    def advance_initial_offset(self, vm_id: uuid.UUID, created_ns: int, disk_id: uuid.UUID, generation: int,
                               start: int, end: int,
                               decide: Callable[[ReplicationState], ReplicationState | None],
                               ) -> tuple[int, ReplicationState, int] | None:
        """Move a disk's durable initial offset to ``end``, in one transaction with its conditions.

        It moves only while the replica is the one created at ``created_ns``, at
        ``generation``, the offset lies in ``[start, end)`` and ``decide`` (given
        the replica's state) names the state to write with it (None: no move).
        Returns (generation, state, offset) as they are afterwards, or None if
        that replica or disk is gone.
        """
        with self._lock, self.transaction():
            row = self._db.execute(
                "SELECT r.generation, r.state, d.initial_offset FROM replicas r JOIN replica_disks d "
                "ON d.vm_id = r.vm_id WHERE r.vm_id=? AND r.created_ns=? AND d.disk_id=?",
                (str(vm_id), created_ns, str(disk_id))).fetchone()
            if row is None:
                return None
            gen, state, offset = row
            state = ReplicationState(state)
            new = decide(state) if gen == generation and start <= offset < end else None
            if new is not None:
                self._db.execute("UPDATE replica_disks SET initial_offset=? WHERE vm_id=? AND disk_id=?",
                                 (end, str(vm_id), str(disk_id)))
                self._db.execute("UPDATE replicas SET state=? WHERE vm_id=?", (ReplicationState(new).value, str(vm_id)))
                state, offset = ReplicationState(new), end
            return gen, state, offset

    def mark_loaded(self, vm_id: uuid.UUID, created_ns: int, generation: int, old: ReplicationState,
                    new: ReplicationState) -> bool:
        """Every disk's initial offset to its size and the state to ``new``, in one transaction, only while the
        replica is the one created at ``created_ns``, at ``generation`` and in ``old`` (media was imported)."""
        with self._lock, self.transaction():
            cur = self._db.execute("UPDATE replicas SET state=? WHERE vm_id=? AND created_ns=? AND generation=? "
                                   "AND state=?", (ReplicationState(new).value, str(vm_id), created_ns, generation,
                                                   ReplicationState(old).value))
            if cur.rowcount != 1:
                return False
            self._db.execute("UPDATE replica_disks SET initial_offset=size_bytes WHERE vm_id=?", (str(vm_id),))
            return True

    # --- failover: the state and the generation change with the failover row (hvr_listener.failover) ---
    def begin_failover(self, vm_id: uuid.UUID, created_ns: int, old: ReplicationState, new: ReplicationState,
                       row: Failover) -> bool:
        """Record ``row`` and move the replica to ``new`` at ``row.generation``, in one transaction, only while
        it is the one created at ``created_ns``, in ``old`` and at ``row.old_generation``."""
        with self._lock, self.transaction():
            cur = self._db.execute("UPDATE replicas SET state=?, generation=? WHERE vm_id=? AND created_ns=? "
                                   "AND state=? AND generation=?", (ReplicationState(new).value, row.generation,
                                                                    str(vm_id), created_ns,
                                                                    ReplicationState(old).value, row.old_generation))
            if cur.rowcount != 1:
                return False
            self._db.execute("INSERT INTO failovers (vm_id, point_id, point_sequence, point_time_ns, old_generation, "
                             "generation, step, started_ns, forced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (str(vm_id), row.point_id, row.point_sequence, row.point_time_ns, row.old_generation,
                              row.generation, row.step.value, row.started_ns, int(row.forced)))
            return True

    def undo_failover(self, vm_id: uuid.UUID, created_ns: int, old: ReplicationState, new: ReplicationState,
                        generation: int) -> bool:
        """Delete the failover row and move the replica back to ``new`` at ``generation`` (one transaction)."""
        with self._lock, self.transaction():
            cur = self._db.execute("UPDATE replicas SET state=?, state_detail=NULL, generation=? WHERE vm_id=? AND "
                                   "created_ns=? AND state=?", (ReplicationState(new).value, generation, str(vm_id),
                                                                created_ns, ReplicationState(old).value))
            if cur.rowcount != 1:
                return False
            self._db.execute("DELETE FROM failovers WHERE vm_id=?", (str(vm_id),))
            return True

    def finish_failover(self, vm_id: uuid.UUID, created_ns: int, old: ReplicationState, new: ReplicationState,
                        completed_ns: int) -> bool:
        """The failover row completed and the replica in ``new``, in one transaction."""
        with self._lock, self.transaction():
            cur = self._db.execute("UPDATE replicas SET state=?, state_detail=NULL WHERE vm_id=? AND created_ns=? "
                                   "AND state=?", (ReplicationState(new).value, str(vm_id), created_ns,
                                                   ReplicationState(old).value))
            if cur.rowcount != 1:
                return False
            self._db.execute("UPDATE failovers SET step='completed', completed_ns=? WHERE vm_id=?",
                             (completed_ns, str(vm_id)))
            return True

    def delete_replica(self, vm_id: uuid.UUID) -> None:
        with self._lock:
            self._db.execute("DELETE FROM replicas WHERE vm_id=?", (str(vm_id),))

    # --- cycles -----------------------------------------------------------
    _CYCLE_COLS = ("vm_id, sequence, generation, digest, bytes, path, log_created_ns, received_ns, applied_ns, "
                   "consistency")

    def cycle(self, vm_id: uuid.UUID, sequence: int) -> CycleRow | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._CYCLE_COLS} FROM cycles WHERE vm_id=? AND sequence=?",
                (str(vm_id), sequence)).fetchone()
        return _cycle(row) if row else None

    def record_cycle(self, vm_id: uuid.UUID, sequence: int, generation: int, digest: str, nbytes: int,
                     path: Path, log_created_ns: int, consistency: str = "crash") -> None:
        """The commit point of a received cycle (after its file is durable)."""
        now = time.time_ns()
        with self._lock, self.transaction():
            self._db.execute("INSERT INTO cycles (vm_id, sequence, generation, digest, bytes, path, log_created_ns, "
                             "received_ns, consistency) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (str(vm_id), sequence, generation, digest, nbytes, str(path), log_created_ns, now,
                              consistency))
            self._db.execute("UPDATE replicas SET next_sequence=?, last_received_sequence=?, last_replication_ns=? "
                             "WHERE vm_id=?", (sequence + 1, sequence, now, str(vm_id)))

    def unapplied_cycles(self, vm_id: uuid.UUID) -> list[CycleRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._CYCLE_COLS} FROM cycles WHERE vm_id=? AND applied_ns IS NULL ORDER BY sequence",
                (str(vm_id),)).fetchall()
        return [_cycle(r) for r in rows]

    def mark_applied(self, vm_id: uuid.UUID, sequence: int, log_created_ns: int, consistency: str = "crash") -> int:
        """The commit point of an applied cycle (after the images are durable); it creates the cycle's
        recovery point (the latest) in the same transaction and returns its id."""
        now = time.time_ns()
        with self._lock, self.transaction():
            point = self.add_point_in_transaction(vm_id, sequence, log_created_ns, consistency)
            self._db.execute("UPDATE cycles SET applied_ns=? WHERE vm_id=? AND sequence=?", (now, str(vm_id), sequence))
            self._db.execute("UPDATE replicas SET last_applied_sequence=?, last_applied_log_ns=?, last_applied_ns=? "
                             "WHERE vm_id=?", (sequence, log_created_ns, now, str(vm_id)))
        return point

    def rebase_replica(self, vm_id: uuid.UUID, created_ns: int, old: ReplicationState, new: ReplicationState,
                       next_sequence: int) -> list[Path] | None:
        """After a resync (one transaction): stored cycles not yet applied are dropped and the replica
        expects ``next_sequence`` next, as if ``next_sequence - 1`` were received and applied.  Only while
        the replica is the one created at ``created_ns`` and in ``old``; returns the dropped cycles' files,
        or None if nothing was written."""
        with self._lock, self.transaction():
            rows = self._db.execute("SELECT path FROM cycles WHERE vm_id=? AND applied_ns IS NULL",
                                    (str(vm_id),)).fetchall()
            cur = self._db.execute(
                "UPDATE replicas SET state=?, state_detail=NULL, next_sequence=?, last_received_sequence=?, "
                "last_applied_sequence=? WHERE vm_id=? AND created_ns=? AND state=?",
                (ReplicationState(new).value, next_sequence, next_sequence - 1, next_sequence - 1, str(vm_id),
                 created_ns, ReplicationState(old).value))
            if cur.rowcount != 1:
                return None
            self._db.execute("DELETE FROM cycles WHERE vm_id=? AND applied_ns IS NULL", (str(vm_id),))
        return [Path(r[0]) for r in rows]

    def cycle_history(self, vm_id: uuid.UUID) -> list[CycleRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._CYCLE_COLS} FROM cycles WHERE vm_id=? ORDER BY sequence", (str(vm_id),)).fetchall()
        return [_cycle(r) for r in rows]


def _cycle(row) -> CycleRow:
    vm_id, seq, gen, digest, nbytes, path, log_ns, recv, applied, consistency = row
    return CycleRow(uuid.UUID(vm_id), seq, gen, digest, nbytes, Path(path), log_ns, recv, applied, consistency)
