"""The write-intent bitmap file of one disk (``<image>.wib``) and its group commit.

Invariant: every region marked in ``period`` (the marks the write fast path
trusts) is marked in the bitmap that is durable on disk.  ``period`` only
grows under the lock after a durable write that includes the new regions,
and a reset to a smaller on-disk set is written from ``period`` itself while
holding the same lock, so the invariant holds across cuts.

Every region entering ``period`` (``mark``, ``mark_carried``) is also handed to
the disk's digest cache (``digests``), whose written set must hold every
region a write may have touched since its chunks were hashed (C7,
``docs/resync.md``).  No other code marks ``period``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from hvr_common.pure.digest_cache import DigestCache
from hvr_common.pure.intent_bitmap import BitmapCorruptError, IntentBitmap, decode_file, slot_size


def bitmap_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.name + ".wib")


class IntentBitmapFile:
    def __init__(self, path: Path, disk_size: int, region_bytes: int):
        self.path = path
        self.disk_size = disk_size
        self.region_bytes = region_bytes
        self.slot_bytes = slot_size(disk_size, region_bytes)
        self.period = IntentBitmap(disk_size, region_bytes)
        self.durable = IntentBitmap(disk_size, region_bytes)
        self.counter = 0
        self.next_slot = 0
        self.log_sequence = 0
        self._lock = asyncio.Lock()
        self.fd = -1
        self.digests: DigestCache | None = None  # the disk's cached chunk digests (hvr_agent.digest_cache)

    def load(self) -> IntentBitmap | None:
        """Open (creating if absent) and return the marks found on disk, or None if unreadable.

        None means the file was missing or corrupt: the caller must treat the
        whole disk as uncertain.
        """
        existed = self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not existed:
            os.ftruncate(self.fd, 2 * self.slot_bytes)
            return IntentBitmap(self.disk_size, self.region_bytes)
        raw = os.pread(self.fd, 2 * self.slot_bytes, 0)
        try:
            state = decode_file(raw, self.disk_size, self.region_bytes)
        except BitmapCorruptError:
            os.ftruncate(self.fd, 2 * self.slot_bytes)
            return None
        self.counter = state.counter
        self.next_slot = state.slot ^ 1
        self.log_sequence = state.log_sequence
        self.durable = state.bitmap.copy()
        return state.bitmap

    def _write_slot(self, data: bytes, slot: int) -> None:
        os.pwrite(self.fd, data, slot * self.slot_bytes)
        os.fdatasync(self.fd)

    async def _persist(self, marks: IntentBitmap, log_sequence: int) -> None:
        data = marks.encode_slot(self.counter + 1, log_sequence)
        slot = self.next_slot
        await asyncio.to_thread(self._write_slot, data, slot)
        self.counter += 1
        self.next_slot = slot ^ 1
        self.log_sequence = log_sequence
        self.durable = marks

    async def mark(self, regions: list[int]) -> None:
        """Return once ``regions`` are durable and in ``period``; the caller then writes at once."""
        async with self._lock:
            durable = self.durable.marks
            missing = [r for r in regions if not durable[r]]
            if missing:
                widened = self.durable.copy()
                widened.mark(missing)
                await self._persist(widened, self.log_sequence)
            self.period.mark(regions)
            if self.digests is not None:
                self.digests.note_marks(regions)

    def mark_carried(self, regions: list[int]) -> None:
        """Regions already durable in the bitmap (an abandoned cycle's) joining this period."""
        self.period.mark(regions)
        if self.digests is not None:
            self.digests.note_marks(regions)

    def start_period(self) -> None:
        """A cut: the fast path forgets the marks; the durable bitmap keeps them until reset."""
        self.period = IntentBitmap(self.disk_size, self.region_bytes)

    async def reset_to_period(self, log_sequence: int, also: IntentBitmap | None = None) -> None:
        """After the previous log and the image are durable: shrink the on-disk marks to this period's
        (and to ``also``'s: bitmap tracking keeps the regions of cycles not yet acknowledged)."""
        async with self._lock:
            marks = self.period.copy()
            if also is not None:
                marks.mark(also.marked_regions())
            await self._persist(marks, log_sequence)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
