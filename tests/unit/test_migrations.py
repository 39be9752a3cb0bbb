"""State database schema versions: released databases open, the ladder upgrades, newer ones are refused.

The released databases are SQL dumps made by the released store code
(``tests/support/fixtures/make_state_fixtures.py`` says how).  The ladder
itself is tested with a ladder made for the test, so the product schema does
not have to change to prove it.
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from pathlib import Path

import pytest

from hvr_agent import store as agent_store
from hvr_agent.store import AgentStore
from hvr_common.pure.errors import CorruptError, HvrError
from hvr_common.pure.measure import CycleResult
from hvr_common.pure.recovery_points import HistorySettings
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.token_auth import Key, key_id
from hvr_common.pure.tracking_mode import TrackingMode
from hvr_common.shell.state_db import StateDatabase, sql_statements
from hvr_listener import store as listener_store
from hvr_listener.store import ListenerStore

FIXTURES = Path(__file__).resolve().parents[1] / "support" / "fixtures"
DISK_ID = uuid.UUID("0b1c2d3e-4f50-4612-8734-a5b6c7d8e9f0")
VM_ID = uuid.UUID("6f1c3a52-8d7e-4b0a-9c1d-2e3f4a5b6c7d")


def from_dump(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name.replace(".sql", ".db")
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / name).read_text(encoding="utf-8"))
    db.close()
    return path


def recorded_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
    finally:
        db.close()


def file_state(path: Path) -> tuple:
    """The bytes of the database and of any journal beside it."""
    return tuple((p.name, hashlib.sha256(p.read_bytes()).hexdigest())
                 for p in sorted(path.parent.glob(path.name + "*")))


# --- databases written by the released version --------------------------------------------
def test_a_released_agent_database_keeps_its_vms_replication_and_cycles(tmp_path):
    path = from_dump(tmp_path, "agent-v1.sql")
    store = AgentStore(path)
    vms = {v.name: v for v in store.list_vms()}
    assert sorted(vms) == ["db1", "web1"]
    assert [(d.name, str(d.path)) for d in vms["web1"].disks] == [
        ("root", "/srv/vm/web1-root.img"), ("data", "/srv/vm/web1-data.img")]
    assert vms["web1"].next_sequence == 42 and not vms["web1"].read_only and vms["db1"].read_only
    (rec,) = store.list_replications()
    assert (rec.vm, rec.replica_host, rec.replica_port, rec.principal, rec.state, rec.generation,
            rec.next_sequence, rec.base_sequence) == (
        "web1", "replica.example.com", 8443, "primary1.example.com", ReplicationState.REPLICATING, 3, 41, 7)
    (progress,) = store.initial_progress("web1")
    assert (progress.disk_id, progress.durable_offset, progress.done_bytes) == (DISK_ID, 1 << 30, 5 << 20)
    stats = store.cycle_stats("web1", 0)
    assert [(s.sequence, s.result) for s in stats] == [
        (39, CycleResult.OK), (40, CycleResult.OK), (None, CycleResult.ERROR)]
    assert stats[0].wire_bytes == 4096 * 39 and stats[2].error.startswith("replica_unavailable")
    # version 2: the recovery history defaults, nothing for the replica to hear, no frozen cut yet
    assert rec.history == HistorySettings() and (rec.recovery_history, rec.fine_window_min,
                                                 rec.app_consistent_hours) == (0, 60, None)
    assert not rec.settings_pending and rec.last_app_consistent_ns is None
    assert (rec.app_consistent_failures, rec.app_consistent_sequences) == (0, ())
    # version 3: token authentication over plain HTTP, with the key file it had
    assert (rec.auth, rec.ca_file, rec.cert_file, rec.cert_key_file) == ("token", None, None, None)
    assert rec.key_file is not None and rec.key_file.is_absolute()
    cert_mode = rec.replace(vm="web1", auth="certificate", key_file=None, ca_file=Path("/etc/hvr/ca.pem"),
                            cert_file=Path("/etc/hvr/h.pem"), cert_key_file=Path("/etc/hvr/h-key.pem"))
    store.save_replication(cert_mode)
    assert store.list_replications() == [cert_mode]
    changed = rec.with_history(HistorySettings(3, 30, 2)).replace(settings_pending=True, app_consistent_failures=1,
                                                                   app_consistent_sequences=(41, 43))
    store.save_replication(changed)
    assert store.list_replications() == [changed] and changed.consistency_of(43) == "application"
    assert changed.consistency_of(42) == "crash"
    # version 4: VMs registered before tracking modes existed journal
    assert {v.tracking for v in vms.values()} == {TrackingMode.JOURNAL}
    store.add_vm("new1", [("root", tmp_path / "new1.img")], False)  # and it goes on working
    store.add_vm("new2", [("root", tmp_path / "new2.img")], False, TrackingMode.BITMAP)
    assert {v.name: v.tracking for v in store.list_vms()}["new2"] is TrackingMode.BITMAP
    # version 5: no VM was failed over here, no relationship prepared for a failover
    assert {v.failover for v in store.list_vms()} == {None}
    assert {r.prepared_sequence for r in store.list_replications()} == {None}
    store.set_failover("new1", "completed")
    assert {v.name: v.failover for v in store.list_vms()}["new1"] == "completed"
    store.close()
    assert recorded_version(path) == agent_store.SCHEMA_VERSION == 5


def test_a_released_listener_database_keeps_its_settings_keys_replicas_and_cycles(tmp_path):
    path = from_dump(tmp_path, "listener-v1.sql")
    store = ListenerStore(path)
    settings = store.settings()
    assert settings["enabled"] is True and settings["default_storage"] == "/var/lib/hvr/replicas"
    keys = store.principal_keys()
    assert sorted(keys) == ["primary1.example.com", "primary2.example.com"]
    assert [k.secret for k in keys["primary1.example.com"]] == [bytes(range(32))]
    assert [k.secret for k in keys["primary2.example.com"]] == [bytes(range(32))[::-1]]
    rep = store.replica(VM_ID)
    assert (rep.name, rep.principal, rep.state, rep.generation, rep.next_sequence, rep.last_received_sequence,
            rep.last_applied_sequence) == ("web1", "primary1.example.com", ReplicationState.REPLICATING, 3, 41, 40, 39)
    assert [(d.disk_id, d.name, d.size_bytes) for d in rep.disks] == [(DISK_ID, "root", 1 << 30)]
    history = store.cycle_history(VM_ID)
    assert [(c.sequence, c.digest, c.applied_ns is not None) for c in history] == [
        (39, f"{39:064x}", True), (40, f"{40:064x}", False)]
    assert [c.sequence for c in store.unapplied_cycles(VM_ID)] == [40]
    # version 2: recovery history with the product defaults, no points yet, cycles crash-consistent
    assert (rep.history.recovery_history, rep.history.fine_window_min, rep.last_test_failover_ns) == (0, 60, None)
    assert store.points(VM_ID) == [] and {c.consistency for c in history} == {"crash"}
    store.mark_applied(VM_ID, 40, 123, "application")
    assert [(p.sequence, p.time_ns, p.consistency.value) for p in store.points(VM_ID)] == [(40, 123, "application")]
    # version 3: each key has its id, a second key per principal may be added; no entries; trust group DEFAULT
    assert [k["key_id"] for k in store.key_list()] == [key_id(bytes(range(32))), key_id(bytes(range(32))[::-1])]
    store.add_key(Key("primary1.example.com", b"\x07" * 32), replace=False)
    assert len(store.principal_keys()["primary1.example.com"]) == 2
    assert store.authorization_entries() == [] and rep.trust_group == "DEFAULT"
    # version 4: no failover, no heartbeat yet
    assert store.failover(VM_ID) is None and store.heartbeat(VM_ID) is None
    store.close()
    assert recorded_version(path) == listener_store.SCHEMA_VERSION == 4


def test_a_version_1_database_lacking_a_table_gets_it(tmp_path):
    path = from_dump(tmp_path, "agent-v1.sql")
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE replication_cycles")
    db.close()
    store = AgentStore(path)
    assert store.cycle_stats("web1", 0) == []
    assert [v.name for v in store.list_vms()] == ["db1", "web1"]
    store.close()


@pytest.mark.parametrize("dump, open_store", [("agent-v1.sql", AgentStore), ("listener-v1.sql", ListenerStore)])
def test_a_database_of_a_newer_version_is_refused_and_left_alone(tmp_path, dump, open_store):
    path = from_dump(tmp_path, dump)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.close()
    before = file_state(path)
    with pytest.raises(HvrError) as info:
        open_store(path)
    exc = info.value
    assert exc.code == "state_too_new" and "99" in exc.message
    assert exc.hint == "this state database was written by a newer hvr; install that version or restore a backup"
    assert file_state(path) == before


def test_a_newer_database_in_wal_mode_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "agent.db"
    AgentStore(path).close()
    newer = agent_store.SCHEMA_VERSION + 1
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(newer),))
    db.close()
    before = file_state(path)
    with pytest.raises(HvrError, match=f"schema version {newer}"):
        AgentStore(path)
    assert file_state(path) == before and recorded_version(path) == newer


def test_a_database_with_a_nonsense_version_is_corrupt(tmp_path):
    path = from_dump(tmp_path, "agent-v1.sql")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='x' WHERE key='schema_version'")
    db.close()
    with pytest.raises(CorruptError):
        AgentStore(path)


def test_a_file_that_is_not_a_database_is_corrupt(tmp_path):
    path = tmp_path / "agent.db"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CorruptError, match="unreadable"):
        AgentStore(path)


def test_the_product_ladders_are_numbered_from_the_base():
    for module in (agent_store, listener_store):
        assert [v for v, _ in module.MIGRATIONS] == list(range(2, module.SCHEMA_VERSION + 1))


# --- the ladder, with a ladder made for the test -----------------------------------------
BASE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS disks (vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE, path TEXT NOT NULL);
"""


