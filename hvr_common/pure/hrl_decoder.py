"""HRL log reader, format version 1 (``docs/hrl-format.md``): a sans-I/O decoder.

:class:`HrlDecoder` turns bytes into events (h11 style): feed it with
:meth:`~HrlDecoder.receive_data`, pull ``HrlHeader``, ``Record`` and finally
``LogSummary`` events (:mod:`hvr_common.pure.hrl`) out of
:meth:`~HrlDecoder.next_event`, which answers :data:`NEED_DATA` when it needs
more bytes, and call :meth:`~HrlDecoder.finish` at end of file.  A bad file
header is corruption (``HrlCorruptError``).  A bad or incomplete record ends
the log: in a log without END record it is the torn tail a crash leaves
behind; a caller that needs a complete log asks ``LogSummary.require_clean``.
"""

from __future__ import annotations

import enum
from zlib_ng import zlib_ng as zlib  # the same CRC-32 as the standard zlib, about 3x faster

from hvr_common.pure.hrl import (END_PAYLOAD, HEADER_SIZE, KIND_BY_VALUE, MAGIC, RECORD, RECORD_CRC_OFFSET,
                                 RECORD_SIZE, HrlCorruptError, HrlHeader, LogSummary, Record, RecordKind,
                                 decode_header, header_crc, record_problem)
from hvr_common.pure.stream_decoder import NEED_DATA, BorrowingDecoder, DecoderSignal

ASSEMBLE_BYTES = 64 * 1024  # WRITE payloads this large are assembled in their own buffer when split


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
        self._crc = header_crc(raw)
        self._consume(HEADER_SIZE)
        self._valid_length = HEADER_SIZE
        self._set_state(DecoderState.RECORDS)
        return self.header

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
        why = record_problem(magic, kind, flags, reserved16, offset, length, payload_length, reserved32,
                             self.header.disk_size)
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
        return self._accept(Record(KIND_BY_VALUE[kind], flags, offset, length, position,
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
