"""Block devices the agent serves: the interface and the raw image.

Every export is a :class:`BlockDevice`.  Reads and writes are synchronous
``pread``/``pwrite`` calls: they land in the page cache and measured faster
inline than through a thread hop; only ``flush`` (fdatasync) blocks long
enough to be sent to a thread.  Devices compose: the change-tracking filter
(:mod:`hvr_agent.tracker`) wraps any of them.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Protocol

from hvr_common.shell import sparse
from hvr_common.pure.errors import UsageError


class BlockDevice(Protocol):
    size: int
    read_only: bool
    supports_holes: bool

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None: ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...

    def sync(self) -> None: ...

    async def flush(self) -> None: ...

    def close(self) -> None: ...


class RawImage:
    """A raw image: a sparse regular file, or a block device such as an LVM volume."""

    def __init__(self, path: Path, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"disk image {self.path} does not exist",
                             hint="create it first, e.g. qemu-img create -f raw PATH SIZE") from None
        except IsADirectoryError:
            raise UsageError(f"disk image {self.path} is a directory") from None
        except PermissionError:
            raise UsageError(f"no permission to open disk image {self.path}") from None
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise UsageError(f"{self.path} is neither a regular file nor a block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        self.supports_holes = not self.is_block_device
        if self.size == 0:
            os.close(self.fd)
            raise UsageError(f"disk image {self.path} is empty", hint="give it a size with qemu-img create or truncate")

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # short read at EOF cannot happen in range, but never return short data
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data) -> None:
        n = os.pwrite(self.fd, data, offset)
        if n != len(data):
            mv = memoryview(data)
            while n < len(mv):
                n += os.pwrite(self.fd, mv[n:], offset + n)

    def trim(self, offset: int, length: int) -> None:
        sparse.punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        sparse.zero_range(self.fd, offset, length, may_trim=may_trim)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if not self.supports_holes:
            return [(offset, length, True)]
        return sparse.data_extents(self.fd, offset, length)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    async def flush(self) -> None:
        await asyncio.to_thread(self.sync)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
