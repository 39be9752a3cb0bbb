"""Undo log reader, format version 1: a sans-I/O decoder (``docs/undo-format.md``, "Reading").

Bytes in, events out, as the HRL decoder: feed :meth:`UndoDecoder.receive_data`,
pull :class:`UndoHeader`, :class:`UndoRecord` and finally :class:`UndoSummary`
out of :meth:`UndoDecoder.next_event` until it answers :data:`NEED_DATA`, and
call :meth:`UndoDecoder.finish` at end of file.  Memory is bounded by one
record.  A record that fails its checksum ends the log (a torn tail) unless
a valid END record chains on from its stored checksum: then the log was
closed, everything before its END was durable, and the bad record is
corruption (:class:`UndoCorruptError` with its offset).
"""

from __future__ import annotations

import enum
import uuid
import zlib

from hvr_common.pure.stream_decoder import NEED_DATA, DecoderSignal  # the one "need more data" sentinel of the codecs
from hvr_common.pure.undo import (
    END_PAYLOAD,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    KIND_BY_VALUE,
    MAGIC,
    MAX_DATA_LENGTH,
    NO_DISK,
    RECORD,
    RECORD_CRC_OFFSET,
    RECORD_MAGIC,
    RECORD_SIZE,
    U64,
    UndoCorruptError,
    UndoHeader,
    UndoKind,
    UndoRecord,
    UndoSummary,
    decode_header,
    header_error,
)

__all__ = ["NEED_DATA", "DecoderSignal", "DecoderState", "UndoDecoder", "decode_bytes"]


class DecoderState(enum.StrEnum):
    HEADER = "header"  # waiting for the file header
    RECORDS = "records"  # between records
    SUSPECT = "suspect"  # a record failed its checksum: torn tail, unless a valid END follows
    CLOSED = "closed"  # END record read: the log is complete
    TORN = "torn"  # the log ended at an invalid or incomplete record
    FINISHED = "finished"  # finish() was called on a log without END record


_TRANSITIONS: dict[DecoderState, frozenset[DecoderState]] = {
    DecoderState.HEADER: frozenset({DecoderState.RECORDS}),
    DecoderState.RECORDS: frozenset({DecoderState.SUSPECT, DecoderState.CLOSED, DecoderState.TORN,
                                     DecoderState.FINISHED}),
    DecoderState.SUSPECT: frozenset({DecoderState.TORN, DecoderState.FINISHED}),
    DecoderState.TORN: frozenset({DecoderState.FINISHED}),
    DecoderState.CLOSED: frozenset(),
    DecoderState.FINISHED: frozenset(),
}


