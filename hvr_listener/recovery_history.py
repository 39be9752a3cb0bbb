"""The recovery history of one replica VM: its points, their undo logs, capture during apply, thinning.

The rules (which point captures, which are dropped, in which steps) are pure
(:mod:`hvr_common.pure.recovery_points`); this module does the I/O they call
for, in this order:

* **Before a cycle applies** (:meth:`VmHistory.prepare_capture`, worker
  thread, image lock held): if the newest point's capturing is undecided,
  decide it and store the decision; when it captures, its undo log is
  created (header durable) and then the previous capture target's log is
  closed.  A re-applied cycle finds the decision stored and captures into
  the same log, whose index was rebuilt from the file at start (``load``
  creates a decided target's missing log and closes a log left open that is
  no longer the target).
* **During apply** (:class:`Capture`): for each batch of records, the
  uncaptured bytes' pre-images are appended, the log is fdatasync'd and the
  epoch bumped, and only then are the records written to the image.
* **After apply**: the store's ``mark_applied`` creates the point of the
  cycle in the same transaction and deletes a superseded point (one that
  did not capture and is no longer the latest).
* **Thinning** (:meth:`VmHistory.drop`): merges run file work in a thread and
  swap logs on the event loop, so a view reading on the loop never sees a
  closed descriptor.

``epoch`` is what :class:`~hvr_listener.point_view.PointView` re-checks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path

from hvr_common.pure.errors import CorruptError, HvrError
from hvr_common.pure.recovery_points import (
    DropStep, HistorySettings, Point, StepKind, capture_target, decide_capturing, drop_steps, points_to_drop,
    reach_order,
)
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.undo import HEADER_SIZE, FILE_SUFFIX, MERGING_SUFFIX, UndoCorruptError, UndoHeader, file_name
from hvr_common.pure.undo_merge import superseded
from hvr_common.shell.files import fsync_dir, unlink_if_exists
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_listener.kept_aside import KeptAside
from hvr_listener.undo_log import UndoLog, merge_files

log = logging.getLogger("hvr.listener.history")

POINTS_DIR = "points"


class Capture:
    """The capture of one cycle's apply into the target point's undo log (worker thread)."""

    def __init__(self, history: VmHistory, target: UndoLog):
        self.history = history
        self.target = target
        self.bytes = 0

    def capture(self, disk_id: uuid.UUID, image_fd: int, offset: int, length: int) -> None:
        self.bytes += self.target.capture(disk_id, image_fd, offset, length)

    def commit(self) -> None:
        """Make every pre-image captured so far durable (with the new target's header and name, and the
        END of the log it replaced); the image may be overwritten after this."""
        unsynced = self.history.unsynced  # logs closed for this cycle, their END not yet durable
        while unsynced:
            unsynced[-1].sync()
            unsynced.pop()
        self.target.sync()
        self.history.epoch += 1


class VmHistory:
    """Points and open undo logs of one replica VM."""

    def __init__(self, vm_id: uuid.UUID, name: str, points_dir: Path, store):
        self.vm_id = vm_id
        self.name = name
        self.dir = points_dir
        self.store = store
        self.points: tuple[Point, ...] = ()
        self.logs: dict[int, UndoLog] = {}
        self.epoch = 0
        self.retired: list[UndoLog] = []  # replaced logs whose descriptors views may still hold
        self.created_ns = 0  # the replica record this history belongs to (a re-enabled VM starts afresh)
        self.unsynced: list[UndoLog] = []  # closed by prepare_capture, their END synced by the next commit

    # --- start ---------------------------------------------------------------------------
    def load(self) -> None:
        """Read the points from the store and the logs from disk, finishing what a crash interrupted
        (worker thread, at start, before any apply or view)."""
        self.dir.mkdir(exist_ok=True)  # in the replica's folder, never creating that folder anew
        points = self.store.points(self.vm_id)
        for p in self.dir.glob("*" + MERGING_SUFFIX):
            unlink_if_exists(p)
        files = {int(p.name[:-len(FILE_SUFFIX)]): p for p in self.dir.glob("*" + FILE_SUFFIX)
                 if p.name[:-len(FILE_SUFFIX)].isascii() and p.name[:-len(FILE_SUFFIX)].isdigit()}
        known = {p.id: p for p in points}
        capturing = [p.id for p in points if p.capturing]
        may_be_open = set(capturing[-2:])  # the target, and the one before it if a crash left it open
        logs: dict[int, UndoLog] = {}
        try:
            for pid in sorted(files):
                if pid not in known or not known[pid].capturing:
                    unlink_if_exists(files[pid])  # its row was dropped (or never captured): a leftover
                    continue
                try:
                    logs[pid] = UndoLog.open(files[pid], may_be_open=pid in may_be_open)
                except UndoCorruptError:
                    if pid != capturing[-1] or files[pid].stat().st_size > HEADER_SIZE:
                        raise
                    unlink_if_exists(files[pid])  # its header never became durable: nothing was captured in it
            self._finish_load(points, logs, files)
        except BaseException:
            for lg in logs.values():
                lg.close_fd()
            raise

    def _finish_load(self, points: list[Point], logs: dict[int, UndoLog], files: dict[int, Path]) -> None:
        gone = superseded(lg.header for lg in logs.values())
        for pid in gone:  # a merge renamed its result into place but did not finish dropping the newer point
            logs.pop(pid).close_fd()
            self.store.drop_point(self.vm_id, pid, None, None)
            unlink_if_exists(files[pid])
        points = [p for p in points if p.id not in gone]
        target = capture_target(points)
        for p in points:
            if not p.capturing or p.id in logs:
                continue
            if p is not target:
                raise CorruptError(f"recovery point {p.id} of VM {self.name} has lost its undo log "
                                   f"{self.dir / file_name(p.id)}",
                                   hint="restore the file, or remove and enable the replica again")
            logs[p.id] = self._new_log(p)  # decided, but the crash came before its log was created
        for pid, lg in logs.items():
            if lg.is_open and (target is None or pid != target.id):
                lg.close_log(time.time_ns())  # the crash came before it was closed: it takes no more
        for p in points:  # sizes as the files say
            if p.id in logs and logs[p.id].size_bytes != p.undo_bytes:
                self.store.set_point_size(self.vm_id, p.id, logs[p.id].size_bytes)
        if gone:
            fsync_dir(self.dir)
        self.logs = logs
        self.points = tuple(self.store.points(self.vm_id))

    # --- views ---------------------------------------------------------------------------
    def chain(self, point_id: int) -> list[UndoLog]:
        """The logs that reach ``point_id``, oldest first (``KeyError``: no such point)."""
        return [self.logs[p.id] for p in reversed(reach_order(self.points, point_id))]

    def point(self, point_id: int) -> Point:
        for p in self.points:
            if p.id == point_id:
                return p
        raise KeyError(point_id)

    # --- apply ---------------------------------------------------------------------------
    def prepare_capture(self, settings: HistorySettings, pinned: set[int]) -> Capture | None:
        """Decide the newest point's capturing if not yet; the capture for the next cycle, or None."""
        points = list(self.points)
        if points and points[-1].capturing is None:
            newest = points[-1]
            previous = capture_target(points)
            # Stored first: a crash before the log exists leaves a decided target whose log
            # load() creates; one before the previous log is closed leaves it for load() to close.
            captures = self.store.set_capturing(self.vm_id, newest.id,
                                                decide_capturing(points, settings, pinned))
            # The previous log's END is not synced here: the cycle's first commit() does it, before
            # any image write (a crash before it leaves that log open, which load() closes).
            if captures and newest.id not in self.logs:
                self.logs[newest.id] = self._new_log(newest)  # header durable before any record (W1)
            if captures and previous is not None and self.logs[previous.id].is_open:
                self.logs[previous.id].close_log(time.time_ns(), durable=False)
                self.unsynced.append(self.logs[previous.id])
            points[-1] = dataclasses.replace(newest, capturing=captures)
            self.points = tuple(points)
        target = capture_target(self.points)
        return Capture(self, self.logs[target.id]) if target is not None else None

    def add_base_point(self, sequence: int, time_ns: int) -> Point:
        """The first point of a history that has none, capturing from the next cycle on: the images as they
        stand (worker thread, image lock held).  Its row is stored first, then its log created (a crash
        between leaves a decided target without a log, which :meth:`load` creates)."""
        if self.points:
            raise CorruptError(f"VM {self.name} has recovery points already; a base point must be the first")
        pid = self.store.add_base_point(self.vm_id, sequence, time_ns)
        self.points = tuple(self.store.points(self.vm_id))
        point = self.point(pid)
        self.logs[pid] = self._new_log(point)
        self.epoch += 1
        return point

    def _new_log(self, point: Point, *, durable: bool = True) -> UndoLog:
        header = UndoHeader(self.vm_id, point.id, point.sequence, point.id, time.time_ns())
        return UndoLog.create(self.dir / file_name(point.id), header, durable=durable)

    def applied(self) -> None:
        """After the store recorded the applied cycle and its point (worker thread)."""
        self.points = tuple(self.store.points(self.vm_id))
        self.epoch += 1

    # --- thinning ----------------------------------------------------------------------------
    def plan_drops(self, settings: HistorySettings, pinned: set[int], now_ns: int) -> list[DropStep]:
        target = capture_target(self.points)
        only = target is not None and sum(1 for p in self.points if p.capturing) == 1
        # The open log is never merged; the target is dropped only when it is the one capturing
        # point (it is then deleted, and nothing captures until a point is kept again).
        drop = [p for p in points_to_drop(self.points, settings, now_ns, pinned)
                if target is None or p.id != target.id or only]
        return drop_steps(self.points, drop)

    def merge_files(self, step: DropStep) -> UndoLog:
        """The file half of a MERGE step (worker thread): the merged log, renamed into place."""
        return merge_files(self.logs[step.into.id], self.logs[step.point.id], time.time_ns())

    def swap(self, step: DropStep, merged: UndoLog | None) -> None:
        """The in-memory half of a drop (event loop): views see the merged log from now on."""
        logs = dict(self.logs)
        if merged is not None:
            self.retired.append(logs[step.into.id])
            logs[step.into.id] = merged
        self.retired.append(logs.pop(step.point.id))
        self.logs = logs
        self.points = tuple(p for p in self.points if p.id != step.point.id)
        self.epoch += 1

    def forget(self, step: DropStep, merged: UndoLog | None) -> None:
        """The store and file half of a drop (worker thread), after :meth:`swap`."""
        self.store.drop_point(self.vm_id, step.point.id, step.into.id if merged else None,
                              merged.size_bytes if merged else None)
        unlink_if_exists(self.dir / file_name(step.point.id))
        fsync_dir(self.dir)
        event(log, "recovery_point_dropped", vm=self.name, point=step.point.id, seq=step.point.sequence,
              step=step.kind.value, into=step.into.id if step.into else None)

    def close_retired(self) -> None:
        """Close replaced logs (event loop: no view is mid-read between two loop steps)."""
        for lg in self.retired:
            lg.close_fd()
        self.retired.clear()

    def close(self) -> None:
        self.close_retired()
        for lg in self.logs.values():
            lg.close_fd()
        self.logs = {}

    def size_bytes(self) -> int:
        return sum(lg.size_bytes for lg in self.logs.values())


