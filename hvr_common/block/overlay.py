"""A throw-away writable layer over a read-only block device.

Writes go to a sparse *delta* file of the base's size; an in-memory set of
written ranges says which bytes come from the delta and which from the base.
Creating it costs one empty sparse file whatever the size of the base, and
it grows only by what is written through it.  Trim and write-zeroes are kept
in the delta as zeroed ranges, so they hide the base's bytes too.

Nothing in it is meant to outlive it: ``flush`` does not fsync (the layer is
deleted when the test it serves ends, and a daemon restart ends that test),
and :meth:`discard` closes and deletes the delta file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from hvr_common.pure.undo_capture import CapturedRanges
from hvr_common.shell import sparse
from hvr_common.shell.files import pwrite_all, unlink_if_exists


class ReadableDevice(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...


class Overlay:
    read_only = False

    def __init__(self, base: ReadableDevice, delta_path: Path):
        self.base = base
        self.size = base.size
        self.delta_path = Path(delta_path)
        self.fd = os.open(self.delta_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            os.unlink(self.delta_path)
            raise
        self.written = CapturedRanges()

    # --- which layer holds what -------------------------------------------------------------
    def _split(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs ``(offset, length, in_delta)`` covering the range, in order."""
        base_parts = self.written.uncaptured(offset, length)
        runs: list[tuple[int, int, bool]] = []
        cursor = offset
        for o, n in base_parts:
            if o > cursor:
                runs.append((cursor, o - cursor, True))
            runs.append((o, n, False))
            cursor = o + n
        if cursor < offset + length:
            runs.append((cursor, offset + length - cursor, True))
        return runs

    def _mark(self, offset: int, length: int) -> None:
        for o, n in self.written.uncaptured(offset, length):
            self.written.add(o, n)

    # --- BlockDevice ------------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        runs = self._split(offset, length)
        if len(runs) == 1 and not runs[0][2]:
            return self.base.pread(offset, length)
        return b"".join(self._read_delta(o, n) if in_delta else self.base.pread(o, n) for o, n, in_delta in runs)

    def _read_delta(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data if len(data) == length else data + bytes(length - len(data))

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        for o, n, in_delta in self._split(offset, length):
            runs.extend(sparse.data_extents(self.fd, o, n) if in_delta else self.base.extents(o, n))
        return runs

    def can_write_now(self, offset: int, length: int) -> bool:
        return True

    def write_now(self, offset: int, data) -> None:
        pwrite_all(self.fd, data, offset)
        self._mark(offset, len(data))

    async def write(self, offset: int, data, fua: bool = False) -> None:
        self.write_now(offset, data)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, True, fua)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        if length:
            sparse.zero_range(self.fd, offset, length, may_trim=may_trim)
            self._mark(offset, length)

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        self.discard()

    @property
    def delta_bytes(self) -> int:
        """Bytes the delta file takes on disk."""
        try:
            return os.fstat(self.fd).st_blocks * 512 if self.fd >= 0 else 0
        except OSError:
            return 0

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        unlink_if_exists(self.delta_path)
