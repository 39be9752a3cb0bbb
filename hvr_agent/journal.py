"""The active HRL log of one disk: appends, draining, closing.

Record bytes accumulate in a user-space buffer (small writes) or go straight
to the file with ``writev`` (large writes), so a burst of small guest writes
costs one ``write(2)`` per ``journal_buffer_bytes``.  Durability comes only
from :meth:`TrackedDisk.flush` (:mod:`hvr_agent.tracker`), which drains this
buffer and fdatasyncs the file: the NBD ordering rules let unflushed writes
be lost in a crash, and the write-intent bitmap bounds where that can happen.
All methods run on the event loop thread except :meth:`sync_fd` (threads).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from hvr_common import sparse
from hvr_common.hrl import HrlEncoder, HrlHeader

DIRECT_WRITE_BYTES = 64 * 1024  # writes this large skip the buffer (one writev, no copy)
PREALLOCATE_BYTES = 64 * 1024 * 1024  # log blocks are reserved this many at a time


def log_path(image_path: Path, sequence: int) -> Path:
    """``<image file name>.<10-digit sequence>.hrl`` in the image's folder."""
    return image_path.with_name(f"{image_path.name}.{sequence:010d}.hrl")


def parse_log_sequence(image_path: Path, candidate: Path) -> int | None:
    prefix = image_path.name + "."
    name = candidate.name
    if not (name.startswith(prefix) and name.endswith(".hrl")):
        return None
    middle = name[len(prefix):-4]
    if len(middle) != 10 or not middle.isdigit():
        return None
    return int(middle)


def list_logs(image_path: Path) -> list[tuple[int, Path]]:
    """Existing logs of a disk, oldest first."""
    out = []
    for p in image_path.parent.glob(image_path.name + ".*.hrl"):
        seq = parse_log_sequence(image_path, p)
        if seq is not None:
            out.append((seq, p))
    return sorted(out)


@dataclass(frozen=True, slots=True)
class ClosedLog:
    disk: str
    path: Path
    sequence: int
    record_count: int
    write_bytes: int
    file_bytes: int

    def to_dict(self) -> dict:
        return {"disk": self.disk, "path": str(self.path), "sequence": self.sequence,
                "record_count": self.record_count, "write_bytes": self.write_bytes,
                "file_bytes": self.file_bytes}


class ActiveLog:
    __slots__ = ("path", "fd", "encoder", "buf", "buffer_limit", "closed", "written", "reserved")

    def __init__(self, path: Path, header: HrlHeader, buffer_limit: int):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.encoder = HrlEncoder(header)
        header_bytes = self.encoder.header_bytes()
        if os.write(self.fd, header_bytes) != len(header_bytes):
            raise OSError(f"short write of the HRL header to {path}")
        self.buf = bytearray()
        self.buffer_limit = buffer_limit
        self.closed = False
        self.written = len(header_bytes)  # bytes handed to the kernel
        self.reserved = 0  # blocks reserved up to here (beyond the size, released at the end)

    @property
    def sequence(self) -> int:
        return self.encoder.header.sequence

    def append_write(self, offset: int, data, flags: int) -> None:
        hdr = self.encoder.write(offset, data, flags)
        if len(data) >= DIRECT_WRITE_BYTES:
            if self.buf:
                self.drain()
            self._write_all([hdr, data])
            return
        buf = self.buf
        buf += hdr
        buf += data
        if len(buf) >= self.buffer_limit:
            self.drain()

    def append_trim(self, offset: int, length: int, flags: int) -> None:
        self.buf += self.encoder.trim(offset, length, flags)
        if len(self.buf) >= self.buffer_limit:
            self.drain()

    def append_zero(self, offset: int, length: int, flags: int) -> None:
        self.buf += self.encoder.zero(offset, length, flags)
        if len(self.buf) >= self.buffer_limit:
            self.drain()

    def _reserve(self, nbytes: int) -> None:
        end = self.written + nbytes
        if end > self.reserved:
            start = max(self.reserved, self.written)
            if sparse.preallocate(self.fd, start, PREALLOCATE_BYTES + end - start):
                self.reserved = end + PREALLOCATE_BYTES
            else:
                self.reserved = 1 << 62  # unsupported: stop trying

    def _write_all(self, parts) -> None:
        total = sum(len(p) for p in parts)
        self._reserve(total)
        self.written += total
        n = os.writev(self.fd, parts)
        if n < total:  # short write: finish it piecewise
            rest = b"".join(bytes(p) for p in parts)[n:]
            while rest:
                rest = rest[os.write(self.fd, rest):]

    def drain(self) -> None:
        """Hand buffered records to the kernel (not yet durable)."""
        if not self.buf:
            return
        self._reserve(len(self.buf))
        self.written += len(self.buf)
        view = memoryview(self.buf)
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        finally:
            view.release()
            del self.buf[:done]

    def write_end(self) -> None:
        """Append the END record: after this the log takes nothing more."""
        self.buf += self.encoder.end(time.time_ns())
        self.drain()
        if self.reserved > self.written:
            os.ftruncate(self.fd, self.written)  # give back the reserved blocks past the end
        self.closed = True

    def sync_fd(self) -> None:
        os.fdatasync(self.fd)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe_closed(self, disk: str) -> ClosedLog:
        enc = self.encoder
        return ClosedLog(disk, self.path, self.sequence, enc.record_count, enc.write_bytes, enc.position)
