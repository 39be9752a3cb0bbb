"""The initial copy on the replica: initial windows received into the images, and its completion.

Windows are received straight into the image (bytes at or above the durable
offset are not replicated content yet) and made durable without the VM's
lock, so the next window, starting where this one ends, is received
meanwhile.  They commit in order, each in one store transaction that checks
the replica, its generation and state (:meth:`ReplicaStates.window_stored`).
The completion waits for every window in progress: cycles must not change
an image a window still writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from hvr_common.pure.bundle import BundleKind
from hvr_common.pure.bundle_decoder import BundleDecoder
from hvr_common.pure.errors import HvrError, NotFoundError, UsageError
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_listener.body_feed import as_body_error, check_length, feed_checked
from hvr_listener.bundle_io import DirectWindowWriter
from hvr_listener.initial_import import check_completion
from hvr_listener.replica_access import ReplicaAccess, check_generation, conflict
from hvr_listener.replica_state import ReplicaStates
from hvr_common.pure.wire.messages import InitialCompleteRequest
from hvr_common.pure.authorization import Grant
from hvr_listener.store import Replica, ReplicaDisk

log = logging.getLogger("hvr.listener.replicas")

# A pipelined initial window that arrives before the one it follows waits this long for it.
PREDECESSOR_WAIT_S = 3.0

_INITIAL_STATES = (ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                   ReplicationState.INITIAL_REPLICATION_IN_PROGRESS)


class InitialCopy:
    def __init__(self, access: ReplicaAccess, states: ReplicaStates, max_bundle_bytes: int):
        self.access = access
        self.states = states
        self.max_bundle_bytes = max_bundle_bytes
        # disk id -> [(end, future of "it became durable")] of the initial windows in progress
        self._windows: dict[uuid.UUID, list[tuple[int, asyncio.Future]]] = {}
        self._window_changed = asyncio.Event()  # replaced (after being set) whenever a window starts or ends

    async def window(self, vm_id: uuid.UUID, disk_id: uuid.UUID, peer: Grant, generation: int,
                     start: int, end: int, length: int | None, digest: str, body: AsyncIterator[bytes]) -> int:
        """Store one initial window; return the disk's durable offset afterwards.

        A window whose predecessor did not become durable is refused with
        ``409 initial_gap`` and the durable offset stays put.
        """
        deadline = time.monotonic() + PREDECESSOR_WAIT_S
        while True:
            async with await self.access.locked(vm_id, peer):
                rep = await self.access.get(vm_id, peer)
                _check_initial(rep, generation)
                disk = rep.disk(disk_id)
                if not 0 <= start < end <= disk.size_bytes:
                    raise UsageError(f"window [{start}, {end}) is not inside disk {disk.name} "
                                     f"of {disk.size_bytes} bytes")
                # the newest window in progress that ends where this one starts
                before = next((f for e, f in reversed(self._windows.get(disk_id, [])) if e == start), None)
                if end <= disk.initial_offset:
                    return disk.initial_offset  # already stored; the unread body is discarded
                if start <= disk.initial_offset or before is not None:
                    check_length(length, self.max_bundle_bytes)
                    mine = asyncio.get_running_loop().create_future()
                    self._windows.setdefault(disk_id, []).append((end, mine))
                    self._window_news()
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise conflict("initial_gap", f"window starts at {start} but disk {disk.name} is durable "
                                   f"only up to {disk.initial_offset}", offset=disk.initial_offset)
                news = self._window_changed  # taken under the lock: no change between here and the wait is missed
            # Pipelined windows travel on separate connections and may overtake each other:
            # give the one this window follows a moment to arrive before calling it a gap.
            try:
                await asyncio.wait_for(news.wait(), left)
            except TimeoutError:
                pass
        expect = {"vm_id": vm_id, "generation": rep.generation, "kind": BundleKind.INITIAL,
                  "disks": {disk_id: disk.size_bytes}, "window": (disk_id, start, end)}
        durable = False
        writer = None
        try:
            received_ns = time.monotonic_ns()
            writer = await _receive_window(disk, length, digest, expect, body)
            synced_ns = time.monotonic_ns()
            received_ns = synced_ns - received_ns
            await finish_in_thread(writer.finish)
            synced_ns = time.monotonic_ns() - synced_ns
            if before is not None:
                await asyncio.shield(before)
            now = await asyncio.to_thread(self.states.window_stored, rep, disk_id, generation, start, end)
            if now is None:
                raise NotFoundError(f"replica of VM {rep.name} was removed while a window was stored")
            now_generation, now_state, offset = now
            if now_generation != generation:
                check_generation(await self.access.get(vm_id), generation)
            if now_state not in _INITIAL_STATES:
                raise conflict("wrong_state", f"VM {rep.name} is {now_state}, not in initial replication")
            if offset < start:
                raise conflict("initial_gap", f"window starts at {start} but the window before it did not "
                               f"become durable: disk {disk.name} is durable up to {offset}", offset=offset)
            durable = True
        finally:
            # Settled before anything that can be interrupted: the windows after this one wait on it.
            mine.set_result(durable)
            pending = self._windows.get(disk_id, [])
            pending.remove((end, mine))
            if not pending:
                self._windows.pop(disk_id, None)
            self._window_news()
            if writer is not None:
                await finish_in_thread(writer.close)
        event(log, "initial_window_stored", vm=rep.name, disk=disk.name, offset=start, bytes=end - start,
              receive_s=round(received_ns / 1e9, 3), sync_s=round(synced_ns / 1e9, 3))
        return max(offset, end)

    def _window_news(self) -> None:
        self._window_changed.set()
        self._window_changed = asyncio.Event()

    async def complete(self, vm_id: uuid.UUID, peer: Grant, body: dict) -> Replica:
        req = InitialCompleteRequest.from_json(body)
        generation, next_sequence = req.generation, req.next_sequence
        async with await self.access.locked(vm_id, peer):
            rep = await self.access.get(vm_id, peer)
            # A window still being received (a duplicate on a slow connection, say) writes into the
            # image: it must be over before cycles may change the image.  None can start meanwhile
            # (that needs this lock); they end without it.
            for d in rep.disks:
                while in_progress := [f for _, f in self._windows.get(d.disk_id, [])]:
                    await asyncio.wait([asyncio.shield(f) for f in in_progress])
            rep = await self.access.get(vm_id, peer)
            check_generation(rep, generation)
            if rep.state == ReplicationState.REPLICATING:
                if rep.next_sequence == next_sequence and rep.last_received_sequence == next_sequence - 1:
                    return rep  # the same completion again (its answer was lost)
                raise conflict("wrong_state", f"initial replication of VM {rep.name} completed already; "
                               f"the replica expects cycle {rep.next_sequence}", expected=rep.next_sequence)
            incomplete = {str(d.disk_id): d.initial_offset for d in rep.disks if d.initial_offset != d.size_bytes}
            if incomplete:
                raise conflict("initial_incomplete", "initial replication has not reached the end of every disk",
                               offsets=incomplete)
            await asyncio.to_thread(check_completion, rep, next_sequence)  # loaded from media: at its point
            # Every disk complete means every window became durable (the check above); nothing else can
            # move the replica out of WaitingForInitialReplication while this lock is held.
            if not await asyncio.to_thread(self.states.complete_initial, rep, next_sequence, time.time_ns()):
                raise NotFoundError(f"replica of VM {rep.name} changed while its initial copy was completed")
        event(log, "initial_completed", vm=rep.name, next_sequence=next_sequence)
        return await self.access.get(vm_id)


def _check_initial(rep: Replica, generation: int) -> None:
    check_generation(rep, generation)
    if rep.state not in _INITIAL_STATES:
        raise conflict("wrong_state", f"VM {rep.name} is {rep.state}, not in initial replication")


async def _receive_window(disk: ReplicaDisk, length: int, digest: str, expect: dict,
                          body: AsyncIterator[bytes]) -> DirectWindowWriter:
    """An initial window goes straight into the image (no spool): see DirectWindowWriter.

    Returns the writer with the whole body written and checked, not yet
    durable: the caller calls ``finish`` (fdatasync) and ``close``.
    """
    decoder = BundleDecoder(keep_data=True, lend_data=True, max_bytes=length, expect=expect)
    writer = await finish_in_thread(DirectWindowWriter, disk.path, disk.disk_id, decoder,
                                    undo=DirectWindowWriter.close)
    try:
        await feed_checked(writer, body, length, digest)
        writer.check_complete()
    except BaseException as exc:
        await finish_in_thread(writer.close)
        if isinstance(exc, HvrError):
            raise as_body_error(exc) from None
        raise
    return writer
