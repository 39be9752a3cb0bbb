"""One recovery point's undo log file: capturing pre-images, and reading them back for views.

The format is ``docs/undo-format.md`` (codec in :mod:`hvr_common.pure.undo`).
An :class:`UndoLog` is either *open* (the capture target: it takes records)
or *closed* (it has its END record).  Its index, one sorted list of disjoint
records per disk, answers both "which bytes have no pre-image yet" (capture)
and "where is the pre-image of these bytes" (views).

Ordering (the undo log's commit rule): :meth:`capture` appends the
pre-images and adds them to the index; the caller then calls :meth:`sync`
and only after it overwrites the image.  A reader of a view that resolved a
range to the image re-checks :attr:`UndoLog.epoch` of the history after
reading (see :mod:`hvr_listener.point_view`), so a capture racing a read is
never missed.
"""

from __future__ import annotations

import errno
import os
import uuid
from bisect import bisect_right
from pathlib import Path

from hvr_common.pure.errors import CorruptError
from hvr_common.pure.undo import (
    MAX_DATA_LENGTH, MERGING_SUFFIX, UndoCorruptError, UndoEncoder, UndoHeader, UndoKind, UndoRecord, file_name,
)
from hvr_common.pure.undo_decoder import UndoDecoder
from hvr_common.pure.undo_merge import merge_plan, merged_header
from hvr_common.pure.stream_decoder import NEED_DATA
from hvr_common.shell import sparse
from hvr_common.shell.files import fsync_dir, pwrite_all, pwritev_all, replace_durably, unlink_if_exists

CAPTURE_PIECE_BYTES = 4 * 1024 * 1024  # a pre-image is read and recorded in pieces of at most this
READ_CHUNK = 8 * 1024 * 1024
assert CAPTURE_PIECE_BYTES <= MAX_DATA_LENGTH


class DiskIndex:
    """The records of one disk in one log: sorted by offset, disjoint."""

    __slots__ = ("starts", "records")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.records: list[UndoRecord] = []

    def add(self, rec: UndoRecord) -> None:
        i = bisect_right(self.starts, rec.offset)
        if (i and self.records[i - 1].end > rec.offset) or (i < len(self.starts) and self.starts[i] < rec.end):
            raise CorruptError(f"undo records overlap at offset {rec.offset} of disk {rec.disk_id}")
        self.starts.insert(i, rec.offset)
        self.records.insert(i, rec)

    def split(self, offset: int, length: int) -> list[tuple[int, int, UndoRecord | None]]:
        """``[offset, offset+length)`` as runs ``(offset, length, record or None)`` in offset order."""
        end = offset + length
        starts, records = self.starts, self.records
        i = max(bisect_right(starts, offset) - 1, 0)
        out: list[tuple[int, int, UndoRecord | None]] = []
        cursor = offset
        while cursor < end and i < len(records) and starts[i] < end:
            rec = records[i]
            if rec.end > cursor:
                if rec.offset > cursor:
                    out.append((cursor, rec.offset - cursor, None))
                    cursor = rec.offset
                stop = min(rec.end, end)
                out.append((cursor, stop - cursor, rec))
                cursor = stop
            i += 1
        if cursor < end:
            out.append((cursor, end - cursor, None))
        return out