def _backfill_labels(db: sqlite3.Connection) -> None:
    db.execute("UPDATE vms SET label = 'vm ' || name || ';' WHERE label IS NULL")


LADDER = [
    (2, "ALTER TABLE vms ADD COLUMN label TEXT; -- a comment; with a semicolon\n"
        "CREATE INDEX vms_by_label ON vms (label);"),
    (3, _backfill_labels),
    (4, """
        CREATE TABLE vms_new (name TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, label TEXT NOT NULL);
        INSERT INTO vms_new SELECT name, size * 512, label FROM vms;
        DROP TABLE vms;
        ALTER TABLE vms_new RENAME TO vms;
        CREATE TRIGGER vms_no_empty BEFORE INSERT ON vms WHEN NEW.label = '' BEGIN
            SELECT RAISE(ABORT, 'empty label; not allowed');
        END;
    """),
]


def open_at(path: Path, version: int, ladder=LADDER) -> StateDatabase:
    return StateDatabase(path, BASE, version, "test", ladder[:version - 1])


def rows_at(path: Path, version: int) -> Path:
    """A database at ``version`` of the test ladder, holding two VMs with a disk each."""
    db = open_at(path, version)
    size = "size_bytes" if version >= 4 else "size"
    label = ", label" if version >= 2 else ""
    for name, size_value in (("a", 8), ("b", 16)):
        values = (name, size_value * (512 if version >= 4 else 1)) + ((f"vm {name};",) if version >= 2 else ())
        db._db.execute(f"INSERT INTO vms (name, {size}{label}) VALUES ({', '.join('?' * len(values))})", values)
        db._db.execute("INSERT INTO disks VALUES (?, ?)", (name, f"/img/{name}"))
    db.close()
    return path


