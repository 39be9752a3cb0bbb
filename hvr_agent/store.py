"""The agent's state database (SQLite in WAL mode under ``state_dir``).

Holds the registered VMs and their disks, so exports survive a restart.
Methods are synchronous and short; the daemon calls them through
``asyncio.to_thread``.  One connection, serialised by a lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hvr_common.errors import ConflictError, CorruptError, NotFoundError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL UNIQUE,
    generation INTEGER NOT NULL,
    next_sequence INTEGER NOT NULL,
    read_only INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    disk_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    position INTEGER NOT NULL,
    PRIMARY KEY (vm, name)
);
"""


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


class AgentStore:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise CorruptError(f"agent state database {path} is unreadable: {exc}",
                               hint="restore it from backup or move it aside to start empty") from None
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise CorruptError(f"agent state database {path} has schema {row[0]}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def list_vms(self) -> list[VmRecord]:
        with self._lock:
            vms = self._db.execute(
                "SELECT name, vm_id, generation, next_sequence, read_only FROM vms ORDER BY name").fetchall()
            out = []
            for name, vm_id, gen, seq, ro in vms:
                disks = self._db.execute(
                    "SELECT name, disk_id, path FROM disks WHERE vm=? ORDER BY position", (name,)).fetchall()
                out.append(VmRecord(name, uuid.UUID(vm_id), gen, seq, bool(ro),
                                    tuple(DiskRecord(d, uuid.UUID(i), Path(p)) for d, i, p in disks)))
            return out

    def add_vm(self, name: str, disks: list[tuple[str, Path]], read_only: bool) -> VmRecord:
        vm_id = uuid.uuid4()
        recs = tuple(DiskRecord(dname, uuid.uuid4(), path) for dname, path in disks)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO vms VALUES (?, ?, 1, 1, ?, ?)",
                                 (name, str(vm_id), int(read_only), time.time_ns()))
                for pos, d in enumerate(recs):
                    self._db.execute("INSERT INTO disks VALUES (?, ?, ?, ?, ?)",
                                     (name, d.name, str(d.disk_id), str(d.path), pos))
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                if "vms.name" in str(exc):
                    raise ConflictError(f"a VM named {name!r} is already registered") from None
                if "disks.path" in str(exc):
                    raise ConflictError("one of the disk images already belongs to a registered VM",
                                        hint="hvrctl vm list shows which") from None
                raise ConflictError(f"cannot register VM {name!r}: {exc}") from None
        return VmRecord(name, vm_id, 1, 1, read_only, recs)

    def remove_vm(self, name: str) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM vms WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise NotFoundError(f"no VM named {name!r} is registered")

    def set_next_sequence(self, name: str, next_sequence: int) -> None:
        with self._lock:
            self._db.execute("UPDATE vms SET next_sequence=? WHERE name=?", (next_sequence, name))
