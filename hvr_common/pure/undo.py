"""Undo log format, version 1: layout, header, records and the encoder (pure).

An undo log belongs to one recovery point of one VM and holds the pre-images
(contents at the point, holes as holes) of every byte of the VM's disks the
replica overwrote since the point.  The layout, checksum chain, invariants and
crash rules are specified in ``docs/undo-format.md``; this module and
``undo_decoder.py`` (the reader) are its one implementation.
:class:`UndoEncoder` turns pre-images into bytes to append; the caller owns
the file.
"""

from __future__ import annotations

import enum
import struct
import uuid
import zlib
from dataclasses import dataclass

from hvr_common.pure.errors import CorruptError

MAGIC = b"HVR-UND\n"
VERSION = 1

HEADER = struct.Struct("<8sHHI16sQQQQ60sI")
HEADER_SIZE = 128
assert HEADER.size == HEADER_SIZE
HEADER_CRC_OFFSET = 124  # header_crc covers bytes [0, 124)
_HEADER_RESERVED = bytes(60)

RECORD = struct.Struct("<IBBH16sQQII")  # magic, kind, flags, reserved, disk_id, offset, length, payload_length, crc
RECORD_SIZE = 48
assert RECORD.size == RECORD_SIZE
RECORD_MAGIC = 0x52444E55  # bytes b"UNDR"
RECORD_CRC_OFFSET = 44  # a record's crc covers its header bytes [0, 44), then its payload
_RECORD_PREFIX = struct.Struct("<IBBH16sQQI")
assert _RECORD_PREFIX.size == RECORD_CRC_OFFSET

END_PAYLOAD = struct.Struct("<QQQQ")  # record_count, data_bytes, hole_bytes, closed_ns
assert END_PAYLOAD.size == 32
END_RECORD_SIZE = RECORD_SIZE + END_PAYLOAD.size

MAX_DATA_LENGTH = 32 * 1024 * 1024  # largest DATA payload
U64 = 0xFFFFFFFFFFFFFFFF
NO_DISK = bytes(16)


class UndoKind(enum.IntEnum):
    DATA = 1  # the range held the payload at the point
    HOLE = 2  # the range was a hole (unallocated, reads as zeroes) at the point
    END = 0x7F  # the log is closed


KIND_BY_VALUE = {int(k): k for k in UndoKind}


class UndoCorruptError(CorruptError):
    code = "undo_corrupt"


@dataclass(frozen=True, slots=True)
class UndoHeader:
    vm_id: uuid.UUID
    point_id: int  # the recovery point this log belongs to
    sequence: int  # the point is the replica as it stood after cycle `sequence`
    merged_through: int  # newest point merged into this log; == point_id for a log never merged
    created_ns: int


def encode_header(h: UndoHeader) -> bytes:
    for name in ("point_id", "sequence", "merged_through", "created_ns"):
        if not 0 <= getattr(h, name) <= U64:
            raise ValueError(f"undo header {name}={getattr(h, name)} does not fit in u64")
    if h.merged_through < h.point_id:
        raise ValueError(f"undo header merged_through {h.merged_through} before point {h.point_id}")
    body = HEADER.pack(MAGIC, VERSION, HEADER_SIZE, 0, h.vm_id.bytes, h.point_id, h.sequence,
                       h.merged_through, h.created_ns, _HEADER_RESERVED, 0)
    return body[:HEADER_CRC_OFFSET] + zlib.crc32(body[:HEADER_CRC_OFFSET]).to_bytes(4, "little")


def header_error(message: str, **kw) -> UndoCorruptError:
    return UndoCorruptError(message, detail={"part": "header", "offset": 0}, **kw)


def decode_header(buf) -> UndoHeader:
    """Decode the 128-byte file header; raise :class:`UndoCorruptError` saying what is wrong."""
    if len(buf) < HEADER_SIZE:
        raise header_error(f"truncated undo log header: {len(buf)} of {HEADER_SIZE} bytes")
    (magic, version, header_size, flags, vm_id, point_id, sequence, merged_through, created_ns,
     reserved, crc) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise header_error(f"not an undo log (magic {bytes(magic)!r})")
    if version != VERSION:  # a later version may checksum its header differently: checked first
        raise header_error(f"unsupported undo log version {version} (this build reads version {VERSION})",
                            hint="upgrade hvr on this host to read undo logs written by a newer listener")
    actual = zlib.crc32(bytes(buf[:HEADER_CRC_OFFSET]))
    if actual != crc:
        raise header_error(f"undo log header checksum mismatch (stored {crc:#010x}, computed {actual:#010x})")
    if header_size != HEADER_SIZE:
        raise header_error(f"undo log header_size is {header_size}, version 1 requires {HEADER_SIZE}")
    if flags:
        raise header_error(f"undo log header has unsupported flags {flags:#x}")
    if reserved != _HEADER_RESERVED:
        raise header_error("undo log header reserved bytes are not zero")
    if merged_through < point_id:
        raise header_error(f"undo log header merged_through {merged_through} before point {point_id}")
    return UndoHeader(uuid.UUID(bytes=vm_id), point_id, sequence, merged_through, created_ns)


