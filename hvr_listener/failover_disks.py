"""The disks of a failover: a recovery point of each replica disk written out as a sparse file.

``<replica dir>/failover/<disk>.img`` holds the chosen point's bytes, read
through a :class:`~hvr_listener.point_view.PointView` (for the latest point
the view reads the image itself).  Holes stay holes: only runs the view
reports as data, and only chunks that are not all zeroes, are written.

Write order, per disk (a crash between any two steps leaves either no
``.img`` or a whole one; a ``.part`` is a leftover the next attempt replaces):

1. ``<disk>.img.part`` created (truncated), the point's data written, the file
   extended to the disk's size, fsync'd;
2. renamed to ``<disk>.img``; the folder fsync'd (the commit point of that disk).

A disk whose ``.img`` exists is done and is not written again, so repeating
a failover finishes the disks a crash left unmade.  The replica images and
the undo logs are only read: cancelling the failover deletes the folder and
loses nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hvr_common.shell.files import fsync_dir, pwrite_all
from hvr_listener.point_view import PointView
from hvr_listener.store import Replica

FAILOVER_DIR = "failover"
CHUNK_BYTES = 4 * 1024 * 1024


def failover_dir(rep: Replica) -> Path:
    return rep.storage_dir / FAILOVER_DIR


def disk_path(rep: Replica, disk_name: str) -> Path:
    return failover_dir(rep) / f"{disk_name}.img"


def materialize(rep: Replica, history, point_id: int, after_disk: Callable[[str], None] | None = None) -> None:
    """Write every missing failover disk of ``rep`` at ``point_id`` (worker thread; apply is stopped)."""
    folder = failover_dir(rep)
    folder.mkdir(mode=0o700, exist_ok=True)
    for disk in rep.disks:
        final = disk_path(rep, disk.name)
        if final.exists():
            continue
        part = final.with_name(final.name + ".part")
        image_fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _copy(PointView(history, point_id, disk.disk_id, image_fd, disk.size_bytes), out, disk.size_bytes)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(image_fd)
        if after_disk is not None:
            after_disk(disk.name)
        os.rename(part, final)
        fsync_dir(folder)


def _copy(view: PointView, out: int, size: int) -> None:
    offset = 0
    while offset < size:
        length = min(CHUNK_BYTES, size - offset)
        for o, n, is_data in view.extents(offset, length):
            if not is_data:
                continue
            data = view.pread(o, n)
            if data.count(0) != len(data):
                pwrite_all(out, data, o)
        offset += length
    os.ftruncate(out, size)


def remove(rep: Replica) -> None:
    """Delete the failover disks (cancel), durably."""
    shutil.rmtree(failover_dir(rep), ignore_errors=True)
    if rep.storage_dir.exists():
        fsync_dir(rep.storage_dir)


def disk_views(rep: Replica) -> list[dict]:
    return [{"disk_id": str(d.disk_id), "name": d.name, "path": str(disk_path(rep, d.name)),
             "size_bytes": d.size_bytes} for d in rep.disks]
