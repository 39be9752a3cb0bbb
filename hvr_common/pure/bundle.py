"""Replication bundles: what travels from agent to listener: the layout and the encoder.

A bundle carries, for each disk of one VM, an HRL log (a coalesced cycle log,
or for initial replication a window of the disk's allocated data) split into
frames that are zstd-compressed unless compression does not shrink them.
Two forms: *counted* (version 1: the header's disk table holds each disk's
frame totals, so it is written last, into a spool file) and *streamed*
(version 2: the table's totals are zero, and each disk's frames end with an
end-of-disk frame, so the bundle can be sent as it is made).
See ``docs/replication-protocol.md`` for the byte layout.  Everything here is
pure: bytes in, bytes out; the shells own files and sockets.

This module holds the layout (constants, :class:`BundleHeader` and its
codec) and :class:`FrameEncoder`; reading a whole bundle, validating as it
goes, is :class:`~hvr_common.pure.bundle_decoder.BundleDecoder`.
"""

from __future__ import annotations

import enum
import struct
import uuid
import zlib
from dataclasses import dataclass

import zstandard

from hvr_common.pure.errors import CorruptError

MAGIC = b"HVR-BDL\n"
VERSION = 1  # counted: the disk table carries the frame totals
VERSION_STREAMED = 2  # streamed: totals zero in the table, an end-of-disk frame after each disk's frames
HEADER = struct.Struct("<8sHHIQ16sQQQI")  # magic, version, kind, disk_count, reserved, vm_id, generation,
#                                          sequence, created_ns, header_crc (over all preceding bytes + entries)
ENTRY = struct.Struct("<16sQQQQII")  # disk_id, stored_bytes, raw_bytes, range_start, range_end, frames, flags
FRAME = struct.Struct("<BxxxII")  # codec, stored_len, raw_len
assert HEADER.size == 68 and ENTRY.size == 56 and FRAME.size == 12

MAX_DISKS = 64
MAX_FRAME_RAW = 4 * 1024 * 1024
FRAME_RAW_BYTES = 1024 * 1024  # what encoders use
SKIP_AFTER_INCOMPRESSIBLE = 3  # frames stored raw without trying, after one that did not shrink
CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_END = 0xFF  # streamed form: the end of a disk's frames (both lengths zero)
END_FRAME = struct.pack("<BxxxII", CODEC_END, 0, 0)


class BundleKind(enum.IntEnum):
    CYCLE = 1
    INITIAL = 2


class BundleCorruptError(CorruptError):
    code = "bundle_corrupt"


class BundleTruncatedError(BundleCorruptError):
    """The data ended before the bundle did: received, the body was cut on the way (sent again)."""

    code = "body_truncated"
    transient = True
    exit_code = 75  # EX_TEMPFAIL


class BundleFormError(BundleCorruptError):
    """A bundle of the other form than the request carries (a counted bundle streamed, or the reverse)."""

    code = "upload_form_mismatch"


def header_size(disk_count: int) -> int:
    return HEADER.size + ENTRY.size * disk_count


@dataclass(frozen=True, slots=True)
class DiskEntry:
    disk_id: uuid.UUID
    stored_bytes: int
    raw_bytes: int
    range_start: int
    range_end: int
    frames: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class BundleHeader:
    kind: BundleKind
    vm_id: uuid.UUID
    generation: int
    sequence: int
    created_ns: int
    disks: tuple[DiskEntry, ...]
    streamed: bool = False  # version 2: no totals in the table, end-of-disk frames

    @property
    def size(self) -> int:
        return header_size(len(self.disks))

    def encode(self) -> bytes:
        entries = b"".join(ENTRY.pack(d.disk_id.bytes, d.stored_bytes, d.raw_bytes, d.range_start, d.range_end,
                                      d.frames, d.flags) for d in self.disks)
        version = VERSION_STREAMED if self.streamed else VERSION
        head = HEADER.pack(MAGIC, version, int(self.kind), len(self.disks), 0, self.vm_id.bytes, self.generation,
                           self.sequence, self.created_ns, 0)
        crc = zlib.crc32(entries, zlib.crc32(head[:-4]))
        return head[:-4] + struct.pack("<I", crc) + entries


