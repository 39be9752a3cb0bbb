"""The change-tracking filter: a block device whose writes are journaled.

``TrackedDisk`` wraps a :class:`~hvr_common.block.blockdev.RawImage` and is
itself a :class:`~hvr_common.block.blockdev.BlockDevice`, so the NBD server
serves it like any other device.  Each write, trim or zero is applied to the
image and appended to the active HRL log in one synchronous step, so the log's
record order is exactly the order in which the image changed.  Before the
first write to a region after a cut, the region is made durable in the
write-intent bitmap; ``can_write_now`` tells the server when that is already
done, so the write may complete inline.

Write order and commit points (see docs/hrl-format.md):

1. region marked in the bitmap file and fdatasync'd (first write after a cut);
2. record appended to the log (buffered; a large write goes straight to the file
   and is cut off again if that fails);
3. image ``pwrite`` / punch / zero (page cache); if that fails, the range's actual
   contents are journaled after the record;
4. FLUSH or FUA: log buffer drained, log and image fdatasync'd, then reply.

In bitmap mode (``bitmap``, :mod:`hvr_agent.dirty_tracking` in ``dirty``)
step 2 is replaced: the write's 4 KiB blocks are marked in the cycle's dirty
map; the logs only carry the cuts (a header and an END record).  While a
frozen cycle still needs a block's cut-time contents they are copied aside
first (also in journal mode right after a switch).  A switch of mode
(``switch_to``) takes effect at the next cut.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from hvr_common.block.blockdev import RawImage
from hvr_common.pure.hrl import RECORD_FLAG_FUA, RECORD_FLAG_NO_HOLE, HrlHeader
from hvr_common.shell.logs import event
from hvr_agent.dirty_tracking import DirtyTracking
from hvr_agent.intent import IntentBitmapFile
from hvr_agent.journal import ActiveLog, ClosedLog, log_path

log = logging.getLogger("hvr.agent.tracker")

ACTUAL_CHUNK = 4 * 1024 * 1024  # read-back records after a failed device write
TRIM_CHUNK = 1 << 30  # trims/zeroes are journaled in records of at most this many bytes
MARK_AHEAD_REGIONS = 16  # a sequential stream entering a new region marks this many more with it


@dataclass(frozen=True, slots=True)
class DiskIdentity:
    vm: str
    vm_id: uuid.UUID
    disk: str
    disk_id: uuid.UUID
    generation: int


class TrackedDisk:
    """A raw image with change tracking: the block device the agent exports."""

    def __init__(self, device: RawImage, image_path: Path, identity: DiskIdentity,
                 intent: IntentBitmapFile, *, buffer_limit: int, log_base: Path | None = None,
                 bitmap: bool = False, cbw_budget_bytes: int = 1 << 62, cbw_max_age_s: float = float("inf")):
        self.device = device
        self.image_path = image_path
        self.log_base = log_base or image_path  # logs are <log_base name>.<seq>.hrl beside it
        self.identity = identity
        self.intent = intent
        self.size = device.size
        self.read_only = device.read_only
        self.buffer_limit = buffer_limit
        self._new_dirty = lambda: DirtyTracking(self.size, device.fd, self.log_base, cbw_budget_bytes=cbw_budget_bytes,
                                                cbw_max_age_s=cbw_max_age_s)
        self.bitmap = bitmap
        self.switch_to: bool | None = None  # bitmap (True) or journal (False) from the next cut on
        self.dirty = self._new_dirty() if bitmap else None
        self.log: ActiveLog | None = None
        self._unsynced: list[ActiveLog] = []
        self._ops = 0  # journaled operations so far (monotonic)
        self._durable_ops = 0
        self._flush_lock = asyncio.Lock()
        self._mark_lock = asyncio.Lock()
        self._mark_batch: tuple[set[int], asyncio.Future] | None = None
        # True once a failed write could not even be read back: the log may not describe
        # the image, so the bitmap keeps its marks until a restart re-journals them.
        self.untrusted = False
        # plain int counters: a dict update per write cost measurable time on the hot path
        self.writes = 0
        self.write_bytes = 0
        self.trims = 0
        self.zeroes = 0
        self.flushes = 0
        self.syncs = 0

    # --- log lifecycle ----------------------------------------------------
    def open_log(self, sequence: int) -> ActiveLog:
        ident = self.identity
        header = HrlHeader(vm_id=ident.vm_id, disk_id=ident.disk_id, generation=ident.generation,
                           sequence=sequence, disk_size=self.size, created_ns=_now_ns())
        self.log = ActiveLog(log_path(self.log_base, sequence), header, self.buffer_limit)
        return self.log

    def prepare_log(self, sequence: int) -> ActiveLog:
        """Step 1 of a cut: create the next log (nothing else changes; undo with ``discard``)."""
        ident = self.identity
        header = HrlHeader(vm_id=ident.vm_id, disk_id=ident.disk_id, generation=ident.generation,
                           sequence=sequence, disk_size=self.size, created_ns=_now_ns())
        return ActiveLog(log_path(self.log_base, sequence), header, self.buffer_limit)

    def commit_log(self, new: ActiveLog) -> ActiveLog:
        """Step 3 of a cut (after every disk's END record is written): switch; cannot fail."""
        old = self.log
        self._unsynced.append(old)
        self.log = new
        if self.bitmap:
            self.dirty.freeze(old.sequence, self.intent.period)
        if self.switch_to is not None:
            self.bitmap, self.switch_to = self.switch_to, None
            if self.bitmap and self.dirty is None:
                self.dirty = self._new_dirty()
        self.intent.start_period()
        return old

    async def finish_cut(self, old: ActiveLog, shipped: bool = True) -> ClosedLog:
        """The asynchronous half: make the ended log and the image durable, then shrink the bitmap
        (bitmap mode: only for a cut no cycle ships; a shipped cycle's marks stay until acknowledged)."""
        await self.flush(force=True)
        if not self.untrusted and (self.dirty is None or not shipped):
            await self.intent.reset_to_period(self.log.sequence)
        return old.describe_closed(self.identity.disk)

    async def acknowledged(self, sequence: int) -> None:
        """Bitmap mode: the replica holds cycle ``sequence``; shrink the on-disk marks to the
        current period's and those of the cycles still unacknowledged."""
        if self.dirty is not None and not self.untrusted and self.log is not None:
            await self.intent.reset_to_period(self.log.sequence, also=self.dirty.acknowledged(sequence))
            if not self.bitmap and self.dirty.settled():  # back to journal mode, every bitmap cycle acknowledged
                self.dirty = None

    # --- reads ------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        return self.device.pread(offset, length)

    def extents(self, offset: int, length: int):
        return self.device.extents(offset, length)

    # --- writes -----------------------------------------------------------
    def can_write_now(self, offset: int, length: int) -> bool:
        """True if the regions are already marked: the write may complete synchronously."""
        return self.intent.period.covers(offset, length)

    # Each operation is journaled first, then applied to the device, in one synchronous
    # step.  If journaling a large write fails, nothing happened.  If the device fails
    # after the record was journaled, the range's actual contents are journaled after
    # it, so the log still describes the image exactly.  Either way the error goes back
    # to the guest, for whom the range's contents are then undefined (as NBD allows).

    def write_now(self, offset: int, data, fua: bool = False) -> None:
        """Journal and apply one write in one synchronous step (regions already marked)."""
        dirty = self.dirty
        if dirty is not None and dirty.snapshots:
            dirty.before_change(offset, len(data))
        if self.bitmap:
            dirty.current.mark(offset, len(data))
            self.device.pwrite(offset, data)
            self.writes += 1
            self.write_bytes += len(data)
            self._ops += 1
            return
        log = self.log
        log.append_write(offset, data, RECORD_FLAG_FUA if fua else 0)
        try:
            self.device.pwrite(offset, data)
        except OSError:
            self._journal_actual(offset, len(data))
            raise
        finally:
            self._ops += 1
        self.writes += 1
        self.write_bytes += len(data)
        log.drain_if_full()

    def _mark_dirty(self, offset: int, length: int) -> bool:
        """Copy-before-write for frozen cycles; in bitmap mode mark the blocks, else answer False."""
        dirty = self.dirty
        if dirty is not None and dirty.snapshots:
            dirty.before_change(offset, length)
        if not self.bitmap:
            return False
        dirty.current.mark(offset, length)
        self._ops += 1
        return True

    def trim_now(self, offset: int, length: int, fua: bool = False) -> None:
        if self._mark_dirty(offset, length):
            self.device.trim_now(offset, length)
            self.trims += 1
            return
        log = self.log
        flags = RECORD_FLAG_FUA if fua else 0
        for off in range(offset, offset + length, TRIM_CHUNK):
            log.append_trim(off, min(TRIM_CHUNK, offset + length - off), flags)
        try:
            self.device.trim_now(offset, length)
        except OSError:
            self._journal_actual(offset, length)
            raise
        finally:
            self._ops += 1
        self.trims += 1
        log.drain_if_full()

    def zero_now(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        if self._mark_dirty(offset, length):
            self.device.zero_now(offset, length, may_trim)
            self.zeroes += 1
            return
        log = self.log
        flags = (RECORD_FLAG_FUA if fua else 0) | (0 if may_trim else RECORD_FLAG_NO_HOLE)
        for off in range(offset, offset + length, TRIM_CHUNK):
            log.append_zero(off, min(TRIM_CHUNK, offset + length - off), flags)
        try:
            self.device.zero_now(offset, length, may_trim)
        except OSError:
            self._journal_actual(offset, length)
            raise
        finally:
            self._ops += 1
        self.zeroes += 1
        log.drain_if_full()

    def _journal_actual(self, offset: int, length: int) -> None:
        """After a failed device operation: journal what the range really holds now."""
        try:
            for off in range(offset, offset + length, ACTUAL_CHUNK):
                n = min(ACTUAL_CHUNK, offset + length - off)
                self.log.append_buffered_write(off, self.device.pread(off, n), 0)
        except OSError as exc:  # cannot even read it back: only a restart's re-journaling can tell
            self.untrusted = True
            event(log, "journal_untrusted", logging.ERROR, vm=self.identity.vm, disk=self.identity.disk,
                  offset=offset, bytes=length, error=str(exc),
                  hint="restart the agent once the disk is healthy: recovery re-journals the marked regions")

    async def _ensure_marked(self, offset: int, length: int) -> None:
        """Return when every region of the range is marked in this period (durably, I1).

        Checked again after each wait: a cut may have started a new period meanwhile,
        and the caller writes synchronously right after this returns.
        """
        while regions := self.intent.period.unmarked(offset, length):
            await self._mark_group(regions + self._mark_ahead(offset, length, regions))

    def _mark_ahead(self, offset: int, length: int, regions: list[int]) -> list[int]:
        """Regions after a sequential stream's write, marked with it to save slot writes.

        A write that enters a new region from an already marked one (its preceding
        ``length`` bytes lie in a marked region) looks like one write of a stream;
        the next ``MARK_AHEAD_REGIONS`` regions go into the same slot write.  More
        marks never break I1; they only widen what recovery re-journals.
        """
        period = self.intent.period
        first = regions[0]
        if first == 0 or not period.marks[first - 1] or offset - length >= first << period.shift:
            return []
        stop = min(regions[-1] + 1 + MARK_AHEAD_REGIONS, len(period.marks))
        return [r for r in range(regions[-1] + 1, stop) if not period.marks[r]]

    async def _mark_group(self, regions: list[int]) -> None:
        """Group commit of marks: regions asked for while a slot write runs share the next one."""
        batch = self._mark_batch
        if batch is not None:  # a batch is still open: join it and wait for its slot write
            batch[0].update(regions)
            await asyncio.shield(batch[1])
            return
        batch = self._mark_batch = (set(regions), asyncio.get_running_loop().create_future())
        try:
            async with self._mark_lock:
                self._mark_batch = None  # from here on the set is fixed; later callers open the next
                await self.intent.mark(sorted(batch[0]))
        except BaseException as exc:
            if self._mark_batch is batch:
                self._mark_batch = None
            if isinstance(exc, Exception):  # the slot write failed: so do the joiners' writes
                batch[1].set_exception(exc)
                batch[1].exception()  # retrieved here: the joiners may all be gone
            else:  # the leader was cancelled: joiners look again and one of them leads
                batch[1].set_result(None)
            raise
        batch[1].set_result(None)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        if length := len(data):
            await self._ensure_marked(offset, length)
            self.write_now(offset, data, fua)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if length:
            await self._ensure_marked(offset, length)
            self.trim_now(offset, length, fua)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        if length:
            await self._ensure_marked(offset, length)
            self.zero_now(offset, length, may_trim, fua)
        if fua:
            await self.flush()

    # --- durability -------------------------------------------------------
    async def flush(self, force: bool = False) -> None:
        """Make every operation journaled before this call durable in the log and the image.

        Concurrent flushes share one fdatasync round (group commit).
        """
        target = self._ops
        self.flushes += 1
        async with self._flush_lock:
            if self._durable_ops >= target and not force and not self._unsynced:
                return
            upto = self._ops
            log_ = self.log
            if log_ is not None:
                log_.drain()
            pending = list(self._unsynced)
            await asyncio.to_thread(self._sync_files, pending, log_)
            for old in pending:
                old.close_fd()
                self._unsynced.remove(old)
            self._durable_ops = max(self._durable_ops, upto)
            self.syncs += 1

    def _sync_files(self, pending: list[ActiveLog], current: ActiveLog | None) -> None:
        for old in pending:
            old.sync_fd()
        if current is not None:
            current.sync_fd()
        self.device.sync()

    async def close(self, *, end_log: bool = True) -> None:
        """Flush and close.  With ``end_log`` the active log gets its END record and the
        bitmap is cleared: nothing is uncertain after a clean stop, so the next start
        re-journals nothing."""
        if self.log is not None and not self.read_only:
            ended = False
            if end_log:
                old = self.log
                try:
                    old.write_end()
                except OSError as exc:  # e.g. a full disk: the log stays open; the next start recovers it
                    event(log, "log_end_failed", logging.ERROR, vm=self.identity.vm, disk=self.identity.disk,
                          seq=old.sequence, error=str(exc))
                else:
                    ended = True
                    self._unsynced.append(old)
                    self.log = None
            await self.flush(force=True)
            if self.log is not None:
                self.log.close_fd()
            if ended and not self.untrusted and self.dirty is None:  # bitmap: marks kept for the next start
                self.intent.start_period()
                await self.intent.reset_to_period(old.sequence)
        if self.dirty is not None:
            self.dirty.close()
        self.intent.close()
        self.device.close_fd()

    @property
    def stats(self) -> dict:
        return {"writes": self.writes, "write_bytes": self.write_bytes, "trims": self.trims,
                "zeroes": self.zeroes, "flushes": self.flushes, "syncs": self.syncs}

    def status(self) -> dict:
        lg = self.log
        return {
            "name": self.identity.disk,
            "disk_id": str(self.identity.disk_id),
            "path": str(self.image_path),
            "size_bytes": self.size,
            "read_only": self.read_only,
            "sequence": lg.sequence if lg else None,
            "active_log": str(lg.path) if lg else None,
            "active_log_records": lg.encoder.record_count if lg else 0,
            "marked_regions": self.intent.period.count,
            "stats": self.stats,
            **({"bitmap": self.dirty.status()} if self.dirty is not None else {}),
        }


def _now_ns() -> int:
    import time
    return time.time_ns()
