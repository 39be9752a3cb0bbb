"""Failovers and heartbeats in the listener's database (schema version 4).

A mixin of :class:`hvr_listener.store.ListenerStore`: the same connection,
lock and transactions.  A ``failovers`` row exists from the transaction that
starts a failover (with the state and the raised generation, written by the
store's ``begin_failover``) until it is cancelled; after completion it stays,
with the FailedOver replica row, as the record of what was chosen.  The
``heartbeats`` row holds the primary's last heartbeat, durable so a restarted
listener still knows a running primary (the split-brain guard's input).
"""

from __future__ import annotations

import sqlite3
import uuid

from hvr_common.pure.failover import Failover, FailoverStep, Heartbeat

SCHEMA_V4 = """
CREATE TABLE failovers (
    vm_id TEXT PRIMARY KEY REFERENCES replicas(vm_id) ON DELETE CASCADE,
    point_id INTEGER NOT NULL,
    point_sequence INTEGER NOT NULL,
    point_time_ns INTEGER NOT NULL,
    old_generation INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    step TEXT NOT NULL,
    started_ns INTEGER NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,
    completed_ns INTEGER
);
CREATE TABLE heartbeats (
    vm_id TEXT PRIMARY KEY REFERENCES replicas(vm_id) ON DELETE CASCADE,
    received_ns INTEGER NOT NULL,
    running INTEGER NOT NULL,
    nbd_clients INTEGER NOT NULL
);
"""

_COLS = "point_id, point_sequence, point_time_ns, old_generation, generation, step, started_ns, forced, completed_ns"


class FailoverRows:
    """Failover and heartbeat rows (mixed into ListenerStore: uses its ``_lock``, ``_db``, ``transaction``)."""

    _lock: object
    _db: sqlite3.Connection

    def failover(self, vm_id: uuid.UUID) -> Failover | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM failovers WHERE vm_id=?", (str(vm_id),)).fetchone()
        if row is None:
            return None
        pid, seq, time_ns, old, gen, step, started, forced, completed = row
        return Failover(pid, seq, time_ns, old, gen, FailoverStep(step), started, bool(forced), completed)

    def set_failover_step(self, vm_id: uuid.UUID, old: FailoverStep, new: FailoverStep) -> bool:
        with self._lock:
            return self._db.execute("UPDATE failovers SET step=? WHERE vm_id=? AND step=?",
                                    (new.value, str(vm_id), old.value)).rowcount == 1

    def forget_history(self, vm_id: uuid.UUID) -> None:
        """Complete-VMFailover: the replica's points and cycles go (their files are deleted by the caller)."""
        with self._lock, self.transaction():
            self._db.execute("DELETE FROM points WHERE vm_id=?", (str(vm_id),))
            self._db.execute("DELETE FROM cycles WHERE vm_id=?", (str(vm_id),))

    def record_heartbeat(self, vm_id: uuid.UUID, generation: int, beat: Heartbeat) -> bool:
        """Keep the primary's heartbeat, only while the replica is at ``generation`` (False: it is not)."""
        with self._lock, self.transaction():
            cur = self._db.execute(
                "INSERT INTO heartbeats (vm_id, received_ns, running, nbd_clients) SELECT vm_id, ?, ?, ? "
                "FROM replicas WHERE vm_id=? AND generation=? ON CONFLICT(vm_id) DO UPDATE SET "
                "received_ns=excluded.received_ns, running=excluded.running, nbd_clients=excluded.nbd_clients",
                (beat.received_ns, int(beat.running), beat.nbd_clients, str(vm_id), generation))
            return cur.rowcount == 1

    def heartbeat(self, vm_id: uuid.UUID) -> Heartbeat | None:
        with self._lock:
            row = self._db.execute("SELECT received_ns, running, nbd_clients FROM heartbeats WHERE vm_id=?",
                                   (str(vm_id),)).fetchone()
        return Heartbeat(row[0], bool(row[1]), row[2]) if row else None
