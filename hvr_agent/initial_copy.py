"""The initial copy (``InitialReplicationInProgress``): the initial cut, then every disk's data in windows.

Cut the VM once: the closed logs up to that sequence S are contained in the
images, so they are deleted (R1); ``next_sequence = S + 1`` is recorded.
Then, per disk, ask the replica for its durable offset and send windows of
allocated data from there (:class:`_DiskCopy`); finally ``initial/complete``
with ``next_sequence`` S + 1.  Writes made meanwhile are in logs S + 1,
S + 2, ... and are shipped right after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass

from hvr_common.pure.measure import NS
from hvr_common.pure.replication_state import Action, ReplicationState
from hvr_common.pure.schedule import Backoff
from hvr_common.shell.logs import event
from hvr_common.pure import digest_tree as dt
from hvr_common.shell import digest_scan
from hvr_agent import digest_cache, initial_window, shipper
from hvr_agent.housekeeping import allocated_below, delete_logs_upto
from hvr_agent.relationship import Relationship
from hvr_agent.replica_client import ReplicaClient, ReplicaConflictError
from hvr_agent.store import InitialProgress
from hvr_agent.vms import ProtectedVm

log = logging.getLogger("hvr.agent.replication")

S = ReplicationState
# Initial windows uploading at once per disk; with the one being built, this many + 1 are in memory.
INITIAL_WINDOWS_IN_FLIGHT = 4
HASH_READ_BYTES = 1024 * 1024  # a window's chunks are read again for the digest cache in pieces this big


@dataclass
class DiskProgress:
    name: str
    disk_id: uuid.UUID
    size_bytes: int
    durable_offset: int
    allocated_bytes: int
    done_bytes: int

    def to_dict(self) -> dict:
        return {"disk": self.name, "disk_id": str(self.disk_id), "size_bytes": self.size_bytes,
                "durable_offset": self.durable_offset, "allocated_bytes": self.allocated_bytes,
                "done_bytes": self.done_bytes}


class InitialCopy:
    """One VM's initial copy and its progress in memory (shown by ``vm get``)."""

    def __init__(self, rel: Relationship, window_bytes: int, backoff: Backoff):
        self.rel = rel
        self.window_bytes = window_bytes
        self.backoff = backoff
        self.progress: dict[uuid.UUID, DiskProgress] = {}
        self.run_started_ns: int | None = None  # when this run of the copy began (for its rate)
        self.run_bytes = 0  # data bytes this run sent

    async def run(self, client: ReplicaClient) -> None:
        rel = self.rel
        store = rel.store
        vm = rel.vm()
        disks = rel.disks()
        if rel.rec.base_sequence is None:
            await self._cut(vm, disks)
        remote = await client.replica_state(vm.record.vm_id)
        offsets = remote.get("initial") or {}
        stored = {p.disk_id: p for p in await asyncio.to_thread(store.initial_progress, rel.name)}
        # Every disk already at its end on the replica, and no window of ours acknowledged: the replica
        # adopted an existing copy (hvrctl replica adopt).  It is compared, never taken on trust.
        existing_copy = (not any(p.durable_offset for p in stored.values())
                         and all(int(offsets.get(str(d.disk_id), 0)) >= d.size_bytes for d in disks))
        self.run_started_ns = time.time_ns()
        self.run_bytes = 0
        for disk in disks:
            offset = int(offsets.get(str(disk.disk_id), 0))
            prior = stored.get(disk.disk_id)
            done = await asyncio.to_thread(allocated_below, disk.image_path, offset)
            allocated = prior.allocated_bytes if prior else done
            self.progress[disk.disk_id] = DiskProgress(disk.name, disk.disk_id, disk.size_bytes, offset,
                                                       max(allocated, done), done)
        for disk in disks:
            await _DiskCopy(self, client, vm, disk).run()
        rel.check_state(S.INITIAL_REPLICATION_IN_PROGRESS)
        next_sequence = rel.rec.base_sequence + 1
        await client.complete_initial(vm.record.vm_id, rel.rec.generation, next_sequence)
        now = time.time_ns()
        if existing_copy:
            await rel.set_state(Action.COMPLETE_INITIAL_FROM_COPY, "the replica holds an existing copy: comparing it",
                                initial_completed_ns=now, next_sequence=next_sequence)
        else:
            await rel.set_state(Action.COMPLETE_INITIAL, initial_completed_ns=now, next_sequence=next_sequence)
        await asyncio.to_thread(store.clear_initial_progress, rel.name)
        total = sum(p.done_bytes for p in self.progress.values())
        event(log, "initial_completed", vm=rel.name, seq=next_sequence, bytes=total, existing_copy=existing_copy,
              latency_s=round((now - (rel.rec.initial_started_ns or now)) / NS, 3))
        self.backoff.reset()

    async def _cut(self, vm: ProtectedVm, disks: list[shipper.DiskSource]) -> None:
        rel = self.rel
        closed = await rel.registry.cut(rel.name, shipped=False)  # the images carry it
        base = closed[0].sequence if closed else vm.sequence - 1
        await rel.update(base_sequence=base, next_sequence=base + 1, initial_started_ns=time.time_ns())
        removed = await asyncio.to_thread(delete_logs_upto, disks, base)
        for disk in disks:
            allocated = await asyncio.to_thread(allocated_below, disk.image_path, disk.size_bytes)
            await asyncio.to_thread(rel.store.set_initial_progress, rel.name,
                                    InitialProgress(disk.disk_id, disk.size_bytes, 0, allocated, 0))
            self.progress[disk.disk_id] = DiskProgress(disk.name, disk.disk_id, disk.size_bytes, 0, allocated, 0)
        event(log, "initial_started", vm=rel.name, seq=base, logs_deleted=removed,
              bytes=sum(p.allocated_bytes for p in await asyncio.to_thread(rel.store.initial_progress, rel.name)))