class UndoLog:
    def __init__(self, path: Path, fd: int, header: UndoHeader, encoder: UndoEncoder | None, size_bytes: int):
        self.path = path
        self.fd = fd
        self.header = header
        self.encoder = encoder  # None once closed
        self.size_bytes = size_bytes
        self.disks: dict[uuid.UUID, DiskIndex] = {}
        self.name_synced = True  # False until the directory entry of a new log is made durable

    @property
    def point_id(self) -> int:
        return self.header.point_id

    @property
    def is_open(self) -> bool:
        return self.encoder is not None

    # --- opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, header: UndoHeader, *, durable: bool = True) -> UndoLog:
        """A new, empty, open log.  ``durable``: its header and name made durable now; otherwise by the
        first :meth:`sync` (nothing depends on a log before its first capture is synced)."""
        encoder = UndoEncoder(header)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        log = cls(path, fd, header, encoder, encoder.position)
        try:
            os.pwrite(fd, encoder.header_bytes(), 0)
            log.name_synced = False
            if durable:
                log.sync()
        except BaseException:
            os.close(fd)
            raise
        return log

    @classmethod
    def open(cls, path: Path, *, may_be_open: bool) -> UndoLog:
        """Read a log and index it.  An open log is cut at its valid length and resumed;
        ``may_be_open`` False makes a missing END record an error (only the newest log may lack it)."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            decoder = UndoDecoder(keep_data=False)
            records: list[UndoRecord] = []
            pos = 0
            summary = None
            while summary is None:
                chunk = os.pread(fd, READ_CHUNK, pos)
                pos += len(chunk)
                if chunk:
                    decoder.receive_data(chunk)
                while True:
                    ev = decoder.next_event()
                    if ev is NEED_DATA:
                        break
                    if isinstance(ev, UndoRecord):
                        records.append(ev)
                    elif not isinstance(ev, UndoHeader):
                        summary = ev
                        break
                if summary is None and not chunk:
                    summary = decoder.finish()
            header = decoder.header
            encoder = None
            if not summary.clean:
                if not may_be_open:
                    summary.require_clean(f"undo log {path}")
                if summary.torn_bytes:
                    os.ftruncate(fd, summary.valid_length)
                    os.fdatasync(fd)
                encoder = UndoEncoder(header, resume=summary)
            log = cls(path, fd, header, encoder, summary.valid_length)
            for rec in records:
                log._index(rec)
            return log
        except BaseException:
            os.close(fd)
            raise

    def _index(self, rec: UndoRecord) -> None:
        disk = self.disks.get(rec.disk_id)
        if disk is None:
            disk = self.disks[rec.disk_id] = DiskIndex()
        disk.add(rec)

    # --- capture -------------------------------------------------------------------------
    def uncaptured(self, disk_id: uuid.UUID, offset: int, length: int) -> list[tuple[int, int]]:
        disk = self.disks.get(disk_id)
        if disk is None:
            return [(offset, length)]
        return [(o, n) for o, n, rec in disk.split(offset, length) if rec is None]

    def capture(self, disk_id: uuid.UUID, image_fd: int, offset: int, length: int) -> int:
        """Record the image's current contents of every uncaptured byte of the range (holes as holes);
        return the bytes added to the log.  Not durable until :meth:`sync`.

        All or nothing: if reading the image or writing the log fails, the log is cut back to where
        it was and the encoder rolled back, so a retry continues a whole log (a full disk, EIO)."""
        enc = self.encoder
        if enc is None:
            raise ValueError(f"undo log of point {self.point_id} is closed")
        checkpoint = enc.checkpoint()
        start = enc.position
        added: list[UndoRecord] = []
        try:
            for off, n in self.uncaptured(disk_id, offset, length):
                for run_off, run_len, is_data in sparse.data_extents(image_fd, off, n):
                    if not is_data:
                        pos = enc.position
                        pwrite_all(self.fd, enc.hole(disk_id, run_off, run_len), pos)
                        added.append(UndoRecord(UndoKind.HOLE, disk_id, run_off, run_len, pos, 0))
                        continue
                    for p in range(run_off, run_off + run_len, CAPTURE_PIECE_BYTES):
                        piece = min(CAPTURE_PIECE_BYTES, run_off + run_len - p)
                        data = os.pread(image_fd, piece, p)
                        if len(data) < piece:
                            data += bytes(piece - len(data))
                        pos = enc.position
                        head = enc.data(disk_id, p, data)
                        pwritev_all(self.fd, [head, data], pos)
                        added.append(UndoRecord(UndoKind.DATA, disk_id, p, piece, pos, pos + len(head)))
        except BaseException:
            enc.rollback(checkpoint)
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass  # the torn tail is cut at the next start
            raise
        for rec in added:  # only once the bytes are in the file: a view may read them at once
            self._index(rec)
        grown = enc.position - start
        self.size_bytes += grown
        return grown

    def sync(self) -> None:
        """fdatasync (and, the first time, the directory entry); an EIO is permanent (a second fdatasync
        may report success for lost pages)."""
        try:
            os.fdatasync(self.fd)
            if not self.name_synced:
                fsync_dir(self.path.parent)
                self.name_synced = True
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise UndoCorruptError(f"undo log {self.path} could not be made durable: {exc.strerror}",
                                       hint="check the replica server's disk; pre-images may be lost") from None
            raise

    def close_log(self, closed_ns: int, *, durable: bool = True) -> None:
        """Append the END record (made durable now, or by the caller's next :meth:`sync`): it takes no more
        records."""
        enc = self.encoder
        if enc is None:
            return
        checkpoint = enc.checkpoint()
        start = enc.position
        try:
            pwrite_all(self.fd, enc.end(closed_ns), start)
            if durable:
                self.sync()
        except BaseException:
            enc.rollback(checkpoint)
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass
            raise
        self.size_bytes += enc.position - start
        self.encoder = None

    # --- reading back ----------------------------------------------------------------------
    def split(self, disk_id: uuid.UUID, offset: int, length: int) -> list[tuple[int, int, UndoRecord | None]]:
        disk = self.disks.get(disk_id)
        if disk is None:
            return [(offset, length, None)]
        return disk.split(offset, length)

    def read(self, rec: UndoRecord, offset: int, length: int) -> bytes:
        """The pre-image bytes ``[offset, offset+length)`` held by ``rec``."""
        if rec.kind is UndoKind.HOLE:
            return bytes(length)
        data = os.pread(self.fd, length, rec.data_position + (offset - rec.offset))
        if len(data) != length:
            raise CorruptError(f"undo log {self.path} is shorter than its index says",
                               hint="the file was changed behind the listener's back")
        return data

    def records(self) -> list[UndoRecord]:
        return [rec for disk in self.disks.values() for rec in disk.records]

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def merge_files(older: UndoLog, newer: UndoLog, closed_ns: int) -> UndoLog:
    """Merge two closed logs into a new log for the older point (``docs/undo-format.md``, "Merging").

    The merged log is written beside them as ``.undo.merging``, made durable,
    renamed over the older log's name and the directory fsynced; the caller
    then forgets ``newer`` in the database and deletes its file.  Returns the
    merged log, opened afresh: ``older`` and ``newer`` keep their descriptors
    (a view may still be reading them) until the caller closes them.
    """
    if older.is_open or newer.is_open:
        raise ValueError("only closed undo logs are merged")
    encoder = UndoEncoder(merged_header(older.header, newer.header))
    final = older.path
    tmp = final.with_name(file_name(older.point_id, MERGING_SUFFIX))
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    done = False
    try:
        pos = 0
        buf = bytearray(encoder.header_bytes())
        for piece in merge_plan(older.records(), newer.records()):
            if piece.kind is UndoKind.HOLE:
                buf += encoder.hole(piece.disk_id, piece.offset, piece.length)
            else:
                source = older if piece.from_older else newer
                data = os.pread(source.fd, piece.length, piece.source)
                if len(data) != piece.length:
                    raise CorruptError(f"undo log {source.path} is shorter than its index says")
                buf += encoder.data(piece.disk_id, piece.offset, data)
                buf += data
            if len(buf) >= READ_CHUNK:
                pwrite_all(fd, buf, pos)
                pos += len(buf)
                buf.clear()
        buf += encoder.end(closed_ns)
        pwrite_all(fd, buf, pos)
        os.fdatasync(fd)
        done = True
    finally:
        os.close(fd)
        if not done:
            unlink_if_exists(tmp)  # a failed merge leaves the old pair as it was, and no space taken
    replace_durably(tmp, final)
    return UndoLog.open(final, may_be_open=False)
