"""Bundles on the listener's disk: receiving into a spool file, and applying.

All methods here block (file I/O, zstd, checksums); the daemon runs them in
worker threads, a chunk at a time, so the event loop stays responsive and
memory stays bounded by one chunk plus one record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from pathlib import Path
from typing import Protocol

from hvr_common.pure.bundle import BundleHeader
from hvr_common.pure.bundle_decoder import BundleDecoder, BundleDone
from hvr_common.pure.hrl import Record
from hvr_common.pure.stream_decoder import NEED_DATA
from hvr_common.shell.files import pwritev_all, replace_durably, unlink_if_exists
from hvr_common.shell.hrl_file import apply_record

READ_CHUNK = 1024 * 1024
# Spools and initial windows are handed to the disk every this many bytes written, so the
# fsync that ends an upload waits for the tail only, not for the whole body.
WRITEBACK_BYTES = 8 * 1024 * 1024

CAPTURE_BATCH_BYTES = 32 * 1024 * 1024  # records held back while their pre-images are made durable


class CaptureSink(Protocol):
    """Recovery history's capture of pre-images (:class:`hvr_listener.recovery_history.Capture`)."""

    def capture(self, disk_id: uuid.UUID, image_fd: int, offset: int, length: int) -> None:
        """Save the image's current bytes of the range (those not saved yet); durable only after commit."""

    def commit(self) -> None:
        """Make everything captured durable: the captured ranges may be overwritten after this returns."""


class EarlyWriteback:
    """Hands what a writer wrote to the disk every ``WRITEBACK_BYTES``, so its final fsync waits for the tail only.

    ``POSIX_FADV_DONTNEED`` on a range just written starts writeback of its
    dirty pages without waiting for it; the pages stay cached (only pages
    already clean are dropped).
    """

    __slots__ = ("fd", "_lo", "_hi", "_bytes")

    def __init__(self, fd: int):
        self.fd = fd
        self._lo = self._hi = self._bytes = 0  # bytes written since the last writeback, and their span

    def note(self, offset: int, length: int) -> None:
        end = offset + length
        if self._bytes:
            offset, end = min(offset, self._lo), max(end, self._hi)
        self._bytes += length
        if self._bytes < WRITEBACK_BYTES:
            self._lo, self._hi = offset, end
            return
        self._bytes = 0
        os.posix_fadvise(self.fd, offset, end - offset, os.POSIX_FADV_DONTNEED)


class SpoolWriter:
    """Receives one bundle body into ``path``: hashes, validates and stores each chunk."""

    def __init__(self, path: Path, decoder: BundleDecoder):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.sha = hashlib.sha256()
        self.decoder = decoder
        self.bytes = 0
        self.done: BundleDone | None = None
        self._writeback = EarlyWriteback(self.fd)

    def feed(self, chunks: list[bytes]) -> None:
        size = 0
        for chunk in chunks:
            self.sha.update(chunk)
            size += len(chunk)
        pwritev_all(self.fd, chunks, self.bytes, size)
        self._writeback.note(self.bytes, size)
        self.bytes += size
        dec = self.decoder
        for chunk in chunks:
            dec.receive_data(chunk)
            while True:
                ev = dec.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, BundleDone):
                    self.done = ev

    def finish(self) -> BundleDone:
        """The body is complete: validate the end and make the file durable."""
        done = self.done or self.decoder.finish()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return done

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        unlink_if_exists(self.path)