def is_merge(step: DropStep) -> bool:
    return step.kind is StepKind.MERGE


class Histories:
    """Every replica's :class:`VmHistory`, loaded at start; thinning after apply."""

    def __init__(self, store):
        self.store = store
        self._by_vm: dict[uuid.UUID, VmHistory] = {}
        # Other holders of points (backups): each gives the points it stands on, by VM; read under
        # the image lock like the test failover's row.
        self.pin_sources: list = []
        self.kept_aside = KeptAside(store)  # an adopted old primary's own state, pinned until released
        self.pin_sources.append(self.kept_aside.pins)

    def load(self, rep) -> VmHistory:
        """The replica's history, loaded from its store rows and files on first use (worker thread)."""
        history = self._by_vm.get(rep.vm_id)
        if history is None or history.created_ns != rep.created_ns:
            if history is not None:
                history.close()
            history = VmHistory(rep.vm_id, rep.name, points_dir(rep), self.store)
            history.created_ns = rep.created_ns
            history.load()
            self._by_vm[rep.vm_id] = history
        return history

    def load_all(self, replicas) -> None:
        """At start, before apply and views: every replica that may have points.  One that cannot be
        loaded is left for the applier, which fails that replica alone (or retries an I/O error)."""
        for rep in replicas:
            try:
                if rep.state is ReplicationState.REPLICATING or self.store.points(rep.vm_id):
                    self.load(rep)
            except (HvrError, OSError) as exc:
                event(log, "recovery_history_load_failed", logging.ERROR, vm=rep.name, error=str(exc))

    def get(self, vm_id: uuid.UUID) -> VmHistory | None:
        return self._by_vm.get(vm_id)

    def forget(self, vm_id: uuid.UUID) -> None:
        history = self._by_vm.pop(vm_id, None)
        if history is not None:
            history.close()

    def pins(self, vm_id: uuid.UUID) -> set[int]:
        row = self.store.test_failover(vm_id)
        pins = {row.point_id} if row is not None else set()
        for source in self.pin_sources:
            pins |= source(vm_id)
        return pins

    async def thin(self, rep, history: VmHistory, pins: set[int] | None = None) -> int:
        """Drop what retention no longer keeps (call with the replica's image lock held); ``pins``: the
        points tests stand on, when the caller has just read them."""
        if pins is None:
            pins = await finish_in_thread(self.pins, rep.vm_id)
        steps = history.plan_drops(rep.history, pins, time.time_ns())
        for step in steps:
            merged = await finish_in_thread(history.merge_files, step) if is_merge(step) else None
            history.swap(step, merged)
            history.close_retired()
            await finish_in_thread(history.forget, step, merged)
        return len(steps)

    def close(self) -> None:
        for history in self._by_vm.values():
            history.close()
        self._by_vm.clear()


def points_dir(rep) -> Path:
    """Where a replica's undo logs live: beside its images (one file system, renames stay atomic)."""
    return rep.storage_dir / POINTS_DIR
