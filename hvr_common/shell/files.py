"""File-system steps both daemons take the same way.

Reading a range whole, writing all of a buffer (a short ``pwrite``/``pwritev`` finished piece by
piece), a durable rename (rename, then fsync of the directory), a whole file
replaced durably (temp file, fsync, rename, directory fsync), a tolerant
unlink.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from hvr_common.pure.errors import ConflictError, UsageError

IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def pread_padded(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; what lies past the end of the file reads as zeroes (never short data)."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        data += bytes(length - len(data))
    return data


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (bytes-like) at ``offset``; a short write is finished from where it stopped."""
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pwritev_all(fd: int, parts: Sequence, offset: int, size: int | None = None) -> int:
    """Write every part, one after the other, from ``offset`` on; returns the bytes written.

    ``pwritev`` of at most IOV_MAX parts at a time (a batch of small network
    pieces can hold more); a short write is finished piece by piece.
    ``size``, if given, is the parts' total length (saves summing them).
    """
    total = 0
    for at in range(0, len(parts), IOV_MAX):
        group = parts[at:at + IOV_MAX]
        want = size if size is not None and len(group) == len(parts) else sum(len(p) for p in group)
        done = os.pwritev(fd, group, offset + total)
        if done < want:
            pwrite_all(fd, memoryview(b"".join(group))[done:], offset + total + done)
        total += want
    return total


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a create, rename or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path, target: Path) -> None:
    """Rename a durable file over ``target`` and make the rename durable (the commit point of a new file)."""
    os.replace(source, target)
    fsync_dir(target.parent)


def write_file_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data`` (0600): written to ``<path>.tmp``, fsynced, renamed over it,
    the directory fsynced.  A crash leaves either the old file or the new one (and maybe the temp file)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    replace_durably(tmp, path)


def unlink_if_exists(path: Path) -> bool:
    """Remove a file; True if it was there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def write_private_file(path: Path, data: bytes, *, overwrite: bool = False,
                       exists_hint: str = "choose another path") -> None:
    """Write ``data`` to ``path``, mode 0600 whatever the umask, made durable.  Without ``overwrite`` an
    existing ``path`` is a conflict; with it a temporary file is written and renamed over ``path``, so a
    reader (an agent re-reading its key or certificate) sees the old file or the new one, never a part."""
    path = Path(path)
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if overwrite else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConflictError(f"{path} already exists", hint=exists_hint) from None
    except FileNotFoundError:
        raise UsageError(f"cannot create {path}: the folder {path.parent} does not exist",
                         hint="create the folder first (mkdir -m 700), or choose another path") from None
    except IsADirectoryError:
        raise UsageError(f"cannot create {path}: it is a folder", hint="give a file name") from None
    except PermissionError:
        raise UsageError(f"cannot create {path}: permission denied",
                         hint=f"run as a user who may write to {path.parent}, or choose another path") from None
    try:
        os.fchmod(fd, 0o600)
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    if overwrite:
        os.replace(target, path)
        fsync_dir(path.parent)
