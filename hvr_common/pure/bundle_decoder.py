"""Reading replication bundles (both forms, ``docs/replication-protocol.md``): a validating sans-I/O decoder.

:class:`BundleDecoder` validates as it goes: header checksum, frame bounds,
zstd frames, and each disk's HRL stream (per-record checksums, identity, a
clean END record); any violation raises ``BundleCorruptError``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import zstandard

from hvr_common.pure.bundle import (CODEC_END, CODEC_RAW, CODEC_ZSTD, FRAME, HEADER, MAX_DISKS, MAX_FRAME_RAW,
                                    BundleCorruptError, BundleFormError, BundleHeader, BundleKind,
                                    BundleTruncatedError, DiskEntry, decode_header, header_size)
from hvr_common.pure.hrl import HrlCorruptError, HrlHeader, LogSummary, Record
from hvr_common.pure.hrl_decoder import HrlDecoder
from hvr_common.pure.stream_decoder import NEED_DATA, BorrowingDecoder


@dataclass(frozen=True, slots=True)
class DiskDone:
    index: int
    entry: DiskEntry
    summary: LogSummary


@dataclass(frozen=True, slots=True)
class BundleDone:
    header: BundleHeader
    total_bytes: int


class _Phase(enum.Enum):
    HEADER = 1
    FRAMES = 2
    DONE = 3


class BundleDecoder(BorrowingDecoder):
    """Streams a bundle: feed bytes, take events (BundleHeader, (disk index, Record), DiskDone, BundleDone).

    ``expect`` checks identity: a mapping with any of ``vm_id``, ``generation``,
    ``sequence``, ``kind``, ``disks`` (dict disk_id -> disk size), and
    ``streamed`` (the form the request carries: True streamed, False counted).
    """

    def __init__(self, *, keep_data: bool = True, lend_data: bool = False, max_bytes: int | None = None,
                 expect: dict | None = None):
        self.keep_data = keep_data
        self.lend_data = lend_data  # see HrlDecoder: record data valid only until the next call
        self.max_bytes = max_bytes
        self.expect = expect or {}
        # Received bytes live in _buf[_pos:_end].  _buf is the chunk last fed in while
        # _borrowed (parsed in place: raw frames go to the log decoder as views of it), or
        # the own buffer _own, which holds only what was left of a chunk when NEED_DATA was
        # answered (a frame header, a zstd frame); it keeps its size and is reused.
        self._buf = self._own = bytearray()
        self._borrowed = False
        self._pos = 0
        self._end = 0
        self._raw_left = 0  # bytes of the current raw frame not yet passed to the log decoder
        self._phase = _Phase.HEADER
        self.header: BundleHeader | None = None
        self._disk = -1
        self._hrl: HrlDecoder | None = None
        self._stored_left = 0  # counted form: bytes of the disk's frames still to come; streamed: -1 until its end
        self._frames_seen = 0
        self._raw_seen = 0
        self._dctx = zstandard.ZstdDecompressor()
        self.total = 0

    def receive_data(self, data) -> None:
        self.total += len(data)
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise BundleCorruptError(f"bundle is larger than the {self.max_bytes} bytes it may have")
        if self._phase is _Phase.DONE and data:
            raise BundleCorruptError("data after the end of the bundle")
        if self._borrowed:
            self._unborrow()
        n = len(data)
        if self._pos == self._end and type(data) in (bytes, memoryview):
            # Nothing left over: parse the chunk where it is (it must stay unchanged until
            # next_event answers NEED_DATA).
            self._buf = data
            self._borrowed = True
            self._pos, self._end = 0, n
            return
        if self._end + n > len(self._buf):
            self._make_room(n)
        self._buf[self._end:self._end + n] = data
        self._end += n

    def _make_room(self, n: int) -> None:
        live = self._end - self._pos
        if live + n > len(self._buf):
            grown = bytearray(max(live + n, 2 * len(self._buf)))
            grown[:live] = memoryview(self._buf)[self._pos:self._end]
            self._buf = self._own = grown
        elif live:
            with memoryview(self._buf) as view:
                view[:live] = view[self._pos:self._end]
        self._pos, self._end = 0, live

    def _unborrow(self) -> None:
        """Copy what is left of the borrowed chunk into the own buffer."""
        chunk, pos, end = self._buf, self._pos, self._end
        self._buf = self._own
        self._borrowed = False
        self._pos = self._end = 0
        if end > pos:
            self._make_room(end - pos)
            self._buf[:end - pos] = memoryview(chunk)[pos:end]
            self._end = end - pos

    def _avail(self) -> int:
        return self._end - self._pos

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos:self._pos + n])
        self._skip(n)
        return out

    def _skip(self, n: int) -> None:
        self._pos += n
        if self._pos == self._end:
            self._pos = self._end = 0
            if self._borrowed:
                self._buf = self._own
                self._borrowed = False

    def _event(self):
        while True:
            if self._phase is _Phase.HEADER:
                return self._read_header()
            if self._phase is _Phase.DONE:
                return NEED_DATA
            if self._hrl is not None:
                ev = self._hrl_event()
                if ev is not None:
                    return ev
            if self._raw_left:  # the rest of a raw frame, as much of it as is here
                n = min(self._raw_left, self._end - self._pos)
                if not n:
                    return NEED_DATA
                self._hrl.receive_data(memoryview(self._buf)[self._pos:self._pos + n])
                self._raw_left -= n
                self._skip(n)
                continue
            if self._hrl is None or self._stored_left == 0:
                ev = self._next_disk()
                if ev is not None:
                    return ev
                continue
            if self._avail() < FRAME.size:
                return NEED_DATA
            codec, stored_len, raw_len = FRAME.unpack_from(self._buf, self._pos)
            if codec == CODEC_END and self.header.streamed:
                if stored_len or raw_len:
                    raise BundleCorruptError(f"disk {self._disk}: bad end-of-disk frame")
                self._skip(FRAME.size)
                self._stored_left = 0
                continue
            if codec not in (CODEC_RAW, CODEC_ZSTD) or raw_len > MAX_FRAME_RAW or raw_len == 0:
                raise BundleCorruptError(f"disk {self._disk}: bad frame (codec {codec}, raw {raw_len} bytes)")
            if codec == CODEC_RAW and stored_len != raw_len:
                raise BundleCorruptError(f"disk {self._disk}: raw frame lengths disagree")
            counted = not self.header.streamed
            if (counted and stored_len > self._stored_left - FRAME.size) or stored_len > MAX_FRAME_RAW + 65536:
                raise BundleCorruptError(f"disk {self._disk}: frame overruns its disk's payload")
            if codec == CODEC_RAW:
                # Passed on to the log decoder piece by piece as it arrives, without a copy.
                self._skip(FRAME.size)
                if counted:
                    self._stored_left -= FRAME.size + stored_len
                self._raw_left = stored_len
                self._frames_seen += 1
                self._raw_seen += raw_len
                continue
            if self._avail() < FRAME.size + stored_len:
                return NEED_DATA
            self._pos += FRAME.size
            if counted:
                self._stored_left -= FRAME.size + stored_len
            stored = self._take(stored_len)  # a zstd frame
            try:
                declared = zstandard.frame_content_size(stored)
            except zstandard.ZstdError as exc:
                raise BundleCorruptError(f"disk {self._disk}: corrupt zstd frame: {exc}") from None
            if declared != raw_len:  # never let a frame header decide how much memory to take
                raise BundleCorruptError(f"disk {self._disk}: zstd frame declares {declared} bytes, "
                                         f"the frame header says {raw_len}")
            try:
                # one frame, the whole stored length: bytes after it would be stored unchecked
                raw = self._dctx.decompress(stored, max_output_size=raw_len, allow_extra_data=False)
            except (zstandard.ZstdError, MemoryError) as exc:
                raise BundleCorruptError(f"disk {self._disk}: corrupt zstd frame: {exc}") from None
            if len(raw) != raw_len:
                raise BundleCorruptError(f"disk {self._disk}: frame decompressed to {len(raw)} bytes, "
                                         f"not {raw_len}")
            self._frames_seen += 1
            self._raw_seen += raw_len
            self._hrl.receive_data(raw)

    def _read_header(self):
        if self._avail() < HEADER.size:
            return NEED_DATA
        count = struct.unpack_from("<I", self._buf, self._pos + 12)[0]
        if not 1 <= count <= MAX_DISKS:
            raise BundleCorruptError(f"bundle claims {count} disks (1..{MAX_DISKS} allowed)")
        if self._avail() < header_size(count):
            return NEED_DATA
        header = decode_header(self._take(header_size(count)))
        exp = self.expect
        if "streamed" in exp and header.streamed != exp["streamed"]:
            raise BundleFormError("a streamed bundle (version 2) must be sent as a streamed upload, a counted one "
                                  "(version 1) with Content-Length" if header.streamed else
                                  "a streamed upload must carry a streamed bundle (version 2), not a counted one "
                                  "(version 1)")
        for field in ("vm_id", "generation", "sequence", "kind"):
            if field in exp and getattr(header, field) != exp[field]:
                raise BundleCorruptError(f"bundle {field} is {getattr(header, field)}, expected {exp[field]}")
        if "window" in exp:  # an initial window: exactly one disk and the range the request names
            disk_id, start, end = exp["window"]
            if len(header.disks) != 1 or (header.disks[0].disk_id, header.disks[0].range_start,
                                          header.disks[0].range_end) != (disk_id, start, end):
                raise BundleCorruptError("bundle window does not match the request's disk, offset and end")
        if "disks" in exp:
            ids = {d.disk_id for d in header.disks}
            if not ids <= set(exp["disks"]):
                raise BundleCorruptError("bundle names a disk this VM does not have")
            if header.kind == BundleKind.CYCLE and ids != set(exp["disks"]):
                raise BundleCorruptError("a cycle bundle must carry every disk of the VM")
        self.header = header
        self._phase = _Phase.FRAMES
        return header

    def _next_disk(self):
        """Finish the current disk (if any) and start the next; return DiskDone/BundleDone or None."""
        if self._hrl is not None:
            entry = self.header.disks[self._disk]
            if not self.header.streamed and (self._frames_seen != entry.frames or self._raw_seen != entry.raw_bytes):
                raise BundleCorruptError(f"disk {self._disk}: frame count or size disagrees with the disk table")
            try:
                summary = self._hrl.finish()
                summary.require_clean(f"log of disk {entry.disk_id}")
            except HrlCorruptError as exc:
                raise BundleCorruptError(f"disk {self._disk}: {exc.message}") from None
            self._hrl = None
            return DiskDone(self._disk, entry, summary)
        self._disk += 1
        if self._disk >= len(self.header.disks):
            if self._avail():
                raise BundleCorruptError("data after the end of the bundle")
            self._phase = _Phase.DONE
            return BundleDone(self.header, self.total)
        entry = self.header.disks[self._disk]
        self._hrl = HrlDecoder(keep_data=self.keep_data, lend_data=self.lend_data)
        self._stored_left = -1 if self.header.streamed else entry.stored_bytes
        self._frames_seen = 0
        self._raw_seen = 0
        return None

    def _hrl_event(self):
        try:
            ev = self._hrl.next_event()
        except HrlCorruptError as exc:
            raise BundleCorruptError(f"disk {self._disk}: {exc.message}") from None
        if ev is NEED_DATA or not isinstance(ev, (HrlHeader, Record, LogSummary)):
            return None
        entry = self.header.disks[self._disk]
        if isinstance(ev, HrlHeader):
            self._check_hrl_header(ev, entry)
            return self._hrl_event()
        if isinstance(ev, Record):
            if ev.offset < entry.range_start or ev.offset + ev.length > entry.range_end:
                raise BundleCorruptError(f"disk {self._disk}: record [{ev.offset}, +{ev.length}) outside "
                                         f"[{entry.range_start}, {entry.range_end})")
            return (self._disk, ev)
        return None  # LogSummary (END): handled when the disk's bytes are all in

    def _check_hrl_header(self, h: HrlHeader, entry: DiskEntry) -> None:
        bh = self.header
        if h.vm_id != bh.vm_id or h.disk_id != entry.disk_id:
            raise BundleCorruptError(f"disk {self._disk}: log identity does not match the bundle")
        if h.generation != bh.generation:
            raise BundleCorruptError(f"disk {self._disk}: log generation {h.generation} != bundle {bh.generation}")
        if bh.kind == BundleKind.CYCLE and h.sequence != bh.sequence:
            raise BundleCorruptError(f"disk {self._disk}: log sequence {h.sequence} != bundle {bh.sequence}")
        sizes = self.expect.get("disks")
        if sizes is not None and sizes.get(h.disk_id) not in (None, h.disk_size):
            raise BundleCorruptError(f"disk {self._disk}: log is for a disk of {h.disk_size} bytes, "
                                     f"the replica has {sizes[h.disk_id]}")
        if entry.range_end > h.disk_size:
            raise BundleCorruptError(f"disk {self._disk}: range end beyond the disk")

    def finish(self) -> BundleDone:
        """Call at the end of the body: the bundle must be complete."""
        while self._phase is not _Phase.DONE:
            ev = self.next_event()
            if ev is NEED_DATA:
                raise BundleTruncatedError("bundle is truncated (the body ended before the bundle did)")
            if isinstance(ev, BundleDone):
                return ev
        return BundleDone(self.header, self.total)
