"""HRL (hvr replica log) format, version 1: a pure codec.

An HRL file records, in order, the writes, discards and zeroings one virtual
disk received between two cuts.  The byte layout, the checksum chain and the
crash rules are specified in ``docs/hrl-format.md``; this module is the one
implementation of that document.

Two halves, neither of which does I/O:

* :class:`HrlEncoder` turns operations into bytes for the agent's hot path.
  It returns the bytes to append; the caller owns the file.
* :class:`HrlDecoder` turns bytes into events (h11 style): feed it with
  :meth:`HrlDecoder.receive_data`, pull :class:`HrlHeader`, :class:`Record`
  and finally :class:`LogSummary` events out of :meth:`HrlDecoder.next_event`,
  which answers :data:`NEED_DATA` when it needs more bytes, and call
  :meth:`HrlDecoder.finish` at end of file.

A bad file header is corruption (:class:`HrlCorruptError`).  A bad or
incomplete record ends the log: in a log without END record it is the torn
tail a crash leaves behind, as in a write-ahead log; a caller that needs a
complete log asks :meth:`LogSummary.require_clean`.
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
ASSEMBLE_BYTES = 64 * 1024  # WRITE payloads this large are assembled in their own buffer when split
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
_ALLOWED_FLAGS = {
    RecordKind.WRITE: RECORD_FLAG_FUA,
    RecordKind.TRIM: RECORD_FLAG_FUA,
    RecordKind.ZERO: RECORD_FLAG_FUA | RECORD_FLAG_NO_HOLE,
    RecordKind.END: 0,
}
_KINDS = {int(k): k for k in RecordKind}
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


def _header_crc(buf) -> int:
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
        self.crc = _header_crc(self._header_bytes)
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
        if flags & ~_ALLOWED_FLAGS[kind]:
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


class DecoderSignal(enum.Enum):
    NEED_DATA = "need_data"


NEED_DATA = DecoderSignal.NEED_DATA


class DecoderState(enum.StrEnum):
    HEADER = "header"  # waiting for the 128-byte file header
    RECORDS = "records"  # between records
    PAYLOAD = "payload"  # streaming a WRITE payload through the checksum (keep_data=False)
    CLOSED = "closed"  # END record read: the log is complete
    TORN = "torn"  # an invalid or incomplete record ended the log
    FINISHED = "finished"  # finish() was called on a log without END record


_TRANSITIONS: dict[DecoderState, frozenset[DecoderState]] = {
    DecoderState.HEADER: frozenset({DecoderState.RECORDS}),
    DecoderState.RECORDS: frozenset({DecoderState.PAYLOAD, DecoderState.CLOSED,
                                     DecoderState.TORN, DecoderState.FINISHED}),
    DecoderState.PAYLOAD: frozenset({DecoderState.RECORDS, DecoderState.TORN, DecoderState.FINISHED}),
    DecoderState.TORN: frozenset({DecoderState.FINISHED}),
    DecoderState.CLOSED: frozenset(),
    DecoderState.FINISHED: frozenset(),
}


class BorrowingDecoder:
    """What the log and bundle decoders share: parsing fed bytes where they are.

    A subclass keeps the last fed ``bytes``/``memoryview`` while ``_borrowed``
    and implements ``_event`` (the next event) and ``_unborrow`` (copy what is
    left of the fed piece into its own buffer).  :meth:`next_event` lets go of
    the piece whenever the caller may reuse it: NEED_DATA, an event for which
    ``_lets_go`` is true, or an error.
    """

    _borrowed: bool

    def _event(self):
        raise NotImplementedError

    def _unborrow(self) -> None:
        raise NotImplementedError

    def _lets_go(self, ev) -> bool:
        return ev is NEED_DATA

    def next_event(self):
        try:
            ev = self._event()
        except BaseException:
            if self._borrowed:  # a dead decoder keeps nothing of the caller's
                self._unborrow()
            raise
        if self._borrowed and self._lets_go(ev):
            self._unborrow()
        return ev


class HrlDecoder(BorrowingDecoder):
    """Sans-I/O reader of one log: bytes in, events out.

    Events, in order: one :class:`HrlHeader`, zero or more :class:`Record`,
    and, once an END record is read, a :class:`LogSummary` (returned again by
    every later call).  :data:`NEED_DATA` means "feed more bytes, or call
    :meth:`finish` at end of file".  The decoder holds at most one record
    (header and, with ``keep_data``, payload) beyond what the caller fed in its
    last :meth:`receive_data`; with ``keep_data=False`` payloads are checked
    as they stream through and never held.
    """

    def __init__(self, keep_data: bool = True, *, lend_data: bool = False):
        self.keep_data = keep_data
        # lend_data: a WRITE record's data is a memoryview of the decoder's own buffer instead of a
        # copy, valid only until the next call on the decoder (which releases it): for callers
        # that write each record out before asking for the next.
        self.lend_data = lend_data
        self._lent: memoryview | None = None
        # A large WRITE record arriving in pieces is assembled in a buffer of its full size
        # (one copy per byte) instead of growing the main buffer piece by piece.
        self._asm: bytearray | None = None
        self._asm_fill = 0
        self._asm_spare: bytearray | None = None  # the last assembly buffer, reused for a record of its size
        self.state = DecoderState.HEADER
        self.header: HrlHeader | None = None
        # Unconsumed bytes are _buf[_start:].  _buf is the decoder's own bytearray, or, while
        # _borrowed, the bytes or memoryview last fed in: records that lie wholly inside what
        # was fed are parsed (and lent) straight from it; only a piece of a record left over
        # when NEED_DATA is answered is copied into the own buffer (_own).
        self._buf = self._own = bytearray()
        self._borrowed = False
        self._start = 0  # index in _buf of the first unconsumed byte
        self._consumed = 0  # file offset of _buf[_start]
        self._received = 0  # bytes fed so far
        self._crc = 0
        self._record_count = 0
        self._write_bytes = 0
        self._valid_length = 0
        self._reason: str | None = None
        self._summary: LogSummary | None = None
        self._pending: Record | None = None  # record whose payload is streaming (PAYLOAD state)
        self._pending_crc = 0
        self._pending_expected = 0
        self._pending_left = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes held and not yet turned into events."""
        return len(self._buf) - self._start + (self._asm_fill if self._asm is not None else 0)

    def _set_state(self, new: DecoderState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"HRL decoder cannot go from {self.state} to {new}")
        self.state = new

    def receive_data(self, data) -> None:
        """Feed bytes.  ``bytes`` and ``memoryview`` are not copied up front: they must stay
        unchanged until :meth:`next_event` answers NEED_DATA (what is left of them then is
        copied); anything else (a bytearray) is copied now."""
        if self._lent is not None:
            self._lent.release()
            self._lent = None
        if self._borrowed:
            self._unborrow()
        if self._start:
            del self._buf[:self._start]  # O(1) amortised: bytearray moves its start
            self._start = 0
        if self.state in (DecoderState.TORN, DecoderState.FINISHED):
            self._received += len(data)  # counted as torn tail, never parsed
            return
        self._received += len(data)
        borrowable = type(data) in (bytes, memoryview)
        if self._asm is not None:
            n = min(len(self._asm) - self._asm_fill, len(data))
            if n:
                self._asm[self._asm_fill:self._asm_fill + n] = data if n == len(data) else memoryview(data)[:n]
                self._asm_fill += n
            if n == len(data):
                return
            data = memoryview(data)[n:]
        if not self._buf and borrowable:
            self._buf = data
            self._borrowed = True
            return
        self._buf += data

    def _unborrow(self) -> None:
        """Keep what is left of the borrowed bytes (part of one record) in the own buffer."""
        own = self._own
        own.clear()
        own += self._buf[self._start:]
        self._buf = own
        self._start = 0
        self._borrowed = False

    def _consume(self, n: int) -> None:
        self._start += n
        self._consumed += n

    def _stop(self, reason: str) -> DecoderSignal:
        self._reason = reason
        self._pending = None
        self._asm = None
        self._set_state(DecoderState.TORN)
        self._buf = self._own = bytearray()
        self._borrowed = False
        self._start = 0
        return NEED_DATA

    def _summary_now(self, *, clean: bool, closed_ns: int | None) -> LogSummary:
        return LogSummary(
            clean=clean, record_count=self._record_count, write_bytes=self._write_bytes,
            valid_length=self._valid_length, torn_bytes=self._received - self._valid_length,
            closed_ns=closed_ns, final_crc=self._crc, reason=self._reason,
        )

    def next_event(self) -> HrlHeader | Record | LogSummary | DecoderSignal:
        if self._lent is not None:
            self._lent.release()
            self._lent = None
        return super().next_event()

    def _lets_go(self, ev) -> bool:
        return ev is NEED_DATA or type(ev) is LogSummary  # after the END record the caller may feed no more

    def _event(self) -> HrlHeader | Record | LogSummary | DecoderSignal:
        state = self.state
        if state is DecoderState.RECORDS:
            return self._next_record()
        if state is DecoderState.PAYLOAD:
            return self._stream_payload()
        if state is DecoderState.HEADER:
            return self._next_header()
        if state is DecoderState.CLOSED:
            if self._received > self._valid_length:
                raise self._data_after_end()
            return self._summary
        return NEED_DATA  # TORN, FINISHED

    def _next_header(self) -> HrlHeader | DecoderSignal:
        avail = len(self._buf) - self._start
        if avail < HEADER_SIZE:
            seen = bytes(self._buf[self._start:self._start + min(avail, len(MAGIC))])
            if not MAGIC.startswith(seen):
                raise HrlCorruptError(f"not an HRL file (magic {seen!r})", detail={"part": "header"})
            return NEED_DATA
        raw = bytes(self._buf[self._start:self._start + HEADER_SIZE])
        self.header = decode_header(raw)
        self._crc = _header_crc(raw)
        self._consume(HEADER_SIZE)
        self._valid_length = HEADER_SIZE
        self._set_state(DecoderState.RECORDS)
        return self.header

    def _invalid(self, magic: int, kind: int, flags: int, reserved16: int, offset: int, length: int,
                 payload_length: int, reserved32: int) -> str | None:
        """Why a record header is invalid, or None; checked before any payload is awaited."""
        if magic != RECORD_MAGIC:
            return "bad record magic"
        rkind = _KINDS.get(kind)
        if rkind is None:
            return f"unknown record kind {kind:#x}"
        if flags & ~_ALLOWED_FLAGS[rkind]:
            return f"invalid flags {flags:#x} for {rkind.name}"
        if reserved16 or reserved32:
            return "record reserved fields not zero"
        if rkind is RecordKind.END:
            if offset or length or payload_length != END_PAYLOAD.size:
                return "malformed end record"
            return None
        if length == 0:
            return f"zero-length {rkind.name}"
        if offset + length > self.header.disk_size:
            return f"{rkind.name} [{offset}, {offset + length}) beyond disk size {self.header.disk_size}"
        if rkind is RecordKind.WRITE:
            if payload_length != length:
                return "WRITE payload length differs from its length"
            if length > MAX_RECORD_LENGTH:
                return f"WRITE of {length} bytes exceeds {MAX_RECORD_LENGTH}"
        elif payload_length:
            return f"{rkind.name} with a payload"
        return None

    def _next_record(self) -> Record | LogSummary | DecoderSignal:
        assembled = self._asm
        if assembled is not None:
            if self._asm_fill < len(assembled):
                return NEED_DATA
            buf, start = assembled, 0
        else:
            buf, start = self._buf, self._start
        if len(buf) - start < RECORD_SIZE:
            return NEED_DATA
        (magic, kind, flags, reserved16, offset, length, payload_length, crc,
         reserved32) = RECORD.unpack_from(buf, start)
        position = self._consumed
        why = self._invalid(magic, kind, flags, reserved16, offset, length, payload_length, reserved32)
        if why is not None:
            return self._stop(f"{why} at {position}")
        end = start + RECORD_SIZE + payload_length
        if len(buf) < end:
            if self.keep_data and kind == RecordKind.WRITE and payload_length >= ASSEMBLE_BYTES:
                spare, self._asm_spare = self._asm_spare, None
                self._asm = spare if spare is not None and len(spare) == end - start else bytearray(end - start)
                self._asm_fill = len(buf) - start
                with memoryview(buf) as view:
                    self._asm[:self._asm_fill] = view[start:]
                self._start = len(buf)  # handed over to the assembly (consumed once the record is whole)
                return NEED_DATA
            if self.keep_data or kind != RecordKind.WRITE:
                return NEED_DATA
            # keep_data=False: check the payload as it streams through instead of holding it
            with memoryview(buf) as view:
                self._pending_crc = zlib.crc32(view[start:start + RECORD_CRC_OFFSET], self._crc)
            self._pending_expected = crc
            self._pending_left = payload_length
            self._pending = Record(RecordKind.WRITE, flags, offset, length, position,
                                   position + RECORD_SIZE, None)
            self._consume(RECORD_SIZE)
            self._set_state(DecoderState.PAYLOAD)
            return self._stream_payload()
        with memoryview(buf) as view:
            actual = zlib.crc32(view[start + RECORD_SIZE:end],
                                zlib.crc32(view[start:start + RECORD_CRC_OFFSET], self._crc))
            if payload_length and actual == crc and self.keep_data and kind != RecordKind.END:
                if self.lend_data:
                    data = self._lent = view[start + RECORD_SIZE:end]
                else:
                    data = bytes(view[start + RECORD_SIZE:end])
            else:
                data = None
        if actual != crc:
            return self._stop(f"record checksum mismatch at {position}")
        if kind == RecordKind.END:
            return self._end_record(buf, start, end, crc)
        if assembled is not None:
            self._asm = None
            self._asm_spare = assembled  # written to again only after the next call released a lent view
            self._consumed += end - start
        else:
            self._consume(end - start)
        return self._accept(Record(_KINDS[kind], flags, offset, length, position,
                                   position + RECORD_SIZE, data), crc)

    def _accept(self, record: Record, crc: int) -> Record:
        self._crc = crc
        self._record_count += 1
        if record.kind is RecordKind.WRITE:
            self._write_bytes += record.length
        self._valid_length = self._consumed
        return record

    def _stream_payload(self) -> Record | DecoderSignal:
        buf = self._buf
        start = self._start
        take = min(len(buf) - start, self._pending_left)
        if take:
            with memoryview(buf) as view:
                self._pending_crc = zlib.crc32(view[start:start + take], self._pending_crc)
            self._consume(take)
            self._pending_left -= take
        if self._pending_left:
            return NEED_DATA
        record = self._pending
        self._pending = None
        if self._pending_crc != self._pending_expected:
            return self._stop(f"record checksum mismatch at {record.position}")
        self._set_state(DecoderState.RECORDS)
        return self._accept(record, self._pending_crc)

    def _end_record(self, buf, start: int, end: int, crc: int) -> LogSummary:
        position = self._consumed
        record_count, write_bytes, closed_ns = END_PAYLOAD.unpack_from(buf, start + RECORD_SIZE)
        if record_count != self._record_count or write_bytes != self._write_bytes:
            raise HrlCorruptError(
                f"end record at {position} counts {record_count} records / {write_bytes} bytes, "
                f"the log holds {self._record_count} / {self._write_bytes}",
                detail={"part": "end", "valid_length": position})
        self._consume(end - start)
        self._crc = crc
        self._valid_length = self._consumed
        self._set_state(DecoderState.CLOSED)
        self._summary = self._summary_now(clean=True, closed_ns=closed_ns)
        if self._received > self._valid_length:
            raise self._data_after_end()
        return self._summary

    def _data_after_end(self) -> HrlCorruptError:
        return HrlCorruptError(f"data after end record at {self._valid_length}",
                               detail={"part": "end", "valid_length": self._valid_length})

    def finish(self) -> LogSummary:
        """End of file: the summary of the log.  Call after next_event() answered NEED_DATA."""
        if self.state is DecoderState.FINISHED:
            return self._summary
        event = self.next_event()
        if isinstance(event, LogSummary):
            return event
        if event is not NEED_DATA:
            raise RuntimeError("HrlDecoder.finish() with undelivered events; call next_event() until NEED_DATA")
        if self.state is DecoderState.HEADER:
            have = len(self._buf) - self._start
            if have == 0:
                raise HrlCorruptError("empty file, not an HRL file", detail={"part": "header"})
            raise HrlCorruptError(f"truncated HRL header: {have} of {HEADER_SIZE} bytes",
                                  detail={"part": "header"})
        if self.state is not DecoderState.TORN:
            if self._received > self._valid_length:
                self._reason = f"truncated record at {self._valid_length}"
            else:
                self._reason = f"no end record after {self._record_count} records"
        self._pending = None
        self._asm = None
        self._buf = self._own = bytearray()
        self._borrowed = False
        self._start = 0
        self._set_state(DecoderState.FINISHED)
        self._summary = self._summary_now(clean=False, closed_ns=None)
        return self._summary


def decode_bytes(buf: bytes, keep_data: bool = True) -> tuple[HrlHeader, list[Record], LogSummary]:
    """Decode a whole log held in memory."""
    decoder = HrlDecoder(keep_data=keep_data)
    decoder.receive_data(buf)
    records: list[Record] = []
    while True:
        event = decoder.next_event()
        if isinstance(event, Record):
            records.append(event)
        elif isinstance(event, LogSummary):
            return decoder.header, records, event
        elif event is NEED_DATA:
            summary = decoder.finish()
            return decoder.header, records, summary
