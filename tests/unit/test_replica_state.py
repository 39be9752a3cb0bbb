"""The listener's replica states: decided by ReplicaStates, persisted by a real store.

In-process (no daemon): a real SQLite store, real replica images and real
bundle files; the applier and the operator's resume are driven directly.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from bundles import bundle, hrl_bytes
from hvr_common.pure.bundle import BundleKind
from hvr_common.pure.replication_state import InvalidTransition, ReplicationState as S
from hvr_listener.recovery_history import Histories
from hvr_listener import operator_verbs
from hvr_common.pure.authorization import DEFAULT_TRUST_GROUP, Grant
from hvr_listener.applier import Applier
from hvr_listener.replicas import ReplicaService
from hvr_listener.store import ListenerStore

SIZE = 1024 * 1024
PRINCIPAL = "primary.example"


@pytest.fixture
def service(tmp_path):
    store = ListenerStore(tmp_path / "listener.db")
    service = ReplicaService(store, 64 * SIZE)
    service.peer = Grant(PRINCIPAL, DEFAULT_TRUST_GROUP, str(tmp_path / "storage"))
    yield service
    store.close()


async def _enable(service: ReplicaService, name: str = "vm1"):
    vm_id, disk_id = uuid.uuid4(), uuid.uuid4()
    body = {"name": name, "generation": 1, "frequency_s": 30,
            "disks": [{"disk_id": str(disk_id), "name": "d0", "size_bytes": SIZE}]}
    rep, created = await service.enable(vm_id, service.peer, body)
    assert created
    return rep, disk_id


async def _replicating(service: ReplicaService):
    rep, disk_id = await _enable(service)
    assert service.states.window_stored(rep, disk_id, 1, 0, SIZE) == (1, S.WAITING_FOR_INITIAL_REPLICATION, SIZE)
    rep = await service.get(rep.vm_id)
    assert service.states.complete_initial(rep, 1, time.time_ns())
    rep = await service.get(rep.vm_id)
    assert rep.state == S.REPLICATING and rep.next_sequence == 1 and rep.last_applied_sequence == 0
    return rep, disk_id


def _enable_again(service: ReplicaService, old, disk_id) -> None:
    """The same VM enabled again after it was removed (its old files kept): a new replica."""
    created = time.time_ns()
    while time.time_ns() == created:  # a distinct created_ns tells the new replica from the old one
        pass
    service.states.enable(old.vm_id, old.name, PRINCIPAL, 1, 30, True, old.storage_dir,
                          [(disk_id, "d0", SIZE, old.storage_dir / "d0.img")])


def _store_cycle(service: ReplicaService, rep, disk_id, data: bytes, *, damaged: bool = False):
    body = bundle(BundleKind.CYCLE, rep.vm_id, 1, 1,
                  [(disk_id, SIZE, 0, SIZE, hrl_bytes(rep.vm_id, disk_id, 1, 1, SIZE, [("write", 0, data)]))],
                  compress=False)
    path = rep.storage_dir / "cycles" / "0000000001.bundle"
    path.write_bytes(body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + body[len(body) // 2 + 1:]
                     if damaged else body)
    if service.store.cycle(rep.vm_id, 1) is None:
        service.store.record_cycle(rep.vm_id, 1, 1, hashlib.sha256(body).hexdigest(), len(body), path,
                                   time.time_ns())
    return path


async def test_enabling_records_a_replica_waiting_for_its_initial_copy(service):
    rep, _ = await _enable(service)
    assert rep.state == S.WAITING_FOR_INITIAL_REPLICATION and rep.state_detail is None


async def test_a_stored_window_moves_the_offset_and_the_state_together(service):
    rep, disk_id = await _enable(service)
    assert service.states.window_stored(rep, disk_id, 1, 0, SIZE // 2) == (1, S.WAITING_FOR_INITIAL_REPLICATION,
                                                                           SIZE // 2)
    # a window that does not start at or below the durable offset moves nothing
    assert service.states.window_stored(rep, disk_id, 1, SIZE // 2 + 1, SIZE)[2] == SIZE // 2
    # nor one of another generation
    assert service.states.window_stored(rep, disk_id, 2, SIZE // 2, SIZE) == (1, S.WAITING_FOR_INITIAL_REPLICATION,
                                                                              SIZE // 2)


async def test_a_window_does_not_count_once_the_replica_replicates(service):
    rep, disk_id = await _replicating(service)
    store = service.store
    with store._lock:
        store._db.execute("UPDATE replica_disks SET initial_offset=0")  # as if a window were sent again
    assert service.states.window_stored(rep, disk_id, 1, 0, SIZE) == (1, S.REPLICATING, 0)


async def test_a_window_of_a_replica_removed_and_enabled_again_does_not_count(service):
    old, disk_id = await _enable(service)
    await operator_verbs.remove_replica(service, old.name, delete_storage=False)
    _enable_again(service, old, disk_id)
    assert service.states.window_stored(old, disk_id, 1, 0, SIZE) is None
    assert (await service.get(old.vm_id)).disks[0].initial_offset == 0


async def test_a_damaged_stored_cycle_fails_the_replica_into_error_with_the_reason(service):
    rep, disk_id = await _replicating(service)
    _store_cycle(service, rep, disk_id, b"\x5a" * 4096, damaged=True)
    assert await Applier(service, Histories(service.store)).apply_pending(rep) == 0
    failed = await service.get(rep.vm_id)
    assert failed.state == S.ERROR and failed.last_applied_sequence == 0
    assert failed.state_detail.startswith("applying cycle 1 failed")


async def test_the_operator_resumes_a_replica_in_error_and_its_cycles_are_applied_again(service):
    rep, disk_id = await _replicating(service)
    _store_cycle(service, rep, disk_id, b"\x5a" * 4096, damaged=True)
    await Applier(service, Histories(service.store)).apply_pending(rep)
    _store_cycle(service, rep, disk_id, b"\x5a" * 4096)  # the operator restored the file
    resumed = await operator_verbs.resume_replica(service, rep.name)
    assert resumed.state == S.REPLICATING and resumed.state_detail is None
    assert service.wake_applier.is_set()
    assert await Applier(service, Histories(service.store)).apply_pending(resumed) == 1
    assert (await service.get(rep.vm_id)).last_applied_sequence == 1
    assert rep.disks[0].path.read_bytes()[:4097] == b"\x5a" * 4096 + b"\0"


async def test_resuming_a_replica_not_in_error_is_refused_and_changes_nothing(service):
    rep, _ = await _replicating(service)
    with pytest.raises(InvalidTransition) as info:
        await operator_verbs.resume_replica(service, rep.name)
    assert info.value.code == "wrong_state"
    assert (await service.get(rep.vm_id)) == rep


async def test_a_failure_about_a_replica_removed_meanwhile_leaves_the_new_one_alone(service):
    rep, disk_id = await _replicating(service)
    await operator_verbs.remove_replica(service, rep.name, delete_storage=False)
    _enable_again(service, rep, disk_id)
    assert not service.states.fail(rep, "applying cycle 1 failed: damaged")
    new = await service.get(rep.vm_id)
    assert new.state == S.WAITING_FOR_INITIAL_REPLICATION and new.state_detail is None


class _CountingHistories(Histories):
    """Histories that remember which replicas were thinned."""

    def __init__(self, store):
        super().__init__(store)
        self.thinned: list[str] = []

    async def thin(self, rep, history, pins=None) -> int:
        self.thinned.append(rep.name)
        return await super().thin(rep, history, pins)


async def test_the_applier_thins_each_replica_once_after_a_start_without_waiting_for_a_cycle(service):
    # drops a crash interrupted are made at the first look, though no cycle is left to apply
    rep, _ = await _replicating(service)
    histories = _CountingHistories(service.store)
    applier = Applier(service, histories)
    assert await applier.apply_pending(rep) == 0
    assert histories.thinned == [rep.name]
    assert await applier.apply_pending(rep) == 0
    assert histories.thinned == [rep.name]  # once per start; then after each applied cycle