def schema_of(path: Path) -> list:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        db.close()


@pytest.mark.parametrize("start", [1, 2, 3, 4])
def test_the_ladder_upgrades_from_every_earlier_version(tmp_path, start):
    path = rows_at(tmp_path / "state.db", start)
    assert recorded_version(path) == start
    open_at(path, 4).close()
    assert recorded_version(path) == 4
    db = sqlite3.connect(path)
    assert db.execute("SELECT name, size_bytes, label FROM vms ORDER BY name").fetchall() == [
        ("a", 8 * 512, "vm a;"), ("b", 16 * 512, "vm b;")]
    assert db.execute("SELECT vm, path FROM disks ORDER BY vm").fetchall() == [("a", "/img/a"), ("b", "/img/b")]
    db.close()
    fresh = tmp_path / "fresh.db"
    open_at(fresh, 4).close()
    assert schema_of(path) == schema_of(fresh)  # an upgraded database is the same as a new one


def test_a_new_database_climbs_the_whole_ladder(tmp_path):
    db = open_at(tmp_path / "state.db", 4)
    with pytest.raises(sqlite3.IntegrityError, match="empty label"):  # the trigger of step 4 is there
        db._db.execute("INSERT INTO vms VALUES ('c', 1, '')")
    db.close()
    assert recorded_version(tmp_path / "state.db") == 4


