"""Keys of primaries and authorization entries in the listener's database (schema version 3).

A mixin of :class:`hvr_listener.store.ListenerStore`: the same connection,
lock and transactions.  A principal may have up to ``MAX_KEYS_PER_PRINCIPAL``
keys at once (a rotation: add the new key, switch the primary, remove the
old one), each named by its key id (:func:`hvr_common.pure.token_auth.key_id`).
Authorization entries are keyed by their allowed primary pattern.  Version 3
also records each replica's trust group (``DEFAULT`` for replicas created
before it).
"""

from __future__ import annotations

import sqlite3
import time

from hvr_common.pure.authorization import DEFAULT_TRUST_GROUP, AuthorizationEntry
from hvr_common.pure.errors import ConflictError, NotFoundError
from hvr_common.pure.token_auth import Key, key_id

MAX_KEYS_PER_PRINCIPAL = 2


def migrate_v3(db: sqlite3.Connection) -> None:
    """Keys get ids (several per principal), authorization entries, replicas their trust group."""
    db.execute("CREATE TABLE principal_keys (principal TEXT NOT NULL, key_id TEXT NOT NULL, "
               "secret BLOB NOT NULL, added_ns INTEGER NOT NULL, PRIMARY KEY (principal, key_id))")
    for principal, secret, added_ns in db.execute("SELECT principal, secret, added_ns FROM keys").fetchall():
        db.execute("INSERT INTO principal_keys VALUES (?, ?, ?, ?)",
                   (principal, key_id(bytes(secret)), bytes(secret), added_ns))
    db.execute("DROP TABLE keys")
    db.execute("CREATE TABLE authorization_entries (pattern TEXT PRIMARY KEY, storage TEXT NOT NULL, "
               "trust_group TEXT NOT NULL, added_ns INTEGER NOT NULL)")
    db.execute(f"ALTER TABLE replicas ADD COLUMN trust_group TEXT NOT NULL DEFAULT '{DEFAULT_TRUST_GROUP}'")


class AuthRows:
    """Keys and authorization entries (a mixin of ``ListenerStore``: uses its ``_db``, ``_lock``, ``transaction``)."""

    # --- keys ---------------------------------------------------------------
    def add_key(self, key: Key, *, replace: bool) -> dict:
        """Install a key: added beside the principal's other key, or (``replace``) instead of all of them.

        Returns ``{"principal", "key_id", "replaced": [key ids removed]}``; 409 if the key is installed
        already, or the principal has ``MAX_KEYS_PER_PRINCIPAL`` keys and ``replace`` is not given.
        """
        kid = key.key_id
        with self._lock, self.transaction():
            rows = self._db.execute("SELECT key_id FROM principal_keys WHERE principal=? ORDER BY added_ns",
                                    (key.principal,)).fetchall()
            present = [r[0] for r in rows]
            if kid in present:
                raise ConflictError(f"key {kid} of {key.principal!r} is installed already")
            if replace:
                self._db.execute("DELETE FROM principal_keys WHERE principal=?", (key.principal,))
            elif len(present) >= MAX_KEYS_PER_PRINCIPAL:
                raise ConflictError(f"{key.principal!r} has {len(present)} keys installed already "
                                    f"(at most {MAX_KEYS_PER_PRINCIPAL} at once)",
                                    hint=f"remove the old one first (hvrctl server key remove {key.principal} "
                                         f"--key-id ID), or use --replace")
            self._db.execute("INSERT INTO principal_keys VALUES (?, ?, ?, ?)",
                             (key.principal, kid, key.secret, time.time_ns()))
        return {"principal": key.principal, "key_id": kid, "replaced": present if replace else []}

    def remove_key(self, principal: str, key_id: str | None = None) -> list[str]:
        """Remove one key of ``principal`` (``key_id``) or all of them; returns the removed ids (404 if none)."""
        with self._lock, self.transaction():
            if key_id is None:
                rows = self._db.execute("SELECT key_id FROM principal_keys WHERE principal=?", (principal,))
            else:
                rows = self._db.execute("SELECT key_id FROM principal_keys WHERE principal=? AND key_id=?",
                                        (principal, key_id))
            removed = [r[0] for r in rows.fetchall()]
            if not removed:
                which = f"key {key_id} of {principal!r}" if key_id else f"key for {principal!r}"
                raise NotFoundError(f"no {which} is installed")
            self._db.executemany("DELETE FROM principal_keys WHERE principal=? AND key_id=?",
                                 [(principal, k) for k in removed])
        return removed

    def principal_keys(self) -> dict[str, tuple[Key, ...]]:
        """Every principal's keys, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT principal, secret FROM principal_keys ORDER BY added_ns").fetchall()
        out: dict[str, tuple[Key, ...]] = {}
        for principal, secret in rows:
            out[principal] = out.get(principal, ()) + (Key(principal, bytes(secret)),)
        return out

    def key_list(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT principal, key_id, added_ns FROM principal_keys "
                                    "ORDER BY principal, added_ns").fetchall()
        return [{"principal": p, "key_id": k, "added_ns": t} for p, k, t in rows]

    # --- authorization entries ----------------------------------------------
    def authorization_entries(self) -> list[AuthorizationEntry]:
        with self._lock:
            rows = self._db.execute("SELECT pattern, storage, trust_group FROM authorization_entries "
                                    "ORDER BY pattern").fetchall()
        return [AuthorizationEntry(p, s, g) for p, s, g in rows]

    def add_entry(self, entry: AuthorizationEntry) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT INTO authorization_entries VALUES (?, ?, ?, ?)",
                                 (entry.pattern, entry.storage, entry.trust_group, time.time_ns()))
            except sqlite3.IntegrityError:
                raise ConflictError(f"an authorization entry for {entry.pattern!r} exists already",
                                    hint=f"change it with: hvrctl authz set {entry.pattern} ...") from None

    def set_entry(self, entry: AuthorizationEntry) -> None:
        with self._lock:
            if self._db.execute("UPDATE authorization_entries SET storage=?, trust_group=? WHERE pattern=?",
                                (entry.storage, entry.trust_group, entry.pattern)).rowcount == 0:
                raise NotFoundError(f"no authorization entry for {entry.pattern!r}")

    def remove_entry(self, pattern: str) -> None:
        with self._lock:
            if self._db.execute("DELETE FROM authorization_entries WHERE pattern=?", (pattern,)).rowcount == 0:
                raise NotFoundError(f"no authorization entry for {pattern!r}")
