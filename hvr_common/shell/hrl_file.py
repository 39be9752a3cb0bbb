"""HRL files on disk: streaming reader and replay onto a disk image.

The I/O shell around the pure codec (:mod:`hvr_common.pure.hrl`,
:mod:`hvr_common.pure.hrl_decoder`): it reads a file in chunks, feeds the decoder and applies what comes out.  Memory stays
bounded by one chunk plus one record (at most 32 MiB of payload).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.extents import coalesce
from hvr_common.shell import sparse
from hvr_common.shell.files import pwrite_all
from hvr_common.pure.hrl import (
    RECORD_FLAG_NO_HOLE,
    HrlCorruptError,
    HrlHeader,
    LogSummary,
    Record,
    RecordKind,
)
from hvr_common.pure.hrl_decoder import HrlDecoder
from hvr_common.pure.stream_decoder import NEED_DATA

CHUNK_SIZE = 1024 * 1024
_COPY_SIZE = 8 * 1024 * 1024  # largest piece apply_coalesced reads from the log at once


def _open_log(path: str | os.PathLike):
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise NotFoundError(f"HRL file {os.fspath(path)} does not exist") from None


def iter_hrl_file(path: str | os.PathLike, keep_data: bool = True,
                  chunk_size: int = CHUNK_SIZE) -> Iterator[HrlHeader | Record | LogSummary]:
    """Yield the file's :class:`HrlHeader`, its valid :class:`Record` s, and last a :class:`LogSummary`.

    A bad header, a bad END record or data after the END record raise
    :class:`HrlCorruptError`; a torn tail ends the records and shows in the
    summary (``clean=False``).
    """
    decoder = HrlDecoder(keep_data=keep_data)
    with _open_log(path) as f:
        while True:
            event = decoder.next_event()
            if event is NEED_DATA:
                chunk = f.read(chunk_size)
                if not chunk:
                    yield decoder.finish()
                    return
                decoder.receive_data(chunk)
            elif isinstance(event, LogSummary):
                # Closed: anything after the END record is an error, found before the summary is given.
                rest = f.read(1)
                if rest:
                    decoder.receive_data(rest)
                    decoder.next_event()  # raises
                yield event
                return
            else:
                yield event


def read_hrl_summary(path: str | os.PathLike) -> tuple[HrlHeader, LogSummary]:
    """Check a whole file (checksums included) without keeping payloads."""
    header = None
    for event in iter_hrl_file(path, keep_data=False):
        if isinstance(event, HrlHeader):
            header = event
        elif isinstance(event, LogSummary):
            return header, event
    raise AssertionError("iter_hrl_file ends with a LogSummary")


def scan_hrl_file(path: str | os.PathLike) -> tuple[HrlHeader, list[Record], LogSummary]:
    """A whole log checked (checksums included): header, records without payloads, summary."""
    header = None
    records: list[Record] = []
    summary = None
    for event in iter_hrl_file(path, keep_data=False):
        if isinstance(event, Record):
            records.append(event)
        elif isinstance(event, HrlHeader):
            header = event
        else:
            summary = event
    return header, records, summary


def apply_record(fd: int, record: Record) -> None:
    """One record onto an image: WRITE written, ZERO zero-ranged (a hole unless NO_HOLE), TRIM punched."""
    kind = record.kind
    if kind is RecordKind.WRITE:
        pwrite_all(fd, record.data, record.offset)
    elif kind is RecordKind.ZERO:
        sparse.zero_range(fd, record.offset, record.length, may_trim=not record.flags & RECORD_FLAG_NO_HOLE)
    else:
        sparse.punch_hole(fd, record.offset, record.length)


class _Image:
    """The target of a replay: an fd we were given, or a file we open (and close)."""

    def __init__(self, image: int | str | os.PathLike):
        if isinstance(image, int):
            self.fd = image
            self.owned = False
            self.name = f"fd {image}"
        else:
            self.name = os.fspath(image)
            try:
                self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFoundError(f"image {self.name} does not exist") from None
            self.owned = True

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)

    def check_size(self, header: HrlHeader, log_path) -> None:
        size = os.lseek(self.fd, 0, os.SEEK_END)  # works for block devices too, unlike st_size
        if size < header.disk_size:
            raise UsageError(
                f"image {self.name} is {size} bytes, smaller than the {header.disk_size}-byte disk "
                f"of HRL file {os.fspath(log_path)}",
                hint="resize the replica image to the disk size before applying logs",
            )


def _check_log(log_path) -> tuple[HrlHeader, LogSummary]:
    header, summary = read_hrl_summary(log_path)
    summary.require_clean(f"HRL file {os.fspath(log_path)}")
    return header, summary


def replay(log_path: str | os.PathLike, image: int | str | os.PathLike, *,
           require_clean: bool = True, sync: bool = True) -> LogSummary:
    """Apply a log's records, in order, onto ``image`` (a path or an open read-write fd).

    WRITE is written, ZERO is ``zero_range`` (a hole may be punched unless
    the record has NO_HOLE), TRIM is ``punch_hole``: both leave zeroes.  With
    ``require_clean`` the whole log is checked first and nothing is written
    unless it is cleanly closed; without, the valid records before a torn
    tail are applied.  The image must be at least the log's
    disk size.  With ``sync`` the image is fdatasync'd before returning: the
    returned summary then describes data that is durable.
    """
    if require_clean:
        _check_log(log_path)
    target = _Image(image)
    try:
        summary = None
        for event in iter_hrl_file(log_path):
            if isinstance(event, Record):
                apply_record(target.fd, event)
            elif isinstance(event, HrlHeader):
                target.check_size(event, log_path)
            else:
                summary = event
        if require_clean:
            summary.require_clean(f"HRL file {os.fspath(log_path)} (changed while replaying)")
        if sync:
            os.fdatasync(target.fd)
        return summary
    finally:
        target.close()


def apply_coalesced(log_path: str | os.PathLike, image: int | str | os.PathLike, *,
                    require_clean: bool = True, sync: bool = True) -> LogSummary:
    """Same end state as :func:`replay`, writing each surviving byte once.

    A first pass checks the log and collects its records (without payloads);
    :func:`~hvr_common.pure.extents.coalesce` reduces them; the surviving WRITE
    bytes are then read from the log by position.  Payload checksums are
    verified in the first pass: the log must not change in between (closed
    logs never do).
    """
    header, records, summary = scan_hrl_file(log_path)
    if require_clean:
        summary.require_clean(f"HRL file {os.fspath(log_path)}")
    extents = coalesce(records)
    del records
    target = _Image(image)
    try:
        target.check_size(header, log_path)
        with _open_log(log_path) as log:
            fd = log.fileno()
            for extent in extents:
                if extent.kind is RecordKind.WRITE:
                    _copy(fd, extent.source, target.fd, extent.offset, extent.length)
                elif extent.kind is RecordKind.ZERO:
                    sparse.zero_range(target.fd, extent.offset, extent.length,
                                      may_trim=not extent.flags & RECORD_FLAG_NO_HOLE)
                else:
                    sparse.punch_hole(target.fd, extent.offset, extent.length)
        if sync:
            os.fdatasync(target.fd)
        return summary
    finally:
        target.close()


def _copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    while length:
        data = os.pread(src_fd, min(length, _COPY_SIZE), src_offset)
        if not data:
            raise HrlCorruptError(f"HRL file shorter than record payload at {src_offset} (changed while applying?)")
        pwrite_all(dst_fd, data, dst_offset)
        src_offset += len(data)
        dst_offset += len(data)
        length -= len(data)

