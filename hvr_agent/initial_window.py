"""Initial-replication windows: a disk's allocated data in ``[start, end)``, as a bundle in memory.

Blocking functions, run in worker threads by :mod:`hvr_agent.initial_copy`.
A window is built in a buffer the caller reuses (see
:func:`build_initial_bundle`): it is sent right away and never needs to
outlive the process.  Holes cost nothing, so a window spans as much of a
sparse disk as it takes to collect its budget of data (:func:`plan_window`).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

from hvr_common.pure.bundle import BundleHeader, BundleKind, FrameEncoder
from hvr_common.pure.hrl import END_RECORD_SIZE, HEADER_SIZE, RECORD_SIZE, HrlEncoder, HrlHeader
from hvr_common.shell import sparse
from hvr_agent.shipper import RECORD_BYTES, BundleWriter, DiskSource

_ZERO_VIEW = memoryview(bytes(RECORD_BYTES))
_BUFFER_ROUND = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MemoryBundle:
    """A bundle held in memory as its pieces, header first: an initial window on its way."""

    pieces: tuple[bytes | memoryview, ...]
    sha256: str
    wire_bytes: int
    write_bytes: int  # WRITE payload bytes inside
    compressed_frames: int


class _MemoryWriter(BundleWriter):
    """Keeps the frames in memory as they are made; the digest is taken once the header is known."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[bytes | memoryview] = []

    def write(self, pieces: list[bytes]) -> None:
        self.pieces += pieces

    def commit(self, header: BundleHeader) -> MemoryBundle:
        pieces = (header.encode(), *self.pieces)
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        return MemoryBundle(pieces, digest.hexdigest(), sum(len(p) for p in pieces), self.write_bytes,
                            self.compressed_frames)


def allocated_bytes(fd: int, offset: int, length: int) -> int:
    """Bytes of data (not holes) in ``[offset, offset+length)`` of an image."""
    return sum(n for _, n, is_data in sparse.data_extents(fd, offset, length) if is_data)


def plan_window(fd: int, start: int, size: int, window_bytes: int, *, scan_bytes: int = 1 << 30) -> int:
    """End of the window starting at ``start``: it holds ``window_bytes`` of allocated data, or reaches the end.

    Holes cost nothing to send, so a window spans as much of a sparse disk as
    it takes to collect ``window_bytes`` of data.
    """
    budget = window_bytes
    pos = start
    while pos < size:
        span = min(scan_bytes, size - pos)
        for offset, length, is_data in sparse.data_extents(fd, pos, span):
            if is_data:
                if length >= budget:
                    return offset + budget
                budget -= length
        pos += span
    return size


@dataclass(frozen=True, slots=True)
class InitialWindow:
    bundle: MemoryBundle
    start: int
    end: int
    allocated_bytes: int  # data bytes of the image in [start, end)
    buffer: bytearray  # holds the window's HRL stream; reusable once the window's upload has ended


def window_buffer_bytes(extents, header_bytes: int = HEADER_SIZE) -> int:
    """Bytes of HRL stream a window of these ``(offset, length, is_data)`` extents needs at most."""
    need = header_bytes + END_RECORD_SIZE
    for _offset, length, is_data in extents:
        if is_data:
            need += length + -(-length // RECORD_BYTES) * RECORD_SIZE
    return need


def build_initial_bundle(*, vm_id: uuid.UUID, generation: int, disk: DiskSource, image_fd: int,
                         start: int, end: int, compress: bool, created_ns: int,
                         buffer: bytearray | None = None) -> InitialWindow:
    """One initial-replication window ``[start, end)`` of a disk: its allocated data as WRITE records.

    The window's HRL stream is laid out in ``buffer`` (a new one if it is too
    small): the image is read straight into place behind each record header,
    and frames that stay uncompressed are slices of the buffer, so the data is
    copied only by the kernel, once in and once out.  Pieces of data that read
    as zeroes are left out like holes: the replica image starts sparse, and
    anything that changes after the initial cut is in the logs shipped after
    the initial copy.
    """
    header = HrlHeader(vm_id, disk.disk_id, generation, 0, disk.size_bytes, created_ns)
    hrl = HrlEncoder(header)
    extents = list(sparse.data_extents(image_fd, start, end - start))
    need = window_buffer_bytes(extents, len(hrl.header_bytes()))
    if buffer is None or len(buffer) < need:
        # headroom, so the next windows (whose record headers differ a little) fit it too:
        # a buffer replaced every window leaves freed heap behind and the process grows
        buffer = bytearray(-(-(need + need // 16) // _BUFFER_ROUND) * _BUFFER_ROUND)
    view = memoryview(buffer)
    pos = len(hrl.header_bytes())
    view[:pos] = hrl.header_bytes()
    allocated = 0
    for offset, length, is_data in extents:
        if not is_data:
            continue
        allocated += length
        for done in range(0, length, RECORD_BYTES):
            n = min(RECORD_BYTES, length - done)
            at = pos + RECORD_SIZE
            n = os.preadv(image_fd, [view[at:at + n]], offset + done)
            if not n:  # the image shrank under us: the rest reads as zeroes
                break
            if buffer.startswith(_ZERO_VIEW[:n], at, at + n):
                continue
            view[pos:at] = hrl.write(offset + done, view[at:at + n])
            pos = at + n
    end_record = hrl.end(created_ns)
    view[pos:pos + len(end_record)] = end_record
    pos += len(end_record)
    writer = _MemoryWriter()
    encoder = FrameEncoder(compress)
    writer.write(encoder.frame_stream(view[:pos]))
    writer.add_disk(disk.disk_id, encoder, hrl, start, end)
    bundle_header = BundleHeader(BundleKind.INITIAL, vm_id, generation, 0, created_ns, tuple(writer.entries))
    return InitialWindow(writer.commit(bundle_header), start, end, allocated, buffer)