def decode_header(buf: bytes) -> BundleHeader:
    if len(buf) < HEADER.size:
        raise BundleCorruptError("bundle is shorter than its header")
    magic, version, kind, count, _res, vm_id, gen, seq, created, crc = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BundleCorruptError("not an hvr bundle (bad magic)")
    if version not in (VERSION, VERSION_STREAMED):
        raise BundleCorruptError(f"bundle version {version} is not supported "
                                 f"(this build reads {VERSION} and {VERSION_STREAMED})")
    if kind not in BundleKind._value2member_map_:
        raise BundleCorruptError(f"unknown bundle kind {kind}")
    if not 1 <= count <= MAX_DISKS:
        raise BundleCorruptError(f"bundle claims {count} disks (1..{MAX_DISKS} allowed)")
    if len(buf) < header_size(count):
        raise BundleCorruptError("bundle is shorter than its disk table")
    entries_raw = bytes(buf[HEADER.size:header_size(count)])
    if zlib.crc32(entries_raw, zlib.crc32(bytes(buf[:HEADER.size - 4]))) != crc:
        raise BundleCorruptError("bundle header checksum mismatch")
    disks = []
    for i in range(count):
        d_id, stored, raw, start, end, frames, flags = ENTRY.unpack_from(entries_raw, i * ENTRY.size)
        if start > end:
            raise BundleCorruptError(f"disk entry {i}: range start {start} is after its end {end}")
        disks.append(DiskEntry(uuid.UUID(bytes=d_id), stored, raw, start, end, frames, flags))
    if len({d.disk_id for d in disks}) != len(disks):
        raise BundleCorruptError("bundle lists a disk twice")
    return BundleHeader(BundleKind(kind), uuid.UUID(bytes=vm_id), gen, seq, created, tuple(disks),
                        version == VERSION_STREAMED)


class FrameEncoder:
    """Turns a disk's HRL byte stream into frames, compressing where it pays."""

    def __init__(self, compress: bool, level: int = 1):
        self.compress = compress
        self._cctx = zstandard.ZstdCompressor(level=level) if compress else None
        self._pending = bytearray()
        self._skip = 0
        self.stored_bytes = 0
        self.raw_bytes = 0
        self.frames = 0
        self.compressed_frames = 0

    def feed(self, data) -> list[bytes]:
        """Accept HRL bytes; return complete frames (header + payload pieces) ready to write.

        Each frame's bytes are copied once, from ``data`` (and what was pending)
        into the frame; nothing is moved around inside a buffer.
        """
        pending = self._pending
        out: list[bytes] = []
        if len(pending) + len(data) < FRAME_RAW_BYTES:
            pending += data
            return out
        view = memoryview(data)
        if pending:
            take = FRAME_RAW_BYTES - len(pending)
            pending += view[:take]
            view = view[take:]
            out += self._frame(bytes(pending))
            pending.clear()
        while len(view) >= FRAME_RAW_BYTES:
            out += self._frame(bytes(view[:FRAME_RAW_BYTES]))
            view = view[FRAME_RAW_BYTES:]
        pending += view
        return out

    def frame_stream(self, view: memoryview) -> list:
        """Frame HRL bytes held in a buffer, in frames of ``FRAME_RAW_BYTES`` (the last may be shorter).

        Frames that stay uncompressed are slices of ``view``, not copies: the
        buffer must not change until the frames have been written out.  Not
        to be mixed with :meth:`feed` (nothing may be pending).
        """
        if self._pending:
            raise ValueError("frame_stream cannot follow bytes fed with feed()")
        out: list = []
        for at in range(0, len(view), FRAME_RAW_BYTES):
            out += self._frame(view[at:at + FRAME_RAW_BYTES])
        return out

    def finish(self) -> list[bytes]:
        out: list[bytes] = []
        if self._pending:
            out += self._frame(bytes(self._pending))
            self._pending.clear()
        return out

    def _frame(self, raw: bytes) -> list[bytes]:
        codec, stored = CODEC_RAW, raw
        if self._cctx is not None and self._skip:
            self._skip -= 1  # recent frames did not shrink: do not spend CPU on this one
        elif self._cctx is not None:
            packed = self._cctx.compress(raw)
            if len(packed) < len(raw):
                codec, stored = CODEC_ZSTD, packed
                self.compressed_frames += 1
            else:
                self._skip = SKIP_AFTER_INCOMPRESSIBLE
        self.frames += 1
        self.raw_bytes += len(raw)
        self.stored_bytes += FRAME.size + len(stored)
        return [FRAME.pack(codec, len(stored), len(raw)), stored]