@dataclass(frozen=True, slots=True)
class UndoRecord:
    kind: UndoKind  # DATA or HOLE
    disk_id: uuid.UUID
    offset: int
    length: int
    position: int = 0  # file offset of the record header
    data_position: int = 0  # file offset of the payload (DATA)
    data: bytes | None = None  # DATA payload when decoded with keep_data, else None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class UndoSummary:
    clean: bool  # a valid END record was read and its counts match
    record_count: int  # DATA and HOLE records in the valid part
    data_bytes: int  # sum of the DATA lengths
    hole_bytes: int  # sum of the HOLE lengths
    valid_length: int  # bytes from the start of the file to the end of the last valid record or END
    torn_bytes: int  # bytes after valid_length
    closed_ns: int | None  # from the END record
    final_crc: int  # checksum chain after the last valid record (the END record's crc if clean)
    reason: str | None  # why reading stopped before an END record

    def require_clean(self, what: str) -> None:
        if not self.clean:
            raise UndoCorruptError(
                f"{what} is not cleanly closed: {self.reason}",
                hint="only the newest recovery point's undo log may lack its END record",
                detail={"part": "records", "offset": self.valid_length, "torn_bytes": self.torn_bytes})


class UndoEncoder:
    """Produces the bytes of one undo log.

    The caller appends :meth:`header_bytes` once (unless resuming), then each
    record returned; after :meth:`data` it appends the data itself.  ``crc``
    is the chain so far, ``position`` the file offset of the next record.
    Arguments out of bounds raise ``ValueError`` (programming errors).
    """

    def __init__(self, header: UndoHeader, resume: UndoSummary | None = None):
        self.header = header
        self._header_bytes = encode_header(header)
        self._closed = False
        if resume is None:
            self.crc = int.from_bytes(self._header_bytes[HEADER_CRC_OFFSET:], "little")
            self.record_count = self.data_bytes = self.hole_bytes = 0
            self.position = HEADER_SIZE
        else:  # an open log found after a restart, cut at resume.valid_length by the caller
            if resume.clean:
                raise ValueError("a closed undo log takes no more records")
            self.crc, self.position = resume.final_crc, resume.valid_length
            self.record_count, self.data_bytes, self.hole_bytes = (
                resume.record_count, resume.data_bytes, resume.hole_bytes)

    def header_bytes(self) -> bytes:
        return self._header_bytes

    def checkpoint(self) -> tuple:
        """The encoder's state, to :meth:`rollback` to when the bytes produced since were not written."""
        return (self.crc, self.position, self.record_count, self.data_bytes, self.hole_bytes, self._closed)

    def rollback(self, checkpoint: tuple) -> None:
        (self.crc, self.position, self.record_count, self.data_bytes, self.hole_bytes,
         self._closed) = checkpoint

    def _record(self, kind: UndoKind, disk: bytes, offset: int, length: int, payload) -> bytes:
        if self._closed:
            raise ValueError("undo log already has its END record")
        if kind is not UndoKind.END:
            limit = MAX_DATA_LENGTH if kind is UndoKind.DATA else U64
            if not 0 < length <= limit:
                raise ValueError(f"undo {kind.name} length {length} not in 1..{limit}")
            if offset < 0 or offset + length > U64:
                raise ValueError(f"undo {kind.name} offset {offset} out of range")
        plen = len(payload) if payload is not None else 0
        prefix = _RECORD_PREFIX.pack(RECORD_MAGIC, kind, 0, 0, disk, offset, length, plen)
        crc = zlib.crc32(prefix, self.crc)
        if payload is not None:
            crc = zlib.crc32(payload, crc)
        self.crc = crc
        self.position += RECORD_SIZE + plen
        return prefix + crc.to_bytes(4, "little")

    def data(self, disk_id: uuid.UUID, offset: int, data) -> bytes:
        """Record header of a DATA pre-image; append it, then ``data``."""
        data = memoryview(data).cast("B")
        if self.data_bytes + len(data) > U64:
            raise ValueError("undo log data bytes would exceed u64")
        out = self._record(UndoKind.DATA, disk_id.bytes, offset, len(data), data)
        self.record_count += 1
        self.data_bytes += len(data)
        return out

    def hole(self, disk_id: uuid.UUID, offset: int, length: int) -> bytes:
        if self.hole_bytes + length > U64:
            raise ValueError("undo log hole bytes would exceed u64")
        out = self._record(UndoKind.HOLE, disk_id.bytes, offset, length, None)
        self.record_count += 1
        self.hole_bytes += length
        return out

    def end(self, closed_ns: int) -> bytes:
        """The END record with its payload (80 bytes); after it the encoder takes nothing more."""
        payload = END_PAYLOAD.pack(self.record_count, self.data_bytes, self.hole_bytes, closed_ns)
        out = self._record(UndoKind.END, NO_DISK, 0, 0, payload)
        self._closed = True
        return out + payload


FILE_SUFFIX = ".undo"
MERGING_SUFFIX = ".undo.merging"  # a merged log being written; never read, deleted at start


def file_name(point_id: int, suffix: str = FILE_SUFFIX) -> str:
    """``<point id, 20 decimal digits><suffix>``: names sort as the points do (u64 has 20 digits)."""
    if not 0 <= point_id <= U64:
        raise ValueError(f"point id {point_id} does not fit in u64")
    return f"{point_id:020d}{suffix}"
