"""Test failover (Start-VMFailover -AsTest): a replica VM's recovery point served over NBD as "NAME - Test".

Each disk of the test VM is the chosen point (:class:`PointView`) under a
throw-away :class:`Overlay`, exported by the listener's NBD server as
``NAME-test/DISK``.  Starting costs one empty sparse file per disk whatever
the disk's size; apply goes on meanwhile and the view keeps reading its
point.  The test pins its point (thinning keeps it) and records
LastTestFailoverTime; stopping withdraws the exports (their connections are
dropped), deletes the overlays and unpins the point.

This class is an :class:`~hvr_common.block.catalogue.ExportCatalogue` (the listener serves it with its
backups through :class:`~hvr_common.block.catalogue.Catalogues`).

A test failover lives as long as the listener process: at start, tests left
by an earlier process are ended (``test_failover_ended``, reason
``listener_restarted``), their overlays deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hvr_common.block.catalogue import Export, Withdrawn
from hvr_common.block.overlay import Overlay
from hvr_common.pure.errors import HvrError, NotFoundError, UsageError
from hvr_common.pure.input_limits import is_int_in
from hvr_common.pure.nbd_events import ExportInfo
from hvr_common.pure.recovery_points import Point
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_listener.point_view import PointView
from hvr_listener.recovery_history import Histories
from hvr_listener.replica_access import ReplicaAccess
from hvr_listener.store import ListenerStore, Replica

log = logging.getLogger("hvr.listener.test_failover")

TEST_DIR = "test-failover"


def test_vm_name(name: str) -> str:
    return f"{name} - Test"


def export_name(name: str, disk: str) -> str:
    return f"{name}-test/{disk}"


@dataclass
class _Test:
    vm_id: uuid.UUID
    name: str
    point: Point
    started_ns: int
    exports: dict[str, Export]
    fds: list[int]
    overlays: list[Overlay]


class TestFailovers:
    def __init__(self, store: ListenerStore, access: ReplicaAccess, histories: Histories, nbd_socket: Path | None):
        self.store = store
        self.access = access
        self.histories = histories
        self.nbd_socket = nbd_socket
        self._tests: dict[str, _Test] = {}  # by VM name
        self._callbacks: list[Withdrawn] = []
        # Waits until the requests in flight on a withdrawn group's connections have finished (the NBD
        # server's wait_group_idle); an overlay is closed only after that.
        self.quiesce: Callable[[str], Awaitable[None]] | None = None

    # --- ExportCatalogue --------------------------------------------------------------------
    def lookup(self, name: str) -> Export | None:
        vm, _, _ = name.partition("-test/")
        test = self._tests.get(vm)
        return test.exports.get(name) if test is not None else None

    def exports(self) -> list[ExportInfo]:
        return sorted((e.info for t in self._tests.values() for e in t.exports.values()), key=lambda i: i.name)

    def on_withdrawn(self, callback: Withdrawn) -> None:
        self._callbacks.append(callback)

    # --- verbs ------------------------------------------------------------------------------
    async def start(self, name: str, point_id: int | None) -> dict:
        if self.nbd_socket is None:
            raise UsageError("test failover needs the listener's NBD socket, and none is configured",
                             hint="set nbd_socket in listener.toml and restart hvr-listener")
        if point_id is not None and not is_int_in(point_id, 1):  # 1 to 2^63 - 1, as stored
            raise UsageError(f"recovery_point must be a point id (a positive whole number), not {point_id!r:.80}")
        rep = await self._replica(name)
        async with self.access.lock(rep.vm_id), self.access.image_lock(rep.vm_id):
            rep = await self._replica(name)  # again, under the locks
            if rep.state is not ReplicationState.REPLICATING:
                raise error("wrong_state", f"VM {name} is {rep.state.value}: only a replicating VM has recovery "
                            "points to test", hint="wait for initial replication to complete (hvrctl replica get "
                            f"{name})" if rep.state in (ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                                                        ReplicationState.INITIAL_REPLICATION_IN_PROGRESS) else None)
            if name in self._tests or await finish_in_thread(self.store.test_failover, rep.vm_id) is not None:
                raise error("test_failover_running", f"a test failover of VM {name} is already running",
                            hint=f"stop it first: hvrctl failover stop {name} --as-test")
            history = await finish_in_thread(self.histories.load, rep)
            points = history.points
            if not points:
                raise error("unknown_recovery_point", f"VM {name} has no recovery point yet",
                            hint="one appears once the first cycle after the initial copy is applied")
            point = points[-1] if point_id is None else next((p for p in points if p.id == point_id), None)
            if point is None or (point is not points[-1] and not point.capturing):
                raise error("unknown_recovery_point", f"VM {name} has no recovery point {point_id}",
                            hint=f"hvrctl recovery-points list {name} shows them")
            if point.capturing is False:  # the latest, but a cycle began replacing it without capturing
                raise error("recovery_point_changing", f"the latest recovery point of VM {name} is being "
                            "replaced by the cycle now applying", hint="try again once that cycle is applied")
            test = await finish_in_thread(self._open, rep, history, point)
            try:
                await finish_in_thread(self.store.start_test_failover, rep.vm_id, point.id, test.started_ns)
            except BaseException:
                await finish_in_thread(self._close, test)
                raise
            self._tests[name] = test
        event(log, "test_failover_started", vm=name, point=point.id, seq=point.sequence,
              disks=len(test.exports))
        return self.view(test)

    async def stop(self, name: str) -> dict:
        rep = await self._replica(name)
        async with self.access.lock(rep.vm_id), self.access.image_lock(rep.vm_id):
            test = self._tests.pop(name, None)
            if test is None and await finish_in_thread(self.store.test_failover, rep.vm_id) is None:
                raise NotFoundError(f"no test failover of VM {name} is running",
                                    hint=f"start one with hvrctl failover start {name} --as-test")
            written = 0
            if test is not None:
                await self._withdraw(name, "test_failover_stopped")
                written = sum(o.delta_bytes for o in test.overlays)
                await finish_in_thread(self._close, test)
            await finish_in_thread(self.store.stop_test_failover, rep.vm_id)
            try:  # the test has ended; the point it pinned may go now (else after the next cycle)
                history = await finish_in_thread(self.histories.load, rep)
                await self.histories.thin(rep, history)  # the other pins (backups, kept-aside) still hold
            except (OSError, sqlite3.Error, HvrError) as exc:
                event(log, "recovery_points_thinning_failed", logging.WARNING, vm=name, error=str(exc),
                      hint="retried after the next cycle")
        event(log, "test_failover_ended", vm=name, reason="operator", bytes=written)
        return {"vm": name, "test_vm": test_vm_name(name), "stopped": True, "deleted_bytes": written}

    def status(self, name: str) -> dict | None:
        test = self._tests.get(name)
        return self.view(test) if test is not None else None

    def view(self, test: _Test) -> dict:
        return {
            "vm": test.name, "test_vm": test_vm_name(test.name), "started_ns": test.started_ns,
            "recovery_point": {"id": test.point.id, "sequence": test.point.sequence, "time_ns": test.point.time_ns,
                               "consistency": test.point.consistency.value},
            "disks": [{"disk": e.name.split("/", 1)[1], "export": e.name,
                       "uri": f"nbd+unix:///{e.name}?socket={self.nbd_socket}"} for e in test.exports.values()],
            "written_bytes": sum(o.delta_bytes for o in test.overlays),
        }

    async def end_leftovers(self) -> int:
        """At start: tests an earlier listener process left are ended and their overlays deleted."""
        rows = await finish_in_thread(self.store.test_failovers)
        for row in rows:
            rep = await finish_in_thread(self.store.replica, row.vm_id)
            if rep is not None:
                await finish_in_thread(shutil.rmtree, rep.storage_dir / TEST_DIR, True)
            await finish_in_thread(self.store.stop_test_failover, row.vm_id)
            event(log, "test_failover_ended", logging.WARNING, vm=rep.name if rep else str(row.vm_id),
                  reason="listener_restarted", point=row.point_id)
        return len(rows)

    async def close(self) -> None:
        for name in list(self._tests):
            test = self._tests.pop(name)
            await self._withdraw(name, "listener_stopping")
            await finish_in_thread(self._close, test)

    # --- internals ----------------------------------------------------------------------------
    async def _replica(self, name: str) -> Replica:
        rep = await finish_in_thread(self.store.replica_by_name, name)
        if rep is None:
            raise NotFoundError(f"no replica VM named {name!r} on this server", hint="hvrctl replica get lists them")
        return rep

    def _open(self, rep: Replica, history, point: Point) -> _Test:
        test_dir = rep.storage_dir / TEST_DIR
        shutil.rmtree(test_dir, ignore_errors=True)
        test_dir.mkdir(mode=0o700)
        test = _Test(rep.vm_id, rep.name, point, time.time_ns(), {}, [], [])
        try:
            for disk in rep.disks:
                fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
                test.fds.append(fd)
                view = PointView(history, point.id, disk.disk_id, fd, disk.size_bytes)
                overlay = Overlay(view, test_dir / f"{disk.name}.delta")
                test.overlays.append(overlay)
                name = export_name(rep.name, disk.name)
                info = ExportInfo(name=name, size=disk.size_bytes, read_only=False,
                                  description=f"{test_vm_name(rep.name)}: disk {disk.name} at recovery point "
                                              f"{point.id}")
                test.exports[name] = Export(info, overlay, rep.name)
        except BaseException:
            self._close(test)
            raise
        return test

    @staticmethod
    def _close(test: _Test) -> None:
        for overlay in test.overlays:
            overlay.discard()
        for fd in test.fds:
            os.close(fd)
        test.fds.clear()
        if test.overlays:
            shutil.rmtree(test.overlays[0].delta_path.parent, ignore_errors=True)

    async def _withdraw(self, name: str, reason: str) -> None:
        """Withdraw the test VM's exports (their connections are closed) and wait for their requests in flight."""
        for callback in self._callbacks:
            callback(name, reason)
        if self.quiesce is not None:
            await self.quiesce(name)