class UndoDecoder:
    """Sans-I/O reader of one undo log: bytes in, events out; memory bounded by one record."""

    def __init__(self, keep_data: bool = True):
        self.keep_data = keep_data
        self.state = DecoderState.HEADER
        self.header: UndoHeader | None = None
        self._buf = bytearray()
        self._consumed = 0  # file offset of _buf[0]
        self._received = 0
        self._crc = 0  # the chain after the last valid record
        self._scan_crc = 0  # SUSPECT: the chain through the stored crc of the records after the bad one
        self._counts = [0, 0, 0]  # records, data bytes, hole bytes
        self._valid_length = 0
        self._reason: str | None = None
        self._suspect: tuple[int, str] | None = None  # (offset, reason) of the first bad record
        self._summary: UndoSummary | None = None

    def _set_state(self, new: DecoderState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"undo decoder cannot go from {self.state} to {new}")
        self.state = new

    def receive_data(self, data) -> None:
        self._received += len(data)
        if self.state not in (DecoderState.TORN, DecoderState.FINISHED):  # else counted as torn tail
            self._buf += data

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._consumed += n

    def _stop(self, reason: str) -> DecoderSignal:
        self._reason = self._suspect[1] if self._suspect else reason
        self._buf = bytearray()
        self._set_state(DecoderState.TORN)
        return NEED_DATA

    def _summary_now(self, clean: bool, closed_ns: int | None) -> UndoSummary:
        records, data_bytes, hole_bytes = self._counts
        return UndoSummary(clean, records, data_bytes, hole_bytes, self._valid_length,
                           self._received - self._valid_length, closed_ns, self._crc, self._reason)

    def next_event(self) -> UndoHeader | UndoRecord | UndoSummary | DecoderSignal:
        state = self.state
        if state is DecoderState.HEADER:
            return self._next_header()
        if state in (DecoderState.RECORDS, DecoderState.SUSPECT):
            return self._next_record()
        if state is DecoderState.CLOSED:
            if self._received > self._valid_length:
                raise self._data_after_end()
            return self._summary
        return NEED_DATA

    def _next_header(self) -> UndoHeader | DecoderSignal:
        if len(self._buf) < HEADER_SIZE:
            seen = bytes(self._buf[:len(MAGIC)])
            if not MAGIC.startswith(seen):
                raise header_error(f"not an undo log (magic {seen!r})")
            return NEED_DATA
        self.header = decode_header(self._buf)
        self._crc = int.from_bytes(self._buf[HEADER_CRC_OFFSET:HEADER_SIZE], "little")
        self._consume(HEADER_SIZE)
        self._valid_length = HEADER_SIZE
        self._set_state(DecoderState.RECORDS)
        return self.header

    @staticmethod
    def _invalid(magic, kind, flags, reserved, disk, offset, length, payload_length) -> str | None:
        """Why a record header is invalid, or None; checked before its payload is awaited."""
        if magic != RECORD_MAGIC:
            return "bad record magic"
        rkind = KIND_BY_VALUE.get(kind)
        if rkind is None:
            return f"unknown record kind {kind:#x}"
        if flags or reserved:
            return "record flags or reserved field not zero"
        if rkind is UndoKind.END:
            if disk != NO_DISK or offset or length or payload_length != END_PAYLOAD.size:
                return "malformed end record"
        elif length == 0:
            return f"zero-length {rkind.name}"
        elif offset + length > U64:
            return f"{rkind.name} beyond the u64 range"
        elif rkind is UndoKind.DATA and payload_length != length:
            return "DATA payload length differs from its length"
        elif rkind is UndoKind.DATA and length > MAX_DATA_LENGTH:
            return f"DATA of {length} bytes exceeds {MAX_DATA_LENGTH}"
        elif rkind is UndoKind.HOLE and payload_length:
            return "HOLE with a payload"
        return None

    def _next_record(self) -> UndoRecord | UndoSummary | DecoderSignal:
        while True:
            buf = self._buf
            if len(buf) < RECORD_SIZE:
                return NEED_DATA
            fields = RECORD.unpack_from(buf, 0)
            magic, kind, flags, reserved, disk, offset, length, payload_length, crc = fields
            position = self._consumed
            why = self._invalid(*fields[:8])
            if why is not None:
                return self._stop(f"{why} at {position}")
            end = RECORD_SIZE + payload_length
            if len(buf) < end:
                return NEED_DATA
            with memoryview(buf) as view:
                chain = self._scan_crc if self.state is DecoderState.SUSPECT else self._crc
                actual = zlib.crc32(view[RECORD_SIZE:end], zlib.crc32(view[:RECORD_CRC_OFFSET], chain))
                data = bytes(view[RECORD_SIZE:end]) if kind == UndoKind.DATA and self.keep_data else None
                end_payload = END_PAYLOAD.unpack_from(view, RECORD_SIZE) if kind == UndoKind.END else None
            if self.state is DecoderState.SUSPECT:
                if actual != crc:
                    return self._stop("")
                if end_payload is not None:  # the log was closed: its bad record is no torn tail
                    at, reason = self._suspect
                    raise UndoCorruptError(f"{reason} in a closed undo log",
                                           detail={"part": "records", "offset": at})
                self._scan_crc = crc
                self._consume(end)
                continue
            if actual != crc:  # torn tail, or corruption if a valid END chains on from the stored crc
                self._suspect = (position, f"record checksum mismatch at {position}")
                self._set_state(DecoderState.SUSPECT)
                self._scan_crc = crc  # the chain as the writer had it, to find a valid END after it
                self._consume(end)
                continue
            self._consume(end)
            self._crc = crc
            self._valid_length = self._consumed
            if end_payload is not None:
                return self._end_record(position, end_payload)
            self._counts[0] += 1
            self._counts[1 if kind == UndoKind.DATA else 2] += length
            return UndoRecord(KIND_BY_VALUE[kind], uuid.UUID(bytes=disk), offset, length, position,
                              position + RECORD_SIZE, data)

    def _end_record(self, position: int, end_payload: tuple) -> UndoSummary:
        record_count, data_bytes, hole_bytes, closed_ns = end_payload
        if [record_count, data_bytes, hole_bytes] != self._counts:
            raise UndoCorruptError(
                f"end record at {position} counts {record_count} records / {data_bytes} data bytes / "
                f"{hole_bytes} hole bytes, the log holds {'/'.join(map(str, self._counts))}",
                detail={"part": "end", "offset": position})
        self._set_state(DecoderState.CLOSED)
        self._summary = self._summary_now(True, closed_ns)
        if self._received > self._valid_length:
            raise self._data_after_end()
        return self._summary

    def _data_after_end(self) -> UndoCorruptError:
        return UndoCorruptError(f"data after end record at {self._valid_length}",
                                detail={"part": "end", "offset": self._valid_length})

    def finish(self) -> UndoSummary:
        """End of file: the summary of the log.  Call after next_event() answered NEED_DATA."""
        if self.state is DecoderState.FINISHED:
            return self._summary
        event = self.next_event()
        if isinstance(event, UndoSummary):
            return event
        if event is not NEED_DATA:
            raise RuntimeError("UndoDecoder.finish() with undelivered events; call next_event() until NEED_DATA")
        if self.state is DecoderState.HEADER:
            if not self._buf:
                raise header_error("empty file, not an undo log")
            raise header_error(f"truncated undo log header: {len(self._buf)} of {HEADER_SIZE} bytes")
        if self.state is DecoderState.SUSPECT:
            self._reason = self._suspect[1]
        elif self.state is DecoderState.RECORDS:
            self._reason = (f"truncated record at {self._valid_length}" if self._received > self._valid_length
                            else f"no end record after {self._counts[0]} records")
        self._buf = bytearray()
        self._set_state(DecoderState.FINISHED)
        self._summary = self._summary_now(False, None)
        return self._summary


def decode_bytes(buf, keep_data: bool = True) -> tuple[UndoHeader, list[UndoRecord], UndoSummary]:
    """Decode a whole undo log held in memory."""
    decoder = UndoDecoder(keep_data=keep_data)
    decoder.receive_data(buf)
    records: list[UndoRecord] = []
    while True:
        event = decoder.next_event()
        if isinstance(event, UndoRecord):
            records.append(event)
        elif isinstance(event, UndoSummary):
            return decoder.header, records, event
        elif event is NEED_DATA:
            return decoder.header, records, decoder.finish()
