"""Sparse-file primitives on Linux: punching holes, zeroing ranges, mapping data.

This module does I/O (it wraps ``fallocate(2)`` and ``lseek(2)``); it is the one
place that knows how a raw sparse image keeps its holes.  Where the file system
(or a block device) cannot punch or zero-range, callers get zeroes written the
ordinary way, so the *contents* are always right; only the allocation differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

_ZERO_CHUNK = bytes(1 << 20)
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


def _call_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """True on success, False where the operation is unsupported; raise OSError otherwise."""
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Write explicit zero bytes (allocating them)."""
    end = offset + length
    while offset < end:
        n = min(len(_ZERO_CHUNK), end - offset)
        written = os.pwrite(fd, memoryview(_ZERO_CHUNK)[:n], offset)
        offset += written


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (it then reads as zeroes).  Returns False if zeroes were written instead."""
    if length <= 0:
        return True
    if _call_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        return True
    write_zeroes(fd, offset, length)
    return False


def zero_range(fd: int, offset: int, length: int, *, may_trim: bool = True) -> None:
    """Make a range read as zeroes.

    With ``may_trim`` (NBD WRITE_ZEROES without NO_HOLE) the range is punched out;
    otherwise it stays allocated (FALLOC_FL_ZERO_RANGE, or zeroes written).
    """
    if length <= 0:
        return
    if may_trim:
        punch_hole(fd, offset, length)
        return
    if not _call_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
        write_zeroes(fd, offset, length)


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """Map ``[offset, offset+length)`` into ``(offset, length, is_data)`` runs using SEEK_DATA/SEEK_HOLE.

    Holes reported here read as zeroes.  File systems without hole support
    report everything as data, which is always correct.
    """
    end = offset + length
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos: hole to EOF
                runs.append((pos, end - pos, False))
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                runs.append((pos, end - pos, True))
                break
            raise
        if data > pos:
            hole_end = min(data, end)
            runs.append((pos, hole_end - pos, False))
            pos = hole_end
            if pos >= end:
                break
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                hole = end
            else:
                raise
        data_end = min(max(hole, pos + 1), end)
        runs.append((pos, data_end - pos, True))
        pos = data_end
    return runs

