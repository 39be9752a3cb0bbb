"""Building bundles: what the agent uploads to the replica.

Blocking functions, run in worker threads by :mod:`hvr_agent.cycles`.
Journal-mode cycles are built into spool files (bitmap-mode ones stream into
the upload body: :mod:`hvr_agent.cycle_stream`) and memory stays bounded: a log's records
are collected without their payloads, surviving bytes are read from the log
in pieces of at most ``RECORD_BYTES`` into one reused buffer, and frames go
to the spool file as they are made.  Initial-replication windows are built
in memory instead (:mod:`hvr_agent.initial_window`).

Write order of a cycle's spool file (``<outbox>/<vm>/<sequence:010d>.bundle``):

1. a temporary file is created and the header's space is left as zeroes;
2. each disk's frames are appended;
3. the header (which needs every disk's frame totals) is written at offset 0;
4. the SHA-256 of the whole file is computed by reading it back;
5. the file is renamed to its final name.

Spools are throw-away: a cycle's bundle is rebuilt from its logs after a
restart, and rebuilding is deterministic (the bundle's ``created_ns`` and each
log's times come from the logs themselves), so an upload that reached the
replica before a crash is recognised there by its digest (protocol P4).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from hvr_common.pure.bundle import FRAME_RAW_BYTES, BundleHeader, BundleKind, DiskEntry, FrameEncoder, header_size
from hvr_common.pure.errors import CorruptError, NotFoundError
from hvr_common.pure.extents import coalesce
from hvr_common.pure.log_continuity import LogGap
from hvr_common.pure.hrl import RECORD_SIZE, HrlEncoder, HrlHeader, LogSummary, Record, RecordKind
from hvr_common.shell.files import unlink_if_exists
from hvr_common.shell.hrl_file import scan_hrl_file
from hvr_common.shell.logs import event
from hvr_agent.journal import log_path

log = logging.getLogger("hvr.agent.replication")

RECORD_BYTES = 4 * 1024 * 1024  # largest WRITE record the shipper emits
ZERO_RECORD_BYTES = 1 << 30  # largest TRIM/ZERO record the shipper emits
_READ_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DiskSource:
    """What the shipper needs to know of one disk of the VM."""

    name: str
    disk_id: uuid.UUID
    image_path: Path
    size_bytes: int
    log_base: Path | None = None  # where the logs are named from (the image itself unless a block device)

    @property
    def logs_at(self) -> Path:
        return self.log_base or self.image_path


@dataclass(frozen=True, slots=True)
class SpooledBundle:
    path: Path
    sha256: str
    wire_bytes: int  # the file's size: what travels
    raw_bytes: int  # the HRL bytes inside, uncompressed
    write_bytes: int  # WRITE payload bytes inside
    frames: int
    compressed_frames: int
    cut_ns: int  # cycle: when its logs were closed (newest END time); initial: when it was built


def spool_path(outbox: Path, sequence: int) -> Path:
    return outbox / f"{sequence:010d}.bundle"


class BundleWriter:
    """Collects a bundle's frames after its header; keeps the totals the header needs."""

    def __init__(self) -> None:
        self.entries: list[DiskEntry] = []
        self.raw_bytes = 0
        self.write_bytes = 0
        self.frames = 0
        self.compressed_frames = 0

    def write(self, pieces: list[bytes]) -> None:
        raise NotImplementedError

    def add_disk(self, disk_id: uuid.UUID, encoder: FrameEncoder, hrl: HrlEncoder,
                 range_start: int, range_end: int) -> None:
        self.write(encoder.finish())
        self.entries.append(DiskEntry(disk_id, encoder.stored_bytes, encoder.raw_bytes, range_start, range_end,
                                      encoder.frames))
        self.raw_bytes += encoder.raw_bytes
        self.write_bytes += hrl.write_bytes
        self.frames += encoder.frames
        self.compressed_frames += encoder.compressed_frames


