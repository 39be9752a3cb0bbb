"""HRL (hvr replica log) format, version 1: the layout and the encoder.

An HRL file records, in order, the writes, discards and zeroings one virtual
disk received between two cuts.  The byte layout, the checksum chain and the
crash rules are specified in ``docs/hrl-format.md``; this module and
:mod:`hvr_common.pure.hrl_decoder` are the one implementation of that document.

This module holds the layout (constants, :class:`RecordKind`, the file header
and its codec), the events a reader produces (:class:`Record`,
:class:`LogSummary`), and :class:`HrlEncoder`, which turns operations into
bytes for the agent's hot path: it returns the bytes to append; the caller
owns the file.  Reading is :class:`~hvr_common.pure.hrl_decoder.HrlDecoder`.
Neither does I/O.
"""

from __future__ import annotations

import enum
import struct
import uuid
from zlib_ng import zlib_ng as zlib  # the same CRC-32 as the standard zlib, about 3x faster
from dataclasses import dataclass

from hvr_common.pure.errors import CorruptError

MAGIC = b"HVR-HRL\n"
VERSION = 1

HEADER = struct.Struct("<8sHHI16s16sQQQQ44sI")
HEADER_SIZE = 128
assert HEADER.size == HEADER_SIZE
HEADER_CRC_OFFSET = 124  # header_crc covers bytes [0, 124)
HEADER_FLAGS_KNOWN = 0  # version 1 defines no header flags
_HEADER_RESERVED = bytes(44)

RECORD = struct.Struct("<IBBHQIIII")
RECORD_SIZE = 32
assert RECORD.size == RECORD_SIZE
RECORD_MAGIC = 0x52524C48  # b"HLRR" little-endian
RECORD_CRC_OFFSET = 24  # a record's crc covers its header bytes [0, 24), then its payload
_RECORD_PREFIX = struct.Struct("<IBBHQII")  # the 24 bytes the crc covers
_RECORD_SUFFIX = struct.Struct("<II")  # crc, reserved
assert _RECORD_PREFIX.size == RECORD_CRC_OFFSET
assert _RECORD_PREFIX.size + _RECORD_SUFFIX.size == RECORD_SIZE

END_PAYLOAD = struct.Struct("<QQQ")  # record_count, write_bytes, closed_ns
assert END_PAYLOAD.size == 24
END_RECORD_SIZE = RECORD_SIZE + END_PAYLOAD.size

MAX_RECORD_LENGTH = 32 * 1024 * 1024  # largest WRITE payload
MAX_TRIM_LENGTH = 0xFFFFFFFF  # the u32 length field

RECORD_FLAG_FUA = 0x01
RECORD_FLAG_NO_HOLE = 0x02

_U64 = 0xFFFFFFFFFFFFFFFF


class RecordKind(enum.IntEnum):
    WRITE = 1
    TRIM = 2
    ZERO = 3
    END = 0x7F


# Which flag bits each kind may carry; any other bit makes a record invalid.
ALLOWED_FLAGS = {
    RecordKind.WRITE: RECORD_FLAG_FUA,
    RecordKind.TRIM: RECORD_FLAG_FUA,
    RecordKind.ZERO: RECORD_FLAG_FUA | RECORD_FLAG_NO_HOLE,
    RecordKind.END: 0,
}
KIND_BY_VALUE = {int(k): k for k in RecordKind}
_KIND_WRITE = int(RecordKind.WRITE)
_pack_record_prefix = _RECORD_PREFIX.pack_into
_pack_record_suffix = _RECORD_SUFFIX.pack_into
_fast_crc32 = zlib.crc32  # the one CRC-32 of the format; bound once for the hot path


class HrlCorruptError(CorruptError):
    code = "hrl_corrupt"


@dataclass(frozen=True, slots=True)
class HrlHeader:
    vm_id: uuid.UUID
    disk_id: uuid.UUID
    generation: int
    sequence: int
    disk_size: int
    created_ns: int


def encode_header(h: HrlHeader) -> bytes:
    for name in ("generation", "sequence", "disk_size", "created_ns"):
        value = getattr(h, name)
        if not 0 <= value <= _U64:
            raise ValueError(f"HRL header {name}={value} does not fit in u64")
    body = HEADER.pack(
        MAGIC, VERSION, HEADER_SIZE, 0,
        h.vm_id.bytes, h.disk_id.bytes,
        h.generation, h.sequence, h.disk_size, h.created_ns,
        _HEADER_RESERVED, 0,
    )
    crc = zlib.crc32(memoryview(body)[:HEADER_CRC_OFFSET])
    return body[:HEADER_CRC_OFFSET] + crc.to_bytes(4, "little")


