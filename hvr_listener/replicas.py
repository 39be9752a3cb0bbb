"""Replica VMs on this server: the one service the APIs and the applier are given.

A thin facade over the modules that hold the business rules of the
replication API (every rule that refuses a request does so before anything
changes; the HTTP shell, :mod:`hvr_listener.replication_api`, only
authenticates, parses and maps errors):

* :mod:`hvr_listener.replica_access`: finding a request's replica, the per-VM
  and image locks (and their order);
* :mod:`hvr_listener.replica_state`: every change of a replica's state;
* :mod:`hvr_listener.enablement`, :mod:`hvr_listener.initial_copy`,
  :mod:`hvr_listener.cycle_receipt`: enabling, the initial copy, cycles.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from hvr_common.pure.recovery_points import Consistency, HistorySettings
from hvr_common.pure.authorization import Grant
from hvr_common.pure.failover import Heartbeat
from hvr_listener.cycle_receipt import CycleReceipt
from hvr_listener.resync_activity import ResyncActivity
from hvr_listener.enablement import Enablement
from hvr_listener.initial_copy import InitialCopy
from hvr_listener.replica_access import ReplicaAccess, check_generation
from hvr_listener.replica_state import ReplicaStates
from hvr_listener.resync_completion import ResyncCompletion
from hvr_listener.store import ListenerStore, Replica


class ReplicaService:
    def __init__(self, store: ListenerStore, max_bundle_bytes: int):
        self.store = store
        self.access = ReplicaAccess(store)
        self.states = ReplicaStates(store)
        self.applied = asyncio.Condition()  # notified after every applied cycle
        self.wake_applier = asyncio.Event()
        self._enablement = Enablement(self.access, self.states)
        self._initial = InitialCopy(self.access, self.states, max_bundle_bytes)
        self._cycles = CycleReceipt(self.access, max_bundle_bytes, self.wake_applier)
        self.resync_activity = ResyncActivity()  # replicas a primary is resynchronizing (the backup gate asks)
        self._resync = ResyncCompletion(self.access, self.states)

    # --- lookup and locks (see replica_access: "Lock order") -------------
    async def get(self, vm_id: uuid.UUID, peer: Grant | None = None) -> Replica:
        return await self.access.get(vm_id, peer)

    def lock(self, vm_id: uuid.UUID) -> asyncio.Lock:
        return self.access.lock(vm_id)

    def image_lock(self, vm_id: uuid.UUID) -> asyncio.Lock:
        return self.access.image_lock(vm_id)

    # --- the replication API's verbs --------------------------------------
    async def enable(self, vm_id: uuid.UUID, peer: Grant, body: dict) -> tuple[Replica, bool]:
        return await self._enablement.enable(vm_id, peer, body)

    async def initial_window(self, vm_id: uuid.UUID, disk_id: uuid.UUID, peer: Grant, generation: int,
                             start: int, end: int, length: int | None, digest: str,
                             body: AsyncIterator[bytes]) -> int:
        return await self._initial.window(vm_id, disk_id, peer, generation, start, end, length, digest, body)

    async def initial_complete(self, vm_id: uuid.UUID, peer: Grant, body: dict) -> Replica:
        return await self._initial.complete(vm_id, peer, body)

    async def receive_cycle(self, vm_id: uuid.UUID, sequence: int, peer: Grant, generation: int,
                            length: int | None, digest: str, body: AsyncIterator[bytes],
                            consistency: Consistency = Consistency.CRASH) -> tuple[bool, Replica]:
        return await self._cycles.receive(vm_id, sequence, peer, generation, length, digest, body, consistency)

    async def complete_resync(self, vm_id: uuid.UUID, peer: Grant, body: dict) -> Replica:
        try:
            rep = await self._resync.complete(vm_id, peer, body)
            self.resync_activity.completed(vm_id)
            return rep
        finally:
            self.wake_applier.set()

    async def stage_cycle(self, vm_id: uuid.UUID, sequence: int, peer: Grant, generation: int,
                          body: AsyncIterator[bytes]) -> tuple[str, int]:
        return await self._cycles.stage(vm_id, sequence, peer, generation, body)

    async def commit_cycle(self, vm_id: uuid.UUID, sequence: int, peer: Grant, generation: int, digest: str,
                           length: int, consistency: Consistency = Consistency.CRASH) -> tuple[bool, Replica]:
        return await self._cycles.commit(vm_id, sequence, peer, generation, digest, length, consistency)

    async def set_history(self, vm_id: uuid.UUID, peer: Grant, generation: int,
                          body: dict) -> tuple[Replica, HistorySettings]:
        """The primary's recovery history settings, fenced by generation like every change it sends."""
        settings = HistorySettings.from_json(body)
        async with await self.access.locked(vm_id, peer):
            rep = await self.access.get(vm_id, peer)
            check_generation(rep, generation)
            await asyncio.to_thread(self.store.set_history_settings, vm_id, settings)
        return rep, settings

    async def heartbeat(self, vm_id: uuid.UUID, peer: Grant, generation: int, running: bool,
                        nbd_clients: int) -> Replica:
        """The primary's heartbeat (the split-brain guard's input), kept durably; 409 ``stale_generation`` for
        another generation than the replica's (a failover raised it: the sender is fenced)."""
        rep = await self.access.get(vm_id, peer)
        check_generation(rep, generation)
        beat = Heartbeat(time.time_ns(), running, nbd_clients)
        if not await asyncio.to_thread(self.store.record_heartbeat, vm_id, generation, beat):
            rep = await self.access.get(vm_id, peer)  # a failover raised the generation meanwhile
            check_generation(rep, generation)
        return rep
