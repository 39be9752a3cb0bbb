"""The daemons' SQLite state database: opening it, upgrading its schema, and transactions.

One connection per daemon (WAL, ``synchronous=FULL``, foreign keys on),
serialised by a lock because the daemons call it from worker threads.

Schema versions.  ``meta.schema_version`` says which schema a database has.
Version 1 is the daemon's base schema (``CREATE ... IF NOT EXISTS``); each
later version is one step of the daemon's migration ladder, a list of
``(version, step)`` pairs numbered 2, 3, ... where a step is SQL (one or more
statements) or a function given the connection.  At open:

* a new database gets the base schema and then every step;
* a database at version *v* gets the steps after *v* (at version 1 the base
  schema runs again first, adding a table a version-1 database may lack);
* a database newer than the code knows is refused before anything is written
  (``state_too_new``), so an older hvr never damages a newer one's state.

All of it runs in one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) with
foreign-key enforcement off, as SQLite wants for table rebuilds, and a
``foreign_key_check`` after each step.  A step that fails rolls everything
back: the database stays at its version and the daemon refuses to start
(``state_migration_failed``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hvr_common.pure.errors import CorruptError, HvrError
from hvr_common.pure.wire.error_catalogue import error

MigrationStep = str | Callable[[sqlite3.Connection], None]
Migration = tuple[int, MigrationStep]

BASE_VERSION = 1


class StateDatabase:
    def __init__(self, path: Path, schema: str, version: int, what: str,
                 migrations: Sequence[Migration] = ()):
        if [v for v, _ in migrations] != list(range(BASE_VERSION + 1, version + 1)):
            raise ValueError(f"{what} migrations must be numbered {BASE_VERSION + 1}..{version}, one each")
        self.path = path
        self.what = what
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        try:
            # before anything is written, not even the journal mode
            self._check_not_newer(self._schema_version(), version)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.DatabaseError as exc:
                raise self._unreadable(exc) from None
            self._upgrade(schema, version, migrations)
            self._db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            self._db.close()
            raise

    def _unreadable(self, exc: Exception) -> HvrError:
        return CorruptError(f"{self.what} state database {self.path} is unreadable: {exc}",
                            hint="restore it from backup, or move it aside to start empty")

    def _schema_version(self) -> int | None:
        """The recorded version; None for a new database (no meta table or no version row)."""
        try:
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
                return None
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        if row is None:
            return None
        try:
            found = int(row[0])
        except (TypeError, ValueError):
            found = 0
        if found < BASE_VERSION:
            raise CorruptError(f"{self.what} state database {self.path} has schema version {row[0]!r}",
                               hint="restore it from backup, or move it aside to start empty")
        return found

    def _check_not_newer(self, found: int | None, version: int) -> None:
        if found is not None and found > version:
            raise error("state_too_new",
                        f"{self.what} state database {self.path} has schema version {found}; this hvr knows "
                        f"versions up to {version}",
                        hint="this state database was written by a newer hvr; install that version or restore "
                             "a backup")

    def _upgrade(self, schema: str, version: int, migrations: Sequence[Migration]) -> None:
        db = self._db
        db.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set before BEGIN
        try:
            db.execute("BEGIN IMMEDIATE")
            found = self._schema_version()  # again, now that no one else can write
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        try:
            self._check_not_newer(found, version)
            step_version = BASE_VERSION
            try:
                if found is None or found == BASE_VERSION:
                    _run(db, schema)
                for step_version, step in migrations:
                    if found is None or step_version > found:
                        _run(db, step)
                        _check_foreign_keys(db)
                if found != version:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                               (str(version),))
            except (sqlite3.Error, ValueError, OSError) as exc:
                raise error("state_migration_failed",
                            f"{self.what} state database {self.path}: upgrading schema version {found or 0} to "
                            f"{version} failed at step {step_version}: {exc}; nothing was changed",
                            hint="restore a backup or install the hvr that wrote it; the database is as it was",
                            detail={"from_version": found, "to_version": version, "step": step_version}) from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (call with ``self._lock`` held)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _run(db: sqlite3.Connection, step: MigrationStep) -> None:
    """One step inside the open transaction (``executescript`` would commit it: statements one by one)."""
    if callable(step):
        step(db)
        return
    for statement in sql_statements(step):
        db.execute(statement)


def _check_foreign_keys(db: sqlite3.Connection) -> None:
    bad = db.execute("PRAGMA foreign_key_check").fetchall()
    if bad:
        tables = ", ".join(sorted({row[0] for row in bad}))
        raise sqlite3.IntegrityError(f"rows whose foreign keys point nowhere in {tables}")


def sql_statements(script: str) -> Iterator[str]:
    """The complete statements of an SQL script, in order (a ``;`` inside a string or trigger is kept)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if _has_sql(pending):
                yield pending
            pending = ""
    if _has_sql(pending.removesuffix(";")):
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:80]!r}")


def _has_sql(text: str) -> bool:
    """Whether anything but blanks, comments and semicolons is left."""
    lines = [line.split("--", 1)[0] for line in text.splitlines()]
    return bool("".join(lines).replace(";", "").strip())
