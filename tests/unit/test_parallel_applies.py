"""The listener's applier: replicas apply side by side, at most ``max_active_applies`` at once.

In-process: a real store and real replicas; the apply itself is replaced by a
stand-in that counts how many run at once and waits to be let go.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from hvr_common.pure.replication_state import ReplicationState as S
from hvr_common.shell.concurrency_limit import ConcurrencyLimit
from hvr_listener.applier import Applier
from hvr_listener.recovery_history import Histories
from hvr_listener.replicas import ReplicaService
from hvr_common.pure.authorization import Grant
from hvr_listener.store import ListenerStore

SIZE = 1024 * 1024


@pytest.fixture
def service(tmp_path):
    store = ListenerStore(tmp_path / "listener.db")
    yield ReplicaService(store, 64 * SIZE)
    store.close()


async def _replicating(service: ReplicaService, name: str):
    vm_id, disk_id = uuid.uuid4(), uuid.uuid4()
    body = {"name": name, "generation": 1, "frequency_s": 30,
            "disks": [{"disk_id": str(disk_id), "name": "d0", "size_bytes": SIZE}]}
    rep, _ = await service.enable(vm_id, Grant("primary.example", "DEFAULT", str(service.access.store.path.parent / "storage")), body)
    service.states.window_stored(rep, disk_id, 1, 0, SIZE)
    assert service.states.complete_initial(await service.get(vm_id), 1, time.time_ns())
    rep = await service.get(vm_id)
    assert rep.state == S.REPLICATING
    return rep


class CountingApplier(Applier):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.now = 0
        self.most = 0
        self.calls: list[str] = []
        self.go = asyncio.Event()

    async def apply_pending(self, rep) -> int:
        self.calls.append(rep.name)
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await self.go.wait()
        finally:
            self.now -= 1
        return 1


async def _until(condition, what: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_the_limit_apply_at_once(service, limit):
    async def scenario():
        for i in range(4):
            await _replicating(service, f"vm{i}")
        applier = CountingApplier(service, Histories(service.store), ConcurrencyLimit(limit))
        task = asyncio.create_task(applier.run())
        await _until(lambda: applier.now == limit, "the first applies")
        for _ in range(20):  # the others stay waiting for a place
            await asyncio.sleep(0.01)
        assert applier.now == limit and applier.limit.statistics()["waiting"] == 4 - limit
        service.wake_applier.set()  # a wake while every replica is taken starts no second task of any
        await asyncio.sleep(0.05)
        assert len(applier.calls) == limit
        applier.go.set()
        await _until(lambda: len(applier.calls) >= 4 and applier.now == 0, "every replica applied")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return applier

    applier = asyncio.run(scenario())
    assert applier.most == limit
    assert sorted(set(applier.calls)) == ["vm0", "vm1", "vm2", "vm3"]


def test_a_raised_limit_lets_waiting_replicas_in(service):
    async def scenario():
        for i in range(3):
            await _replicating(service, f"vm{i}")
        applier = CountingApplier(service, Histories(service.store), ConcurrencyLimit(1))
        task = asyncio.create_task(applier.run())
        await _until(lambda: applier.now == 1, "the first apply")
        applier.limit.set_limit(3)
        await _until(lambda: applier.now == 3, "the others, once the limit is raised")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