class _DiskCopy:
    """Send one disk's windows from the replica's durable offset to the end.

    Up to ``INITIAL_WINDOWS_IN_FLIGHT`` windows travel at once (the listener
    stores the next while it makes the previous durable) and the one after
    them is built meanwhile (``ahead``), in a thread, in memory.  Answers are
    taken in window order; one that leaves the durable offset short of its
    window's end (``409 initial_gap``, or a window refused because the one
    before it failed) drops the windows after it and the copy goes on from
    there.  A window's progress is saved (``saving``) while the next travels.
    """

    def __init__(self, copy: InitialCopy, client: ReplicaClient, vm: ProtectedVm, disk: shipper.DiskSource):
        self.copy = copy
        self.rel = copy.rel
        self.client = client
        self.vm_id = vm.record.vm_id
        self.disk = disk
        self.progress = copy.progress[disk.disk_id]
        self.fd = -1
        self.spare: list[bytearray] = []  # buffers of windows whose uploads have ended, for reuse
        self.in_flight: list[tuple[initial_window.InitialWindow, asyncio.Task]] = []
        self.next_start = self.progress.durable_offset  # where the next window to build begins
        self.ahead: asyncio.Future | None = None  # the window after those in flight, being built
        self.saving: asyncio.Future | None = None  # the progress of the latest answer, being saved
        self.tracked = vm.disks.get(disk.name)
        self.hashing = None  # the digest cache's pass: the chunks of each window are hashed as it is built
        self.geometry = dt.Geometry(disk.size_bytes)

    async def run(self) -> None:
        progress, size = self.progress, self.disk.size_bytes
        self.fd = await asyncio.to_thread(os.open, self.disk.image_path, os.O_RDONLY | os.O_CLOEXEC)
        if self.tracked is not None:
            self.hashing = digest_cache.begin_pass(self.tracked)
        completed = False
        try:
            while progress.durable_offset < size:
                self.rel.check_state(S.INITIAL_REPLICATION_IN_PROGRESS)
                await self._fill()
                window, task = self.in_flight.pop(0)
                durable = await task
                self.spare.append(window.buffer)
                if durable == window.end:
                    progress.done_bytes += window.allocated_bytes
                    self.copy.run_bytes += window.allocated_bytes
                else:
                    await self._restart_at(durable)
                progress.durable_offset = durable
                progress.allocated_bytes = max(progress.allocated_bytes, progress.done_bytes)
                self.copy.backoff.reset()
                if progress.durable_offset < size:
                    self.rel.check_state(S.INITIAL_REPLICATION_IN_PROGRESS)
                    await self._fill()  # the next window is on its way before the progress is saved
                await self._save_progress()
            if self.saving is not None:
                await self.saving
            completed = True
        finally:
            await _drop_windows(self.in_flight)
            if self.ahead is not None:
                await _drop_build(self.ahead)
            if self.saving is not None and not self.saving.done():
                await asyncio.wait([self.saving])
            if self.tracked is not None:  # no build runs any more: the window's digests become the cache
                digest_cache.end_pass(self.tracked, self.hashing, completed)
            os.close(self.fd)

    async def _fill(self) -> None:
        """Windows in flight up to the limit, and the one after them being built."""
        size = self.disk.size_bytes
        while len(self.in_flight) < INITIAL_WINDOWS_IN_FLIGHT and self.next_start < size:
            if self.ahead is None:
                self.ahead = self._build_next(self.next_start)
            window, hashed = await self.ahead
            self.ahead = None
            if self.hashing is not None:
                self.hashing.read(*hashed)
            self.in_flight.append((window, asyncio.ensure_future(self._send(window))))
            self.next_start = window.end
        if self.ahead is None and self.next_start < size:
            self.ahead = self._build_next(self.next_start)

    async def _restart_at(self, durable: int) -> None:
        """The replica holds less than the window's end: drop what follows, go on from ``durable``."""
        self.spare += await _drop_windows(self.in_flight)
        if self.ahead is not None:
            await _drop_build(self.ahead)
            self.ahead = None
        self.next_start = durable
        self.progress.done_bytes = await asyncio.to_thread(allocated_below, self.disk.image_path, durable)

    async def _save_progress(self) -> None:
        """Save the progress of the latest answer, once the one saved before it is durable."""
        if self.saving is not None:
            await self.saving
        p = self.progress
        self.saving = asyncio.ensure_future(asyncio.to_thread(
            self.rel.store.set_initial_progress, self.rel.name,
            InitialProgress(self.disk.disk_id, self.disk.size_bytes, p.durable_offset, p.allocated_bytes,
                            p.done_bytes)))

    def _build(self, start: int, buffer: bytearray | None) -> tuple[initial_window.InitialWindow, tuple[int, int]]:
        """Plan and build the window at ``start`` (blocking; runs in a thread); with a digest cache, hash the
        chunks wholly inside it (read again, from the page cache) and say which."""
        rec = self.rel.rec
        end = initial_window.plan_window(self.fd, start, self.disk.size_bytes, self.copy.window_bytes)
        window = initial_window.build_initial_bundle(
            vm_id=self.vm_id, generation=rec.generation, disk=self.disk, image_fd=self.fd, start=start,
            end=end, compress=rec.compression, created_ns=time.time_ns(), buffer=buffer)
        unit = self.geometry.chunk_size
        first, last = -(-start // unit), (self.geometry.count(1) if end >= self.disk.size_bytes else end // unit)
        if self.hashing is None or first >= last:
            return window, (0, 0)
        digest_scan.fill(self.fd, self.geometry, self.hashing.digests, [(first, last)], threads=1,
                         read_bytes=HASH_READ_BYTES)
        return window, (first, last)

    def _build_next(self, start: int) -> asyncio.Future:
        buffer = self.spare.pop() if self.spare else None
        return asyncio.ensure_future(asyncio.to_thread(self._build, start, buffer))

    async def _send(self, window: initial_window.InitialWindow) -> int:
        """Upload one window; answer the replica's durable offset after it."""
        name, disk = self.rel.name, self.disk
        sent_ns = time.time_ns()
        try:
            answer = await self.client.send_initial_window(
                self.vm_id, disk.disk_id, window.start, window.end, self.rel.rec.generation,
                window.bundle.pieces, window.bundle.sha256, window.bundle.wire_bytes)
            durable = int(answer.get("offset", window.end))
        except ReplicaConflictError as exc:
            if exc.code != "initial_gap" or "offset" not in exc.detail:
                raise
            durable = int(exc.detail["offset"])  # the replica holds less than we thought: go on from there
            event(log, "initial_gap", logging.WARNING, vm=name, disk=disk.name, offset=durable,
                  window_start=window.start)
        event(log, "initial_window_sent", vm=name, disk=disk.name, offset=window.start, end=durable,
              bytes=window.bundle.wire_bytes, data_bytes=window.bundle.write_bytes,
              latency_s=round((time.time_ns() - sent_ns) / NS, 3))
        return durable


async def _drop_windows(in_flight: list[tuple[initial_window.InitialWindow, asyncio.Task]]) -> list[bytearray]:
    """Cancel the uploads of windows that will not be used, wait until they have ended, return their buffers."""
    tasks = [task for _, task in in_flight]
    buffers = [window.buffer for window, _ in in_flight]
    in_flight.clear()
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a dropped window's failure is not news
    return buffers


async def _drop_build(task: asyncio.Future) -> None:
    """Wait for a window being built that will not be sent (the image fd must outlive its thread)."""
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: a window nobody sends has no news to tell
