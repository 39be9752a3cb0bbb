"""A frozen cycle of a bitmap-tracked disk, with its copy-before-write side file.

At a cut in bitmap mode each disk's dirty map is frozen as cycle *k*
(:class:`CutSnapshot`) and copy-before-write is armed until the cycle is
acknowledged: the first change (write, trim or write-zeroes) to a block of
cycle *k* first copies the block's cut-time contents into the side file
``<image>.<k:010d>.cbw``, at the block's own offset (a sparse file, no
fsync: after a crash the write-intent bitmap makes the next cycle carry the
blocks, docs/bitmap-tracking.md).  The cycle's stream (a worker thread) reads
the frozen blocks from the side file if they were copied, else from the
image, under one lock with the copying, so the two never cross: a block is
either read before the change or copied before it.  A block read once is
still copied before it changes, so the cycle can be read again, to the same
bytes, when its upload is sent again.

Copy-before-write is bounded: past ``budget_bytes`` copied, or
``max_age_s`` after the cut, the snapshot gives up (no more copies) and the
build's next read raises :class:`SnapshotAbandoned`: the cycle is abandoned
and its blocks go with the next one (:mod:`hvr_agent.dirty_tracking`).  A
read that succeeded got cut-time contents either way.

Write order for a change to a frozen block (event loop, under the lock):
1. image ``pread`` of the block's cut-time contents; 2. ``pwrite`` into the
side file; 3. the block marked copied; then the caller changes the image.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from hvr_common.pure.dirty_map import BLOCK_BYTES, BLOCK_SHIFT, DirtyMap
from hvr_common.shell.files import pwrite_all, unlink_if_exists


class SnapshotAbandoned(Exception):
    """The snapshot gave up copy-before-write (budget or time bound): its cycle cannot be built."""


def side_path(log_base: Path, sequence: int) -> Path:
    """``<image file name>.<10-digit sequence>.cbw`` beside the disk's logs."""
    return log_base.with_name(f"{log_base.name}.{sequence:010d}.cbw")


def list_side_files(log_base: Path) -> list[Path]:
    return sorted(log_base.parent.glob(log_base.name + ".*.cbw"))


class CutSnapshot:
    """Cycle ``sequence`` of one disk: its frozen blocks, the copies made, the blocks read."""

    def __init__(self, sequence: int, frozen: DirtyMap, image_fd: int, path: Path, cut_ns: int,
                 budget_bytes: int = 1 << 62, max_age_s: float = float("inf")):
        self.sequence = sequence
        self.frozen = frozen
        self.image_fd = image_fd
        self.path = path
        self.cut_ns = cut_ns
        self.copied = DirtyMap(frozen.disk_size)
        self.copied_bytes = 0
        self.lock = threading.Lock()
        self.fd = -1
        self.closed = False
        self.budget_bytes = budget_bytes
        self.give_up_at = time.monotonic() + max_age_s
        self.gave_up: str | None = None  # why copy-before-write stopped before the cycle was built

    # --- the event loop: before a change of the image -----------------------------------
    def before_change(self, offset: int, length: int) -> int:
        """Copy the cut-time contents of the frozen, uncopied blocks of a range aside;
        return the bytes copied.  Raises OSError (the change must then not happen)."""
        if self.closed or not self.frozen.any_in(offset, length):
            return 0
        copied = 0
        with self.lock:
            if self.closed:
                return 0
            if time.monotonic() > self.give_up_at:
                self._give_up("its copy-before-write time bound passed")
                return 0
            for run_off, run_len in self.frozen.runs(offset & ~(BLOCK_BYTES - 1),
                                                     _aligned_end(offset + length) - (offset & ~(BLOCK_BYTES - 1))):
                for block_off, n in self._uncopied(run_off, run_len):
                    data = os.pread(self.image_fd, n, block_off)
                    if self.fd < 0:
                        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    pwrite_all(self.fd, data, block_off)
                    self.copied.mark(block_off, n)
                    copied += len(data)
            self.copied_bytes += copied
            if self.copied_bytes > self.budget_bytes:
                self._give_up(f"its copies passed the copy-before-write budget ({self.budget_bytes} bytes)")
        return copied

    def _give_up(self, why: str) -> None:
        """Stop copying (under the lock): the build's next read raises; the copies go."""
        self.gave_up = why
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        unlink_if_exists(self.path)

    def _uncopied(self, offset: int, length: int):
        """Pieces of a frozen run not copied yet (block aligned, clipped to the disk)."""
        start = None
        block = offset >> BLOCK_SHIFT
        stop = (offset + length + BLOCK_BYTES - 1) >> BLOCK_SHIFT
        for b in range(block, stop + 1):
            free = b < stop and not self.copied.is_marked(b)
            if free and start is None:
                start = b
            elif not free and start is not None:
                first = start << BLOCK_SHIFT
                yield first, min(b << BLOCK_SHIFT, self.frozen.disk_size) - first
                start = None

    # --- the cycle's stream (a worker thread) ----------------------------------------------
    def runs(self):
        """The frozen runs, in disk order (what the cycle carries)."""
        return self.frozen.runs()

    def read_range(self, offset: int, length: int) -> bytes:
        """The cut-time contents of a frozen range (the same bytes however often it is read)."""
        out = bytearray()
        with self.lock:
            if self.closed:
                raise SnapshotAbandoned(self.gave_up or f"cycle {self.sequence} was abandoned")
            pos = offset
            end = offset + length
            while pos < end:
                block = pos >> BLOCK_SHIFT
                source_copied = self.copied.is_marked(block)
                stop = min(end, (block + 1) << BLOCK_SHIFT)
                while stop < end and self.copied.is_marked(stop >> BLOCK_SHIFT) == source_copied:
                    stop = min(end, stop + BLOCK_BYTES)
                fd = self.fd if source_copied else self.image_fd
                data = os.pread(fd, stop - pos, pos)
                out += data
                if len(data) < stop - pos:
                    out += bytes(stop - pos - len(data))
                pos = stop
        return bytes(out)

    # --- the end -----------------------------------------------------------------------
    def close(self) -> None:
        """Disarm and drop the copies (the cycle was acknowledged or abandoned)."""
        with self.lock:
            self.closed = True
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            unlink_if_exists(self.path)


def _aligned_end(end: int) -> int:
    return (end + BLOCK_BYTES - 1) & ~(BLOCK_BYTES - 1)
