"""The daemons' SQLite state: a failed transaction changes nothing and leaves the database usable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hvr_agent.store import AgentStore
from hvr_common.pure.errors import ConflictError


def test_a_failed_registration_rolls_back_and_the_store_stays_usable(tmp_path: Path):
    store = AgentStore(tmp_path / "agent.db")
    store.add_vm("a", [("d0", tmp_path / "a.img")], False)
    with pytest.raises(ConflictError):  # the second disk clashes: the whole VM must be absent afterwards
        store.add_vm("b", [("d0", tmp_path / "b.img"), ("d1", tmp_path / "a.img")], False)
    assert [v.name for v in store.list_vms()] == ["a"]
    store.add_vm("c", [("d0", tmp_path / "c.img")], False)  # no transaction was left open
    assert [v.name for v in store.list_vms()] == ["a", "c"]
    store.close()
    raw = sqlite3.connect(tmp_path / "agent.db")
    assert raw.execute("SELECT count(*) FROM disks").fetchone() == (2,)