class _SpoolWriter(BundleWriter):
    """Appends frames after a reserved header, then writes the header and digests the file."""

    def __init__(self, final: Path, disk_count: int):
        super().__init__()
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.file.write(bytes(header_size(disk_count)))

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.file.write(piece)

    def commit(self, header: BundleHeader, cut_ns: int) -> SpooledBundle:
        try:
            self.file.seek(0)
            self.file.write(header.encode())
            self.file.close()
            digest = hashlib.sha256()
            size = 0
            with open(self.tmp, "rb", buffering=0) as f:
                while chunk := f.read(_READ_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
            os.replace(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        return SpooledBundle(self.final, digest.hexdigest(), size, self.raw_bytes, self.write_bytes,
                             self.frames, self.compressed_frames, cut_ns)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        unlink_if_exists(self.tmp)


# --- cycles ------------------------------------------------------------------------------
@dataclass
class _ClosedLogScan:
    header: HrlHeader | None
    records: list[Record]
    summary: LogSummary | None


def _scan_log(path: Path, disk: str, sequence: int) -> _ClosedLogScan:
    """A closed log's header and records (no payloads).  A missing log is a loss (docs/resync.md, C1): a cut
    that never finished had its holes filled with empty logs when the VM was opened."""
    try:
        header, records, summary = scan_hrl_file(path)
    except NotFoundError:
        gap = LogGap(disk, sequence, "is missing")
        event(log, "log_sequence_broken", logging.WARNING, disk=disk, seq=sequence, path=str(path), reason=gap.reason)
        raise CorruptError(f"{gap.describe()} ({path}): the cycle cannot be shipped as it was journaled",
                           hint="nothing to do: the disks are compared with the replica (a resynchronization)") \
            from None
    summary.require_clean(f"HRL file {path}")
    return _ClosedLogScan(header, records, summary)


def _check_identity(path: Path, h: HrlHeader, vm_id: uuid.UUID, disk: DiskSource, generation: int,
                    sequence: int) -> None:
    problems = []
    if h.vm_id != vm_id or h.disk_id != disk.disk_id:
        problems.append("it belongs to another VM or disk")
    if h.sequence != sequence:
        problems.append(f"its sequence is {h.sequence}")
    if h.generation != generation:
        problems.append(f"its generation is {h.generation}, replication's is {generation}")
    if h.disk_size != disk.size_bytes:
        problems.append(f"it is for a disk of {h.disk_size} bytes, the disk has {disk.size_bytes}")
    if problems:
        raise CorruptError(f"HRL file {path} cannot be shipped as cycle {sequence} of disk {disk.name}: "
                           + "; ".join(problems),
                           hint="move the file aside; if it held writes, the replica needs a resynchronization")


class _StreamFramer:
    """Lays out one disk's HRL stream in a buffer and writes it to the spool as frames.

    A log's surviving bytes are read with ``preadv`` straight behind their
    record header, and uncompressed frames are slices of the buffer, so the
    data is copied only by the kernel.  Whenever a record does not fit, the
    whole frames in the buffer are written out and the rest moves to the front.
    """

    CAPACITY = RECORD_BYTES + RECORD_SIZE + 2 * FRAME_RAW_BYTES  # a largest record fits after a partial frame

    def __init__(self, writer: BundleWriter, encoder: FrameEncoder):
        self.writer = writer
        self.encoder = encoder
        self.buf = bytearray(self.CAPACITY)
        self.view = memoryview(self.buf)
        self.fill = 0

    def put(self, data: bytes) -> None:
        """Append a small piece of the stream (the log header, a TRIM/ZERO or END record)."""
        self._room(len(data))
        self.view[self.fill:self.fill + len(data)] = data
        self.fill += len(data)

    def put_write(self, hrl: HrlEncoder, offset: int, fd: int, source: int, length: int, path: Path) -> None:
        """Append a WRITE record of ``length`` bytes read from the log ``fd`` at ``source``."""
        self._room(RECORD_SIZE + length)
        at = self.fill + RECORD_SIZE
        data = self.view[at:at + length]
        if os.preadv(fd, [data], source) != length:
            raise CorruptError(f"{path} is shorter than a record's payload at {source} (changed while shipping?)")
        self.view[self.fill:at] = hrl.write(offset, data)
        self.fill = at + length

    def put_data(self, hrl: HrlEncoder, offset: int, data: bytes) -> None:
        """Append a WRITE record of ``data`` (bitmap mode: cut-time contents); all zeroes become a ZERO record."""
        if data.count(0) == len(data):
            self.put(hrl.zero(offset, len(data), 0))
            return
        self._room(RECORD_SIZE + len(data))
        at = self.fill + RECORD_SIZE
        self.view[self.fill:at] = hrl.write(offset, data)
        self.view[at:at + len(data)] = data
        self.fill = at + len(data)

    def flush(self) -> None:
        """Write out everything held (the last frame may be short)."""
        self._emit(self.fill)

    def _room(self, n: int) -> None:
        if self.fill + n > len(self.buf):
            self._emit(self.fill - self.fill % FRAME_RAW_BYTES)

    def _emit(self, whole: int) -> None:
        if whole:
            self.writer.write(self.encoder.frame_stream(self.view[:whole]))  # written before the buffer changes
            rest = self.fill - whole
            self.view[:rest] = self.view[whole:self.fill]
            self.fill = rest


def in_log_order(extents: list) -> list:
    """The disjoint extents of a coalesced log, TRIMs and ZEROs first, then WRITEs in the order
    their bytes lie in the log.

    Any order of disjoint extents leaves the replica the same; this one reads
    the log front to back.  In disk-offset order every WRITE extent was a
    read at a random place of a log of gigabytes, which once the log had left
    the page cache (a busy host, a long cycle) made the build several times
    slower.
    """
    return sorted(extents, key=lambda ext: ext.source if ext.kind is RecordKind.WRITE else -1)


def build_cycle_bundle(outbox: Path, *, vm_id: uuid.UUID, generation: int, sequence: int,
                       disks: list[DiskSource], compress: bool, snapshots: dict | None = None) -> SpooledBundle:
    """Coalesce every disk's closed log of ``sequence`` into one cycle bundle, spooled (counted form).

    Every disk has a log of that sequence (a missing one raises
    :class:`CorruptError`, which the replication task answers with a
    resynchronization).  A disk tracked by bitmap has a
    :class:`~hvr_agent.cut_snapshot.CutSnapshot` in ``snapshots`` (by disk
    name): its cycle is the cut-time contents of the frozen blocks, as WRITE
    records in disk order (ZERO where a piece is all zeroes).
    """
    scans, created_ns = scan_cycle(disks, sequence)
    writer = _SpoolWriter(spool_path(outbox, sequence), len(disks))
    try:
        write_cycle(writer, scans, created_ns, vm_id=vm_id, generation=generation, sequence=sequence, disks=disks,
                    compress=compress, snapshots=snapshots)
        header = BundleHeader(BundleKind.CYCLE, vm_id, generation, sequence, created_ns,
                              tuple(writer.entries))
        return writer.commit(header, created_ns)
    except BaseException:
        writer.abort()
        raise


def scan_cycle(disks: list[DiskSource], sequence: int) -> tuple[list, int]:
    """Every disk's closed log of ``sequence`` scanned (a missing one raises), and the cycle's time."""
    scans = [_scan_log(log_path(d.logs_at, sequence), d.name, sequence) for d in disks]
    closed = [s.summary.closed_ns for s in scans if s.summary.closed_ns is not None]
    return scans, max(closed, default=0)


def write_cycle(writer: BundleWriter, scans: list, created_ns: int, *, vm_id: uuid.UUID, generation: int,
                sequence: int, disks: list[DiskSource], compress: bool, snapshots: dict | None) -> None:
    """Every disk's HRL stream of cycle ``sequence``, framed, into ``writer`` (after the header)."""
    for disk, scan in zip(disks, scans):
        path = log_path(disk.logs_at, sequence)
        _check_identity(path, scan.header, vm_id, disk, generation, sequence)
        header = scan.header
        closed_ns = scan.summary.closed_ns
        extents = in_log_order(coalesce(scan.records))
        scan.records.clear()
        encoder = FrameEncoder(compress)
        hrl = HrlEncoder(header)
        stream = _StreamFramer(writer, encoder)
        stream.put(hrl.header_bytes())
        snap = (snapshots or {}).get(disk.name)
        if snap is not None:
            for run_off, run_len in snap.runs():
                for done in range(0, run_len, RECORD_BYTES):
                    n = min(RECORD_BYTES, run_len - done)
                    stream.put_data(hrl, run_off + done, snap.read_range(run_off + done, n))
        if extents:
            with open(path, "rb", buffering=0) as log_file:
                fd = log_file.fileno()
                for ext in extents:
                    if ext.kind is RecordKind.WRITE:
                        for done in range(0, ext.length, RECORD_BYTES):
                            n = min(RECORD_BYTES, ext.length - done)
                            stream.put_write(hrl, ext.offset + done, fd, ext.source + done, n, path)
                    else:
                        emit = hrl.trim if ext.kind is RecordKind.TRIM else hrl.zero
                        for done in range(0, ext.length, ZERO_RECORD_BYTES):
                            n = min(ZERO_RECORD_BYTES, ext.length - done)
                            stream.put(emit(ext.offset + done, n, ext.flags))
        stream.put(hrl.end(closed_ns if closed_ns is not None else created_ns))
        stream.flush()
        writer.add_disk(disk.disk_id, encoder, hrl, 0, disk.size_bytes)