class DirectWindowWriter:
    """Receives an initial-replication window straight into the replica image.

    Used only for initial windows: the bytes it writes lie at or above the
    disk's durable offset, which is not yet replicated content (it is
    rewritten when the window is sent again), and the offset advances only
    after the whole body was valid, its digest matched and the image was
    fdatasync'd.  Each record is checked (CRC chain, bounds, identity) before
    it is written, so a damaged body writes nothing that was not sent.
    """

    def __init__(self, image: Path, disk_id: uuid.UUID, decoder: BundleDecoder):
        self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self.disk_id = disk_id
        self.sha = hashlib.sha256()
        self.decoder = decoder
        self.bytes = 0
        self.done: BundleDone | None = None
        self.header: BundleHeader | None = None
        self._writeback = EarlyWriteback(self.fd)

    def feed(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.sha.update(chunk)
            self.bytes += len(chunk)
            self.decoder.receive_data(chunk)
            self._drain_events()

    def _drain_events(self) -> None:
        while True:
            ev = self.decoder.next_event()
            if ev is NEED_DATA:
                return
            if isinstance(ev, BundleHeader):
                self.header = ev
            elif isinstance(ev, tuple):
                rec = ev[1]
                apply_record(self.fd, rec)
                self._writeback.note(rec.offset, rec.length)
            elif isinstance(ev, BundleDone):
                self.done = ev

    def check_complete(self) -> BundleDone:
        """The body held a whole, valid bundle (raises if it ended early)."""
        if self.done is None:
            self.done = self.decoder.finish()
        return self.done

    def finish(self) -> BundleDone:
        """Make what the window wrote durable (fdatasync), then close."""
        done = self.check_complete()
        os.fdatasync(self.fd)
        self.close()
        return done

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def commit_file(spool: Path, final: Path) -> None:
    """Move a durable spool file into place and make the rename durable."""
    final.parent.mkdir(parents=True, exist_ok=True)
    replace_durably(spool, final)


def apply_bundle(path: Path, images: dict[uuid.UUID, Path], expect: dict,
                 capture: CaptureSink | None = None) -> BundleHeader:
    """Apply every record of a stored bundle to the replica images, then fdatasync them.

    Records are absolute writes, so applying the same bundle again is
    harmless: an interrupted apply is simply run again.  With ``capture``,
    records are applied in batches: the pre-images of a batch are captured and
    made durable before any record of it is written (``docs/recovery-history.md``).
    """
    fds: dict[uuid.UUID, int] = {}
    batch = _Batch(capture) if capture is not None else None
    try:
        for disk_id, image in images.items():
            fds[disk_id] = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        dec = BundleDecoder(keep_data=True, lend_data=True, expect=expect)
        header: BundleHeader | None = None
        with open(path, "rb", buffering=0) as fh:
            while True:
                chunk = fh.read(READ_CHUNK)
                if chunk:
                    dec.receive_data(chunk)
                while True:
                    ev = dec.next_event() if chunk else _finish_events(dec)
                    if ev is NEED_DATA or ev is None:
                        break
                    if isinstance(ev, BundleHeader):
                        header = ev
                    elif isinstance(ev, tuple):
                        idx, rec = ev
                        if batch is None:
                            apply_record(fds[header.disks[idx].disk_id], rec)
                        else:
                            disk_id = header.disks[idx].disk_id
                            batch.add(disk_id, fds[disk_id], rec)
                    elif isinstance(ev, BundleDone):
                        if batch is not None:
                            batch.apply()
                        for fd in fds.values():
                            os.fdatasync(fd)
                        return header
                if not chunk:
                    dec.finish()
                    raise AssertionError("unreachable: finish() raises on a truncated bundle")
    finally:
        for fd in fds.values():
            os.close(fd)


class _Batch:
    """Records held back until their pre-images are durable (their lent data copied)."""

    def __init__(self, capture: CaptureSink):
        self.capture = capture
        self.records: list[tuple[uuid.UUID, int, Record]] = []
        self.bytes = 0

    def add(self, disk_id: uuid.UUID, fd: int, rec: Record) -> None:
        if rec.data is not None:
            rec = dataclasses.replace(rec, data=bytes(rec.data))
            self.bytes += rec.length
        self.records.append((disk_id, fd, rec))
        if self.bytes >= CAPTURE_BATCH_BYTES:
            self.apply()

    def apply(self) -> None:
        """Capture the held records' pre-images, make them durable, then write the records (with no
        records, the commit still makes what the cycle's start changed in the logs durable)."""
        for disk_id, fd, rec in self.records:
            self.capture.capture(disk_id, fd, rec.offset, rec.length)
        self.capture.commit()
        for _, fd, rec in self.records:
            apply_record(fd, rec)
        self.records.clear()
        self.bytes = 0


def _finish_events(dec: BundleDecoder):
    ev = dec.next_event()
    return None if ev is NEED_DATA else ev
