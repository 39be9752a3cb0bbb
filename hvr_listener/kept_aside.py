"""The kept-aside recovery point: an adopted old primary's own state, kept before the first difference.

A copy adopted with ``keep_aside`` (an old primary's images, ``hvrctl replica
adopt --from-agent``, :mod:`hvr_listener.adoption`) may hold writes that
never reached the new primary.  Reverse replication brings it in sync by
the compare engine, whose differences arrive as ordinary cycles; before the
first of them overwrites anything, the copy's state becomes a recovery point
of its own, **pinned**: retention never drops it, and the operator reads it
(test failover, backups) and releases it when satisfied.

``kept-aside.json`` in the replica's folder says where this stands:

| state | meaning |
|---|---|
| ``pending`` | written at the enabling (before the replica's record): nothing applied yet |
| ``kept`` | ``point_id`` is the kept-aside point (pinned) |
| ``released`` | the operator released ``point_id``: retention treats it as any point |

Write order (each step durable before the next), under the replica's image
lock, before the first cycle's capture is prepared (:meth:`KeptAside.settle`):

1. the point's row, capturing, at the last applied sequence (the replica has
   no point yet: no cycle was applied to it);
2. its undo log (header durable), by :meth:`VmHistory.add_base_point`;
3. the marker ``kept`` with the point's id.

The cycle then captures the pre-images of every byte it overwrites into
that log, like into any capture target, so the point reads as the copy was.
A crash after 1 leaves a capturing row without a log: ``VmHistory.load``
creates the log of a decided target.  A crash after 2 leaves the marker
``pending`` and the point there: the next :meth:`settle` finds the point (the
oldest one; no cycle can have been applied since) and records it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from hvr_common.pure.errors import ConflictError, NotFoundError
from hvr_common.shell.files import write_file_durably
from hvr_common.shell.logs import event

log = logging.getLogger("hvr.listener.history")

MARKER = "kept-aside.json"
PENDING, KEPT, RELEASED = "pending", "kept", "released"
LABEL = "kept-aside"


def read_marker(vm_dir: Path) -> dict | None:
    try:
        return json.loads((vm_dir / MARKER).read_bytes())
    except FileNotFoundError:
        return None


def _write_marker(vm_dir: Path, record: dict) -> None:
    write_file_durably(vm_dir / MARKER, json.dumps(record).encode())


def mark_pending(vm_dir: Path) -> None:
    """At the enabling of a copy adopted with ``keep_aside``, before the replica's record (blocking; the folder
    exists).  A marker left by an earlier replica of the VM in the same folder (failed back and forth) is
    replaced: its point went with that replica."""
    _write_marker(vm_dir, {"state": PENDING})


class KeptAside:
    """The kept-aside points of every replica: kept before the first apply, pinned until released."""

    def __init__(self, store):
        self.store = store

    def point_id(self, rep) -> int | None:
        """The replica's pinned kept-aside point, or None (blocking)."""
        marker = read_marker(rep.storage_dir)
        return marker.get("point_id") if marker and marker.get("state") == KEPT else None

    def pins(self, vm_id: uuid.UUID) -> set[int]:
        """A pin source of :class:`~hvr_listener.recovery_history.Histories` (worker thread)."""
        rep = self.store.replica(vm_id)
        if rep is None:
            return set()
        pid = self.point_id(rep)
        return {pid} if pid is not None else set()

    def settle(self, rep, history) -> None:
        """Before a cycle's capture is prepared (worker thread, image lock held): keep the copy's state
        as a point if its adoption asked for it and that is not done yet."""
        marker = read_marker(rep.storage_dir)
        if marker is None or marker.get("state") != PENDING:
            return
        if history.points:  # a crash came after the point was stored (no cycle can have been applied since)
            point = history.points[0]
        else:
            point = history.add_base_point(rep.last_applied_sequence, time.time_ns())
        _write_marker(rep.storage_dir, {"state": KEPT, "point_id": point.id, "kept_ns": time.time_ns()})
        event(log, "recovery_point_kept_aside", vm=rep.name, point=point.id, seq=point.sequence)

    def release(self, rep, point_id: int) -> None:
        """The operator is done with the kept-aside point: unpin it (blocking; retention drops it next)."""
        marker = read_marker(rep.storage_dir)
        if marker is None or marker.get("point_id") != point_id:
            raise NotFoundError(f"recovery point {point_id} of VM {rep.name} is not a kept-aside point",
                                hint=f"hvrctl recovery-points list {rep.name} labels it kept-aside")
        if marker.get("state") == RELEASED:
            return
        if marker.get("state") != KEPT:
            raise ConflictError(f"the kept-aside point of VM {rep.name} is not kept yet")
        _write_marker(rep.storage_dir, dict(marker, state=RELEASED, released_ns=time.time_ns()))
        event(log, "recovery_point_released", vm=rep.name, point=point_id)
