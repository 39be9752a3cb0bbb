"""Block devices: the interface the NBD server serves, and the raw image.

Every export is a :class:`BlockDevice`.  The interface has two kinds of
operation:

* synchronous ones (``pread``, ``write_now``, ``extents``) that only touch the
  page cache; they measured faster inline on the event loop than through a
  thread hop, and ``write_now`` lets the server answer a plain write within the
  same receive call;
* asynchronous ones (``write``, ``trim``, ``write_zeroes``, ``flush``,
  ``close``) that may wait: for an fdatasync (sent to a worker thread), or
  for whatever a device layered over another must do first.

Devices compose: the agent's change-tracking filter (``hvr_agent.tracker``)
wraps a :class:`RawImage` and is itself a :class:`BlockDevice`.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Protocol

from hvr_common.pure.errors import UsageError
from hvr_common.shell import sparse
from hvr_common.shell.files import pwrite_all


class BlockDevice(Protocol):
    """What the NBD server calls; nothing else.

    Offsets and lengths are in bytes and already checked against ``size`` (and
    against ``read_only``) by the protocol core before they get here.
    """

    size: int
    read_only: bool

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes (holes read as zeroes)."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """The range as sorted ``(offset, length, is_data)`` runs; a hole reads as zeroes."""

    def can_write_now(self, offset: int, length: int) -> bool:
        """True if :meth:`write_now` may take a write to this range without waiting."""

    def write_now(self, offset: int, data) -> None:
        """Apply one write synchronously; only after :meth:`can_write_now` said yes."""

    async def write(self, offset: int, data, fua: bool = False) -> None:
        """Apply one write; with ``fua``, return once it is durable."""

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard the range (it then reads as zeroes)."""

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        """Zero the range; ``may_trim`` allows a hole in its place."""

    async def flush(self) -> None:
        """Make every write completed before this call durable."""

    async def close(self) -> None:
        """Make the device durable and release it."""


class RawImage:
    """A raw image: a sparse regular file, or a block device such as an LVM volume.

    Besides the :class:`BlockDevice` interface it offers the synchronous steps a
    device layered over it composes: ``pwrite``, ``trim_now``, ``zero_now``,
    ``sync`` and ``close_fd``.
    """

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

    # --- synchronous steps ------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        # The NBD read path: os.pread inline (one call fewer than files.pread_padded, measurable at 4 KiB).
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # cannot happen in range, but never return short data
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data) -> None:
        # The NBD write path: one os.pwrite inline; the helper only finishes a short write.
        if os.pwrite(self.fd, data, offset) != len(data):
            pwrite_all(self.fd, data, offset)

    write_now = pwrite  # the page cache never makes a write wait

    def can_write_now(self, offset: int, length: int) -> bool:
        return True

    def trim_now(self, offset: int, length: int) -> None:
        sparse.punch_hole(self.fd, offset, length)

    def zero_now(self, offset: int, length: int, may_trim: bool) -> None:
        sparse.zero_range(self.fd, offset, length, may_trim=may_trim)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if not self.supports_holes:
            return [(offset, length, True)]
        return sparse.data_extents(self.fd, offset, length)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- the asynchronous half of the interface ---------------------------
    async def write(self, offset: int, data, fua: bool = False) -> None:
        self.pwrite(offset, data)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if length:
            self.trim_now(offset, length)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        if length:
            self.zero_now(offset, length, may_trim)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await asyncio.to_thread(self.sync)

    async def close(self) -> None:
        if self.fd >= 0 and not self.read_only:
            await self.flush()
        self.close_fd()
