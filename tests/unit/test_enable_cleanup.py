"""A failed enable leaves neither a record nor image files behind, so the name stays free.

In-process: a real SQLite store and real images.  The record's failure (a
full database) is injected at the one call that writes the record, since a
database that fails only there cannot be arranged for real.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import pytest

from hvr_common.pure.authorization import Grant
from hvr_common.pure.errors import HvrError
from hvr_listener.replicas import ReplicaService
from hvr_listener.store import ListenerStore

SIZE = 1024 * 1024
PRINCIPAL = "primary.example"


@pytest.fixture
def where(tmp_path):
    return {"storage": tmp_path / "storage"}


@pytest.fixture
def service(tmp_path, where):
    store = ListenerStore(tmp_path / "listener.db")
    yield ReplicaService(store, 64 * SIZE)
    store.close()


def _peer(storage) -> Grant:
    return Grant(PRINCIPAL, "DEFAULT", str(storage))


def _body(name: str) -> dict:
    return {"name": name, "generation": 1, "frequency_s": 30,
            "disks": [{"disk_id": str(uuid.uuid4()), "name": f"d{i}", "size_bytes": SIZE} for i in range(2)]}


def test_a_record_that_cannot_be_written_removes_the_new_images(service, where, monkeypatch):
    calls = []

    def full(*args, **kwargs):
        calls.append(args)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(service.states, "enable", full)
    vm_id = uuid.uuid4()
    with pytest.raises(sqlite3.OperationalError):
        asyncio.run(service.enable(vm_id, _peer(where["storage"]), _body("vm1")))
    assert calls, "the record was never attempted"
    assert not (where["storage"] / str(vm_id)).exists(), "images left behind without a record"
    monkeypatch.undo()
    rep, created = asyncio.run(service.enable(vm_id, _peer(where["storage"]), _body("vm1")))
    assert created and sorted(p.name for p in (where["storage"] / str(vm_id)).iterdir()) == [
        "cycles", "d0.img", "d1.img", "incoming"]


def test_a_name_taken_in_another_storage_location_is_409_before_any_file(service, where, tmp_path):
    asyncio.run(service.enable(uuid.uuid4(), _peer(where["storage"]), _body("vm2")))
    with pytest.raises(HvrError) as info:
        asyncio.run(service.enable(uuid.uuid4(), _peer(tmp_path / "elsewhere"), _body("vm2")))
    assert info.value.code == "replica_conflict"
    assert not (tmp_path / "elsewhere").exists()
