"""Backups of replica VMs: a recovery point held frozen for a backup product, while cycles keep applying.

``begin`` asks the backup gate (:mod:`hvr_common.pure.backup_gate`) whether
the chosen point (default: the latest) is consistent now; if it is, each disk
of the VM at that point is a read-only :class:`PointView`, exported by the
listener's NBD server as ``NAME-backup/DISK`` and readable through the admin
API (``hvrctl backup export`` writes sparse raw files from it).  The point is
pinned (thinning keeps it, the next cycle's apply captures it) until ``end``.
An application-consistent point gives an application-consistent backup.

A backup lives as long as the listener process: it is held in memory only, so
a restart (or stop) of the listener ends every backup (``backup_ended``,
reason ``listener_stopping``); a backup product begins again.  Nothing is
written to the replica's storage by a backup, so nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hvr_common.block.catalogue import Export, Withdrawn
from hvr_common.pure.backup_gate import Admitted, GateInput, backup_gate
from hvr_common.pure.errors import HvrError, NotFoundError, UsageError
from hvr_common.pure.input_limits import is_int_in
from hvr_common.pure.health import replication_health
from hvr_common.pure.nbd_events import ExportInfo
from hvr_common.pure.recovery_points import Point
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.pure.wire.status_views import iso_time
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_listener.point_view import PointView
from hvr_listener.recovery_history import Histories
from hvr_listener.replica_access import ReplicaAccess
from hvr_listener.store import ListenerStore, Replica

log = logging.getLogger("hvr.listener.backup")

MAX_READ_BYTES = 16 * 1024 * 1024  # one data read through the admin API


def export_name(name: str, disk: str) -> str:
    return f"{name}-backup/{disk}"


def group_name(name: str) -> str:
    return f"{name}-backup"


def replica_health(rep: Replica, now_ns: int) -> str:
    """The replica's own view of its health: Critical in Error, or when no cycle arrived for two intervals."""
    return replication_health(rep.state, frequency_s=rep.frequency_s, rows=(), now_ns=now_ns,
                              last_ack_ns=rep.last_replication_ns, replicating_since_ns=rep.last_applied_ns,
                              state_detail=rep.state_detail).health.value


@dataclass
class _Backup:
    vm_id: uuid.UUID
    name: str
    point: Point
    began_ns: int
    views: dict[str, PointView]  # by disk name
    exports: dict[str, Export]  # by export name
    fds: list[int]
    read_bytes: int = 0