def header_crc(buf) -> int:
    return int.from_bytes(buf[HEADER_CRC_OFFSET:HEADER_SIZE], "little")


def decode_header(buf) -> HrlHeader:
    """Decode the 128-byte file header; raise :class:`HrlCorruptError` saying what is wrong."""
    if len(buf) < HEADER_SIZE:
        raise HrlCorruptError(f"truncated HRL header: {len(buf)} of {HEADER_SIZE} bytes",
                              detail={"part": "header"})
    (magic, version, header_size, flags, vm_id, disk_id, generation, sequence,
     disk_size, created_ns, reserved, crc) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise HrlCorruptError(f"not an HRL file (magic {magic!r})", detail={"part": "header"})
    if version != VERSION:
        raise HrlCorruptError(
            f"unsupported HRL version {version} (this build reads version {VERSION})",
            hint="upgrade hvr on this host to read logs written by a newer agent",
            detail={"part": "header", "version": version},
        )
    actual = zlib.crc32(memoryview(buf)[:HEADER_CRC_OFFSET])
    if actual != crc:
        raise HrlCorruptError(f"HRL header checksum mismatch (stored {crc:#010x}, computed {actual:#010x})",
                              detail={"part": "header"})
    if header_size != HEADER_SIZE:
        raise HrlCorruptError(f"HRL header_size is {header_size}, version 1 requires {HEADER_SIZE}",
                              detail={"part": "header"})
    if flags & ~HEADER_FLAGS_KNOWN:
        raise HrlCorruptError(f"HRL header has unsupported flags {flags:#x}", detail={"part": "header"})
    if reserved != _HEADER_RESERVED:
        raise HrlCorruptError("HRL header reserved bytes are not zero", detail={"part": "header"})
    return HrlHeader(
        vm_id=uuid.UUID(bytes=vm_id), disk_id=uuid.UUID(bytes=disk_id),
        generation=generation, sequence=sequence, disk_size=disk_size, created_ns=created_ns,
    )


def record_problem(magic: int, kind: int, flags: int, reserved16: int, offset: int, length: int,
                   payload_length: int, reserved32: int, disk_size: int) -> str | None:
    """Why a record header is invalid, or None; checked before any payload is awaited."""
    if magic != RECORD_MAGIC:
        return "bad record magic"
    rkind = KIND_BY_VALUE.get(kind)
    if rkind is None:
        return f"unknown record kind {kind:#x}"
    if flags & ~ALLOWED_FLAGS[rkind]:
        return f"invalid flags {flags:#x} for {rkind.name}"
    if reserved16 or reserved32:
        return "record reserved fields not zero"
    if rkind is RecordKind.END:
        if offset or length or payload_length != END_PAYLOAD.size:
            return "malformed end record"
        return None
    if length == 0:
        return f"zero-length {rkind.name}"
    if offset + length > disk_size:
        return f"{rkind.name} [{offset}, {offset + length}) beyond disk size {disk_size}"
    if rkind is RecordKind.WRITE:
        if payload_length != length:
            return "WRITE payload length differs from its length"
        if length > MAX_RECORD_LENGTH:
            return f"WRITE of {length} bytes exceeds {MAX_RECORD_LENGTH}"
    elif payload_length:
        return f"{rkind.name} with a payload"
    return None


