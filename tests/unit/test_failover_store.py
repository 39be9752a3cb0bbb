"""The listener's failover transactions and heartbeats, on a real store (in-process, no daemon).

The state, the generation and the failover row change together or not at all;
a heartbeat of another generation is not kept; the primary's cycle of the old
generation is refused once the generation was raised.
"""

from __future__ import annotations

import time
import uuid

import pytest

from hvr_common.pure.authorization import DEFAULT_TRUST_GROUP, Grant
from hvr_common.pure.errors import HvrError
from hvr_common.pure.failover import Failover, FailoverStep, Heartbeat
from hvr_common.pure.replication_state import InvalidTransition, ReplicationState as S
from hvr_common.pure.wire.messages import HeartbeatRequest
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


async def _replicating(service: ReplicaService):
    vm_id, disk_id = uuid.uuid4(), uuid.uuid4()
    body = {"name": "vm1", "generation": 1, "frequency_s": 30,
            "disks": [{"disk_id": str(disk_id), "name": "d0", "size_bytes": SIZE}]}
    rep, _ = await service.enable(vm_id, service.peer, body)
    service.states.window_stored(rep, disk_id, 1, 0, SIZE)
    rep = await service.get(vm_id)
    assert service.states.complete_initial(rep, 1, time.time_ns())
    return await service.get(vm_id)


def _row(old: int = 1) -> Failover:
    return Failover(7, 3, 123, old, old + 1, FailoverStep.WAITING_COMPLETION, time.time_ns())


async def test_fail_over_raises_the_generation_with_the_state_and_cancel_restores_both(service):
    rep = await _replicating(service)
    assert service.states.fail_over(rep, _row())
    rep = await service.get(rep.vm_id)
    assert (rep.state, rep.generation) == (S.FAILED_OVER_WAITING_COMPLETION, 2)
    row = service.store.failover(rep.vm_id)
    assert (row.point_id, row.point_sequence, row.old_generation, row.generation, row.step) == (
        7, 3, 1, 2, FailoverStep.WAITING_COMPLETION)
    assert service.states.cancel_failover(rep, service.store.failover(rep.vm_id))
    rep = await service.get(rep.vm_id)
    assert (rep.state, rep.generation, service.store.failover(rep.vm_id)) == (S.REPLICATING, 1, None)


async def test_a_failover_decided_on_a_replica_that_changed_writes_nothing(service):
    rep = await _replicating(service)
    assert service.states.fail_over(rep, _row())
    assert not service.states.fail_over(rep, _row())  # rep is stale: Replicating at generation 1 no more
    with pytest.raises(InvalidTransition):
        service.states.complete_failover(rep, time.time_ns())  # Replicating cannot complete a failover
    now = await service.get(rep.vm_id)
    assert service.states.complete_failover(now, 42)
    done = await service.get(rep.vm_id)
    assert done.state == S.FAILED_OVER and done.generation == 2
    row = service.store.failover(rep.vm_id)
    assert (row.step, row.completed_ns) == (FailoverStep.COMPLETED, 42)
    with pytest.raises(InvalidTransition):
        service.states.cancel_failover(done, row)


async def test_heartbeats_are_kept_only_for_the_replica_generation(service):
    rep = await _replicating(service)
    beat = await service.heartbeat(rep.vm_id, service.peer, 1, True, 2)
    assert beat.generation == 1
    kept = service.store.heartbeat(rep.vm_id)
    assert (kept.running, kept.nbd_clients) == (True, 2)
    assert service.states.fail_over(rep, _row())
    with pytest.raises(HvrError) as info:
        await service.heartbeat(rep.vm_id, service.peer, 1, False, 0)
    assert info.value.code == "stale_generation"
    assert service.store.heartbeat(rep.vm_id) == kept  # nothing kept from the fenced primary
    assert not service.store.record_heartbeat(rep.vm_id, 1, Heartbeat(1, False, 0))
    assert service.store.record_heartbeat(rep.vm_id, 2, Heartbeat(5, False, 0))
    assert service.store.heartbeat(rep.vm_id) == Heartbeat(5, False, 0)


async def test_a_cycle_of_the_old_generation_is_refused_after_a_failover(service):
    rep = await _replicating(service)
    assert service.states.fail_over(rep, _row())

    async def body():
        yield b"x"
    with pytest.raises(HvrError) as info:
        await service.receive_cycle(rep.vm_id, 1, service.peer, 1, 1, "0" * 64, body())
    assert info.value.code == "stale_generation"
    assert service.store.cycle_history(rep.vm_id) == []


@pytest.mark.parametrize("doc", [{}, {"running": 1, "nbd_clients": 0}, {"running": True, "nbd_clients": -1},
                                 {"running": True, "nbd_clients": 0, "x": 1}, [], {"running": True}])
def test_a_bad_heartbeat_body_is_refused(doc):
    with pytest.raises(HvrError) as info:
        HeartbeatRequest.from_json(doc)
    assert info.value.code == "bad_request"


def test_a_heartbeat_body_round_trips():
    msg = HeartbeatRequest(True, 3)
    assert HeartbeatRequest.from_json(msg.to_json()) == msg