class Backups:
    """The backups held on this replica server (one per VM); also an ``ExportCatalogue``."""

    def __init__(self, store: ListenerStore, access: ReplicaAccess, histories: Histories, nbd_socket: Path | None,
                 apply_interrupted: Callable[[uuid.UUID], str | None] = lambda vm_id: None,
                 health: Callable[[Replica, int], str] = replica_health,
                 resync_running: Callable[[uuid.UUID], bool] = lambda vm_id: False):
        self.store = store
        self.access = access
        self.histories = histories
        self.nbd_socket = nbd_socket
        self.apply_interrupted = apply_interrupted
        self.health = health
        self.resync_running = resync_running  # a primary is resynchronizing the replica (resync_activity.py)
        # By VM name; replaced, never changed in place: the applier's threads read it (pins) meanwhile.
        self._backups: dict[str, _Backup] = {}
        self._callbacks: list[Withdrawn] = []
        self.quiesce: Callable[[str], Awaitable[None]] | None = None  # the NBD server's wait_group_idle
        histories.pin_sources.append(self.pins)

    # --- ExportCatalogue --------------------------------------------------------------------
    def lookup(self, name: str) -> Export | None:
        vm, sep, _ = name.partition("-backup/")
        backup = self._backups.get(vm) if sep else None
        return backup.exports.get(name) if backup is not None else None

    def exports(self) -> list[ExportInfo]:
        return sorted((e.info for b in self._backups.values() for e in b.exports.values()), key=lambda i: i.name)

    def on_withdrawn(self, callback: Withdrawn) -> None:
        self._callbacks.append(callback)

    def pins(self, vm_id: uuid.UUID) -> set[int]:
        return {b.point.id for b in self._backups.values() if b.vm_id == vm_id}

    # --- verbs ------------------------------------------------------------------------------
    async def begin(self, name: str, point_id: int | None) -> dict:
        if point_id is not None and not is_int_in(point_id, 1):  # 1 to 2^63 - 1, as stored
            raise UsageError(f"recovery_point must be a point id (a positive whole number), not {point_id!r:.80}")
        rep = await self._replica(name)
        async with self.access.lock(rep.vm_id), self.access.image_lock(rep.vm_id):
            rep = await self._replica(name)  # again, under the locks
            if name in self._backups:
                raise error("backup_running", f"a backup of VM {name} is already held",
                            hint=f"end it first: hvrctl backup end {name}")
            history = None
            if rep.state is ReplicationState.REPLICATING:
                history = await finish_in_thread(self.histories.load, rep)
            verdict = backup_gate(GateInput(
                vm=name, state=rep.state.value, health=self.health(rep, time.time_ns()),
                points=history.points if history is not None else (), requested_point=point_id,
                apply_interrupted=self.apply_interrupted(rep.vm_id), state_detail=rep.state_detail,
                resync_running=self.resync_running(rep.vm_id)))
            if not isinstance(verdict, Admitted):
                event(log, "backup_refused", logging.WARNING, vm=name, code=verdict.code, point=point_id)
                raise error(verdict.code, verdict.message, hint=verdict.hint)
            backup = await finish_in_thread(self._open, rep, history, verdict.point)
            self._backups = {**self._backups, name: backup}  # pinned from now on: the next apply captures it
        event(log, "backup_began", vm=name, point=backup.point.id, seq=backup.point.sequence,
              consistency=backup.point.consistency.value, disks=len(backup.views))
        return self.view(backup)

    async def end(self, name: str) -> dict:
        rep = await self._replica(name)
        async with self.access.lock(rep.vm_id), self.access.image_lock(rep.vm_id):
            backup = self._backups.get(name)
            if backup is None:
                raise NotFoundError(f"no backup of VM {name} is held", hint=f"hvrctl backup begin {name}")
            await self._withdraw(name, "backup_ended")
            self._backups = {k: v for k, v in self._backups.items() if k != name}
            self._close(backup)
            try:  # the point may go now (else after the next cycle)
                history = await finish_in_thread(self.histories.load, rep)
                await self.histories.thin(rep, history)
            except (OSError, sqlite3.Error, HvrError) as exc:
                event(log, "recovery_points_thinning_failed", logging.WARNING, vm=name, error=str(exc),
                      hint="retried after the next cycle")
        event(log, "backup_ended", vm=name, reason="operator", point=backup.point.id, bytes=backup.read_bytes)
        return {"vm": name, "ended": True, "recovery_point": backup.point.id, "read_bytes": backup.read_bytes}

    def status(self, name: str) -> dict | None:
        backup = self._backups.get(name)
        return self.view(backup) if backup is not None else None

    def all(self) -> list[dict]:
        return [self.view(b) for _, b in sorted(self._backups.items())]

    def view(self, backup: _Backup) -> dict:
        p = backup.point
        disks = []
        for disk, v in backup.views.items():
            export = export_name(backup.name, disk)
            uri = f"nbd+unix:///{export}?socket={self.nbd_socket}" if self.nbd_socket is not None else None
            disks.append({"disk": disk, "size_bytes": v.size, "export": export if uri else None, "uri": uri})
        return {"vm": backup.name, "began": iso_time(backup.began_ns), "began_ns": backup.began_ns,
                "recovery_point": {"id": p.id, "sequence": p.sequence, "time_ns": p.time_ns, "time": iso_time(p.time_ns),
                                   "consistency": p.consistency.value},
                "disks": disks, "read_bytes": backup.read_bytes}

    # --- reading (event loop: thinning swaps logs between two loop steps) ---------------------
    def _disk(self, name: str, disk: str) -> tuple[_Backup, PointView]:
        backup = self._backups.get(name)
        if backup is None:
            raise NotFoundError(f"no backup of VM {name} is held", hint=f"hvrctl backup begin {name}")
        view = backup.views.get(disk)
        if view is None:
            raise NotFoundError(f"the backup of VM {name} has no disk {disk!r}",
                                hint=f"hvrctl backup get {name} lists its disks")
        return backup, view

    def _range(self, view: PointView, offset: int, length: int | None, limit: int | None) -> tuple[int, int]:
        if length is None:
            length = view.size - offset
        if offset < 0 or length < 0 or offset + length > view.size or (limit is not None and length > limit):
            raise UsageError(f"range {offset}+{length} is outside the disk ({view.size} bytes)"
                             + (f" or over {limit} bytes" if limit is not None else ""))
        return offset, length

    def extents(self, name: str, disk: str, offset: int, length: int | None) -> list[list]:
        """The data and hole runs of a disk at the backup's point: ``[offset, length, data]``."""
        _, view = self._disk(name, disk)
        offset, length = self._range(view, offset, length, None)
        runs: list[list] = []
        for o, n, data in view.extents(offset, length) if length else ():
            if runs and runs[-1][2] == data and runs[-1][0] + runs[-1][1] == o:
                runs[-1][1] += n
            else:
                runs.append([o, n, data])
        return runs

    def read(self, name: str, disk: str, offset: int, length: int) -> bytes:
        backup, view = self._disk(name, disk)
        offset, length = self._range(view, offset, length, MAX_READ_BYTES)
        data = view.pread(offset, length)
        backup.read_bytes += len(data)
        return data

    async def close(self) -> None:
        for name in list(self._backups):
            await self._withdraw(name, "listener_stopping")
            backup = self._backups[name]
            self._backups = {k: v for k, v in self._backups.items() if k != name}
            self._close(backup)
            event(log, "backup_ended", logging.WARNING, vm=name, reason="listener_stopping", point=backup.point.id)

    # --- internals ----------------------------------------------------------------------------
    async def _replica(self, name: str) -> Replica:
        rep = await finish_in_thread(self.store.replica_by_name, name)
        if rep is None:
            raise NotFoundError(f"no replica VM named {name!r} on this server", hint="hvrctl replica get lists them")
        return rep

    def _open(self, rep: Replica, history, point: Point) -> _Backup:
        backup = _Backup(rep.vm_id, rep.name, point, time.time_ns(), {}, {}, [])
        try:
            for disk in rep.disks:
                fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
                backup.fds.append(fd)
                view = PointView(history, point.id, disk.disk_id, fd, disk.size_bytes)
                backup.views[disk.name] = view
                name = export_name(rep.name, disk.name)
                info = ExportInfo(name=name, size=disk.size_bytes, read_only=True,
                                  description=f"backup of {rep.name}: disk {disk.name} at recovery point {point.id} "
                                              f"({point.consistency.value})")
                backup.exports[name] = Export(info, view, group_name(rep.name))
        except BaseException:
            self._close(backup)
            raise
        return backup

    @staticmethod
    def _close(backup: _Backup) -> None:
        backup.views.clear()
        backup.exports.clear()
        for fd in backup.fds:
            os.close(fd)
        backup.fds.clear()

    async def _withdraw(self, name: str, reason: str) -> None:
        """Withdraw the backup's exports (their connections are closed) and wait for their reads in flight."""
        backup = self._backups[name]
        exports, backup.exports = backup.exports, {}
        for callback in self._callbacks:
            callback(group_name(name), reason)
        if self.quiesce is not None:
            await self.quiesce(group_name(name))
        exports.clear()
