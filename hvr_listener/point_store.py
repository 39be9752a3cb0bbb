"""Recovery points and test failovers in the listener's database (schema version 2).

A mixin of :class:`hvr_listener.store.ListenerStore`: the same connection,
lock and transactions.  The rows say which points exist and what was decided
about them; the undo log files hold the pre-images
(:mod:`hvr_listener.recovery_history` keeps the two in step).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass

from hvr_common.pure.recovery_points import Consistency, HistorySettings, Point

SCHEMA_V2 = """
ALTER TABLE replicas ADD COLUMN recovery_history INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replicas ADD COLUMN fine_window_min INTEGER NOT NULL DEFAULT 60;
ALTER TABLE replicas ADD COLUMN app_consistent_hours INTEGER;
ALTER TABLE replicas ADD COLUMN last_test_failover_ns INTEGER;
ALTER TABLE cycles ADD COLUMN consistency TEXT NOT NULL DEFAULT 'crash';
CREATE TABLE points (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL REFERENCES replicas(vm_id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    capturing INTEGER,
    undo_bytes INTEGER NOT NULL DEFAULT 0,
    created_ns INTEGER NOT NULL
);
CREATE INDEX points_by_vm ON points (vm_id, id);
CREATE TABLE test_failovers (
    vm_id TEXT PRIMARY KEY REFERENCES replicas(vm_id) ON DELETE CASCADE,
    point_id INTEGER NOT NULL,
    started_ns INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class TestFailoverRow:
    vm_id: uuid.UUID
    point_id: int
    started_ns: int


def _point(row) -> Point:
    pid, seq, time_ns, consistency, capturing, undo_bytes = row
    return Point(pid, seq, time_ns, Consistency(consistency), None if capturing is None else bool(capturing),
                 undo_bytes)


class PointRows:
    """Point and test-failover rows (mixed into ListenerStore: uses its ``_lock``, ``_db``, ``transaction``)."""

    _lock: object
    _db: sqlite3.Connection

    def add_point_in_transaction(self, vm_id: uuid.UUID, sequence: int, time_ns: int, consistency: str) -> int:
        """Inside the transaction that marks cycle ``sequence`` applied: its point, the latest one.

        The previous latest point is deleted if it did not capture (nothing can reach it now)."""
        db = self._db
        vm = str(vm_id)
        # every earlier point that does not capture (decided so, or never decided) can no longer be
        # reached, except one a test failover stands on (start refuses those, this keeps it regardless)
        db.execute("DELETE FROM points WHERE vm_id=? AND (capturing IS NULL OR capturing=0) AND id NOT IN "
                   "(SELECT point_id FROM test_failovers WHERE vm_id=?)", (vm, vm))
        cur = db.execute("INSERT INTO points (vm_id, sequence, time_ns, consistency, capturing, created_ns) "
                         "VALUES (?, ?, ?, ?, NULL, ?)", (vm, sequence, time_ns, consistency, time.time_ns()))
        return cur.lastrowid

    def add_base_point(self, vm_id: uuid.UUID, sequence: int, time_ns: int) -> int:
        """A capturing point at the images as they stand before the next cycle applies (a kept-aside copy's
        own state, :mod:`hvr_listener.kept_aside`); returns its id."""
        with self._lock, self.transaction():
            cur = self._db.execute("INSERT INTO points (vm_id, sequence, time_ns, consistency, capturing, created_ns) "
                                   "VALUES (?, ?, ?, 'crash', 1, ?)", (str(vm_id), sequence, time_ns, time.time_ns()))
        return cur.lastrowid

    def points(self, vm_id: uuid.UUID) -> list[Point]:
        with self._lock:
            rows = self._db.execute("SELECT id, sequence, time_ns, consistency, capturing, undo_bytes FROM points "
                                    "WHERE vm_id=? ORDER BY id", (str(vm_id),)).fetchall()
        return [_point(r) for r in rows]

    def set_capturing(self, vm_id: uuid.UUID, point_id: int, capturing: bool) -> bool:
        """Store the decision unless one is stored already; return the stored one (a decision never changes)."""
        with self._lock, self.transaction():
            self._db.execute("UPDATE points SET capturing=? WHERE vm_id=? AND id=? AND capturing IS NULL",
                             (int(capturing), str(vm_id), point_id))
            row = self._db.execute("SELECT capturing FROM points WHERE vm_id=? AND id=?",
                                   (str(vm_id), point_id)).fetchone()
        return bool(row[0]) if row else capturing

    def set_point_size(self, vm_id: uuid.UUID, point_id: int, undo_bytes: int) -> None:
        with self._lock:
            self._db.execute("UPDATE points SET undo_bytes=? WHERE vm_id=? AND id=?",
                             (undo_bytes, str(vm_id), point_id))

    def drop_point(self, vm_id: uuid.UUID, point_id: int, into_id: int | None, into_bytes: int | None) -> None:
        """Forget a dropped point; a merge also records the size of the log it was merged into."""
        with self._lock, self.transaction():
            self._db.execute("DELETE FROM points WHERE vm_id=? AND id=?", (str(vm_id), point_id))
            if into_id is not None:
                self._db.execute("UPDATE points SET undo_bytes=? WHERE vm_id=? AND id=?",
                                 (into_bytes, str(vm_id), into_id))

    # --- settings the primary sends -----------------------------------------------------------
    def set_history_settings(self, vm_id: uuid.UUID, settings: HistorySettings) -> None:
        with self._lock:
            self._db.execute("UPDATE replicas SET recovery_history=?, fine_window_min=?, app_consistent_hours=? "
                             "WHERE vm_id=?", (settings.recovery_history, settings.fine_window_min,
                                               settings.app_consistent_hours, str(vm_id)))

    # --- test failovers -------------------------------------------------------------------------
    def test_failover(self, vm_id: uuid.UUID) -> TestFailoverRow | None:
        with self._lock:
            row = self._db.execute("SELECT vm_id, point_id, started_ns FROM test_failovers WHERE vm_id=?",
                                   (str(vm_id),)).fetchone()
        return TestFailoverRow(uuid.UUID(row[0]), row[1], row[2]) if row else None

    def test_failovers(self) -> list[TestFailoverRow]:
        with self._lock:
            rows = self._db.execute("SELECT vm_id, point_id, started_ns FROM test_failovers").fetchall()
        return [TestFailoverRow(uuid.UUID(v), p, s) for v, p, s in rows]

    def start_test_failover(self, vm_id: uuid.UUID, point_id: int, started_ns: int) -> None:
        """Pin the point (thinning keeps it) and record LastTestFailoverTime, together."""
        with self._lock, self.transaction():
            self._db.execute("INSERT INTO test_failovers VALUES (?, ?, ?)", (str(vm_id), point_id, started_ns))
            self._db.execute("UPDATE replicas SET last_test_failover_ns=? WHERE vm_id=?", (started_ns, str(vm_id)))

    def stop_test_failover(self, vm_id: uuid.UUID) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM test_failovers WHERE vm_id=?", (str(vm_id),)).rowcount == 1
