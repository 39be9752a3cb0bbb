"""A recovery point of one replica disk, read as a block device: the image with undo logs laid over it.

To reach point k the undo logs of k and of every newer capturing point are
consulted, oldest first: each byte comes from the oldest log holding a
pre-image of it, or else from the replica image (the newest state).  Apply
goes on meanwhile; it captures a pre-image (and bumps the history's
``epoch``) before it overwrites the image, so a read that resolved a range
to the image and finds the epoch changed afterwards is done again: a view
never returns a byte newer than its point.

The view is read-only; a test failover writes through a
:class:`~hvr_common.block.overlay.Overlay` above it.
"""

from __future__ import annotations

import errno
import uuid
from typing import Protocol

from hvr_common.shell import sparse
from hvr_common.pure.undo import UndoKind
from hvr_common.shell.files import pread_padded
from hvr_listener.undo_log import UndoLog

MAX_RETRIES = 1000


class History(Protocol):
    """What a view needs of a replica's recovery history."""

    epoch: int  # bumped after every capture and every change of the set of logs

    def chain(self, point_id: int) -> list[UndoLog]:
        """The undo logs that reach ``point_id``, oldest (the point's own) first; [] for the latest."""


class PointView:
    read_only = True

    def __init__(self, history: History, point_id: int, disk_id: uuid.UUID, image_fd: int, size: int):
        self.history = history
        self.point_id = point_id
        self.disk_id = disk_id
        self.image_fd = image_fd
        self.size = size

    def _resolve(self, offset: int, length: int) -> list[tuple[int, int, UndoLog | None, object]]:
        unresolved = [(offset, length)]
        parts: list[tuple[int, int, UndoLog | None, object]] = []
        try:
            chain = self.history.chain(self.point_id)
        except KeyError:
            raise OSError(errno.EIO, f"recovery point {self.point_id} is no longer kept") from None
        for log in chain:
            left = []
            for off, n in unresolved:
                for o, m, rec in log.split(self.disk_id, off, n):
                    if rec is None:
                        left.append((o, m))
                    else:
                        parts.append((o, m, log, rec))
            unresolved = left
            if not unresolved:
                break
        parts.extend((o, m, None, None) for o, m in unresolved)
        parts.sort(key=lambda p: p[0])
        return parts

    def pread(self, offset: int, length: int) -> bytes:
        history = self.history
        for _ in range(MAX_RETRIES):
            epoch = history.epoch
            parts = self._resolve(offset, length)
            if len(parts) == 1 and parts[0][2] is None:
                data = pread_padded(self.image_fd, length, offset)
            else:
                data = b"".join(log.read(rec, o, n) if log is not None else pread_padded(self.image_fd, n, o)
                                for o, n, log, rec in parts)
            if history.epoch == epoch:
                return data
        raise OSError(errno.EAGAIN, "recovery point view kept changing under the read")

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Which runs of the point hold data; like :meth:`pread`, done again if apply moved meanwhile
        (a trim applied to the image must not show as a hole the point does not have)."""
        history = self.history
        for _ in range(MAX_RETRIES):
            epoch = history.epoch
            runs: list[tuple[int, int, bool]] = []
            for o, n, log, rec in self._resolve(offset, length):
                if log is None:
                    runs.extend(sparse.data_extents(self.image_fd, o, n))
                else:
                    runs.append((o, n, rec.kind is UndoKind.DATA))
            if history.epoch == epoch:
                return runs
        raise OSError(errno.EAGAIN, "recovery point view kept changing under the read")