def test_foreign_keys_are_enforced_again_after_an_upgrade(tmp_path):
    path = rows_at(tmp_path / "state.db", 1)
    db = open_at(path, 4)
    with pytest.raises(sqlite3.IntegrityError):
        db._db.execute("INSERT INTO disks VALUES ('nobody', '/img/x')")
    db._db.execute("DELETE FROM vms WHERE name='a'")  # and cascades
    assert db._db.execute("SELECT vm FROM disks").fetchall() == [("b",)]
    db.close()


def _fails(db: sqlite3.Connection) -> None:
    db.execute("UPDATE vms SET label = 'half done'")
    raise ValueError("step cannot go on")


@pytest.mark.parametrize("bad_step", [
    "UPDATE vms SET label = 'x'; INSERT INTO no_such_table VALUES (1);",
    _fails,
    "INSERT INTO disks VALUES ('nobody', '/img/x');",  # breaks a foreign key: caught before the commit
    "UPDATE vms SET label = 'x'; SELECT 'unterminated",
], ids=["sql-error", "function-error", "foreign-key", "incomplete-sql"])
def test_a_failing_step_rolls_the_whole_upgrade_back(tmp_path, bad_step):
    path = rows_at(tmp_path / "state.db", 1)
    before = schema_of(path)
    ladder = [LADDER[0], (3, bad_step), LADDER[2]]
    with pytest.raises(HvrError) as info:
        open_at(path, 4, ladder)
    assert info.value.code == "state_migration_failed" and info.value.detail["step"] == 3
    assert recorded_version(path) == 1 and schema_of(path) == before  # step 2 was undone too
    db = sqlite3.connect(path)
    assert db.execute("SELECT name, size FROM vms ORDER BY name").fetchall() == [("a", 8), ("b", 16)]
    assert db.execute("SELECT count(*) FROM disks").fetchone() == (2,)
    db.close()
    open_at(path, 4).close()  # the right code upgrades it afterwards
    assert recorded_version(path) == 4


@pytest.mark.parametrize("versions", [[3], [2, 2], [2, 4], [2, 3, 4, 5]])
def test_a_ladder_must_be_numbered_one_by_one_from_the_base(tmp_path, versions):
    with pytest.raises(ValueError):
        StateDatabase(tmp_path / "state.db", BASE, 4, "test", [(v, "SELECT 1") for v in versions])


def test_sql_statements_keep_semicolons_in_strings_and_triggers():
    script = LADDER[2][1] + "\nINSERT INTO t VALUES ('a;b'); -- trailing comment\n"
    statements = list(sql_statements(script))
    assert len(statements) == 6
    assert statements[4].strip().startswith("CREATE TRIGGER") and "END;" in statements[4]
    assert "'a;b'" in statements[5]
    assert list(sql_statements("-- nothing here;\n ; \n")) == []