class HrlEncoder:
    """Produces the bytes of one log.  Hot path: one allocation per call, the returned bytes.

    The caller appends :meth:`header_bytes` once, then for each operation the
    record header returned (followed, for :meth:`write`, by the data itself).
    ``crc`` is the checksum chain so far, ``position`` the file offset where the
    next record starts.  Arguments out of bounds raise ``ValueError``: they are
    programming errors of the caller, not bad data.
    """

    __slots__ = ("header", "crc", "record_count", "write_bytes", "position",
                 "_disk_size", "_header_bytes", "_buf", "_prefix", "_closed")

    def __init__(self, header: HrlHeader):
        self.header = header
        self._header_bytes = encode_header(header)
        self._disk_size = header.disk_size
        self.crc = header_crc(self._header_bytes)
        self.record_count = 0
        self.write_bytes = 0
        self.position = HEADER_SIZE
        self._buf = bytearray(RECORD_SIZE)
        self._prefix = memoryview(self._buf)[:RECORD_CRC_OFFSET]
        self._closed = False

    def header_bytes(self) -> bytes:
        return self._header_bytes

    def snapshot(self) -> tuple:
        """The chain state, to undo records that could not be written (see :meth:`restore`)."""
        return (self.crc, self.record_count, self.write_bytes, self.position, self._closed)

    def restore(self, state: tuple) -> None:
        self.crc, self.record_count, self.write_bytes, self.position, self._closed = state

    def _record(self, kind: int, flags: int, offset: int, length: int, payload_length: int,
                payload) -> bytes:
        if self._closed:
            raise ValueError("HRL log already has its END record")
        _RECORD_PREFIX.pack_into(self._buf, 0, RECORD_MAGIC, kind, flags, 0, offset, length, payload_length)
        crc = _fast_crc32(self._prefix, self.crc)
        if payload is not None:
            crc = _fast_crc32(payload, crc)
        _RECORD_SUFFIX.pack_into(self._buf, RECORD_CRC_OFFSET, crc, 0)
        self.crc = crc
        self.position += RECORD_SIZE + payload_length
        return bytes(self._buf)

    def _check(self, kind: RecordKind, offset: int, length: int, flags: int, limit: int) -> None:
        if length <= 0 or length > limit:
            raise ValueError(f"HRL {kind.name} length {length} not in 1..{limit}")
        if offset < 0 or offset + length > self._disk_size:
            raise ValueError(
                f"HRL {kind.name} [{offset}, {offset + length}) outside disk of {self._disk_size} bytes")
        if flags & ~ALLOWED_FLAGS[kind]:
            raise ValueError(f"HRL {kind.name} does not take flags {flags:#x}")

    def write(self, offset: int, data, flags: int = 0) -> bytes:
        """Record header of a WRITE of ``data`` at ``offset``; append it, then ``data``.

        The hot path of every guest write: :meth:`_check` and :meth:`_record` inlined.
        """
        length = data.nbytes if type(data) is memoryview else len(data)
        if (not 0 < length <= MAX_RECORD_LENGTH or offset < 0 or offset + length > self._disk_size
                or flags & ~RECORD_FLAG_FUA or self._closed):
            self._check(RecordKind.WRITE, offset, length, flags, MAX_RECORD_LENGTH)
            raise ValueError("HRL log already has its END record")
        buf = self._buf
        _pack_record_prefix(buf, 0, RECORD_MAGIC, _KIND_WRITE, flags, 0, offset, length, length)
        crc = _fast_crc32(data, _fast_crc32(self._prefix, self.crc))
        _pack_record_suffix(buf, RECORD_CRC_OFFSET, crc, 0)
        self.crc = crc
        self.position += RECORD_SIZE + length
        self.record_count += 1
        self.write_bytes += length
        return bytes(buf)

    def trim(self, offset: int, length: int, flags: int = 0) -> bytes:
        self._check(RecordKind.TRIM, offset, length, flags, MAX_TRIM_LENGTH)
        out = self._record(RecordKind.TRIM, flags, offset, length, 0, None)
        self.record_count += 1
        return out

    def zero(self, offset: int, length: int, flags: int = 0) -> bytes:
        self._check(RecordKind.ZERO, offset, length, flags, MAX_TRIM_LENGTH)
        out = self._record(RecordKind.ZERO, flags, offset, length, 0, None)
        self.record_count += 1
        return out

    def end(self, closed_ns: int) -> bytes:
        """The END record (header and payload, 56 bytes); after it the encoder takes nothing more."""
        payload = END_PAYLOAD.pack(self.record_count, self.write_bytes, closed_ns)
        out = self._record(RecordKind.END, 0, 0, 0, END_PAYLOAD.size, payload)
        self._closed = True
        return out + payload


@dataclass(slots=True)
class Record:
    kind: RecordKind
    flags: int
    offset: int
    length: int
    position: int  # file offset of the record header
    data_position: int  # file offset of the payload
    data: bytes | memoryview | None  # WRITE payload when decoded with keep_data (lent: a view), else None


@dataclass(frozen=True, slots=True)
class LogSummary:
    clean: bool  # an END record was read, valid, and its counts match
    record_count: int  # WRITE/TRIM/ZERO records in the valid part
    write_bytes: int  # WRITE payload bytes in the valid part
    valid_length: int  # bytes from the start of the file to the end of the last valid record or END
    torn_bytes: int  # bytes after valid_length
    closed_ns: int | None  # from the END record
    final_crc: int  # checksum chain after the last valid record (the END record's crc if clean)
    reason: str | None  # why decoding stopped, when it stopped before an END record

    def require_clean(self, what: str) -> None:
        if not self.clean:
            raise HrlCorruptError(
                f"{what} is not cleanly closed: {self.reason}",
                hint="a log is shipped only after its END record is durable; "
                     "a log without one is still active or was torn by a crash",
                detail={"part": "records", "valid_length": self.valid_length, "torn_bytes": self.torn_bytes,
                        "record_count": self.record_count},
            )
