"""Applying received cycles to the replica images, in order, crash-safely.

For each replica, the oldest stored-but-unapplied cycle is applied (every
record written to the images, which are then fdatasync'd) and only then
marked applied in SQLite: that is the commit point.  A crash before it
leaves the cycle unapplied, and it is applied again from its durable file
after the restart; records are absolute writes, so this is idempotent.
A half-applied cycle is therefore never reported as applied.

Replicas apply side by side, each in a task of the applier's own, at most
``max_active_applies`` at once (a :class:`ConcurrencyLimit` the server
settings own, Hyper-V's ApplyVMLimit); one replica's cycles are always
applied one after the other, in order, by one task.

A stored cycle that cannot be applied (its bundle is damaged) is a permanent
error: the replica fails (``fail``, through :mod:`hvr_listener.replica_state`)
into Error with the reason; file-system and SQLite errors are transient and
retried with backoff.

``HVR_TEST_APPLY_HOLD`` (read here, set only by tests) names a file: while it
exists no cycle is applied, so a test can hold cycles received but not applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time

from hvr_common.pure.bundle import BundleKind
from hvr_common.pure.errors import HvrError
from hvr_common.shell.logs import event
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.concurrency_limit import ConcurrencyLimit
from hvr_common.shell.files import unlink_if_exists
from hvr_listener.bundle_io import apply_bundle
from hvr_listener.recovery_history import Histories
from hvr_common.shell.threads import finish_in_thread
from hvr_listener.replicas import ReplicaService
from hvr_listener.store import Replica

log = logging.getLogger("hvr.listener.apply")

SAFETY_WAKE_S = 30.0  # look for unapplied cycles at least this often, whatever woke us or not
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0
HOLD_ENV = "HVR_TEST_APPLY_HOLD"


class Applier:
    def __init__(self, service: ReplicaService, histories: Histories, limit: ConcurrencyLimit | None = None):
        self.service = service
        self.histories = histories
        self.store = service.store
        self.limit = limit if limit is not None else ConcurrencyLimit(1)
        self._backoff_s = 0.0
        self._retry_in_s: float | None = None
        self._interrupted: dict = {}  # vm_id -> why its apply is being retried (the backup gate asks)
        self._running: set = set()  # vm_ids whose task is applying (or waiting for a place)
        self._look_again: set = set()  # ... and which were woken for meanwhile
        self._thinned_since_start: set = set()  # vm_ids whose history was thinned once since the start

    def interrupted(self, vm_id) -> str | None:
        """Why the apply of that VM's cycles is being retried, or None when it is not."""
        return self._interrupted.get(vm_id)

    async def run(self) -> None:
        """Apply forever; woken by every received cycle, at start, and every ``SAFETY_WAKE_S``."""
        wake = self.service.wake_applier
        wake.set()
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    async with asyncio.timeout(self._retry_in_s or SAFETY_WAKE_S):
                        await wake.wait()
                except TimeoutError:
                    pass
                wake.clear()
                try:
                    replicas = await asyncio.to_thread(self.store.replicas)
                except sqlite3.Error as exc:
                    self._transient_failure("(all)", None, exc)
                    continue
                self._retry_in_s = None
                for rep in replicas:
                    if rep.state != ReplicationState.REPLICATING:
                        continue
                    if rep.vm_id in self._running:
                        self._look_again.add(rep.vm_id)
                    else:
                        self._running.add(rep.vm_id)
                        tg.create_task(self._apply_in_turn(rep), name=f"apply:{rep.name}")

    async def _apply_in_turn(self, rep: Replica) -> None:
        """One replica's pending cycles, once a place among the parallel applies is free."""
        try:
            async with self.limit.held():
                await self.apply_pending(rep)
        finally:
            self._running.discard(rep.vm_id)
            if rep.vm_id in self._look_again:  # a cycle may have arrived after the list was read
                self._look_again.discard(rep.vm_id)
                self.service.wake_applier.set()

    async def _after_commit(self, rep: Replica, history, pins: set[int]) -> None:
        """The history's view of the points, then thinning; a failure is logged and left for the next
        cycle (the cycle itself is applied and committed)."""
        try:
            await finish_in_thread(history.applied)
            await self.histories.thin(rep, history, pins)  # a pin changes only under the image lock
        except (OSError, sqlite3.Error, HvrError) as exc:
            event(log, "recovery_points_thinning_failed", logging.WARNING, vm=rep.name, error=str(exc),
                  hint="retried after the next cycle; check the replica server's free space")

    def _transient_failure(self, name: str, seq: int | None, exc: BaseException) -> None:
        """A full disk, an I/O error, a busy database: stay Replicating and try again later."""
        self._backoff_s = min(self._backoff_s * 2, MAX_RETRY_S) if self._backoff_s else FIRST_RETRY_S
        self._retry_in_s = self._backoff_s
        if seq is not None:  # one replica's task: the loop may be waiting already, wake it then
            asyncio.get_running_loop().call_later(self._backoff_s, self.service.wake_applier.set)
        event(log, "apply_retry", logging.WARNING, vm=name, seq=seq, error=str(exc), retry_in_s=self._backoff_s)

    async def _thin_once_after_start(self, rep: Replica) -> None:
        """A crash during step 4 leaves drops planned and not made, and an applied cycle does not
        apply again: thin at the first look after the start, without waiting for the next cycle."""
        self._thinned_since_start.add(rep.vm_id)
        async with self.service.image_lock(rep.vm_id):
            current = await asyncio.to_thread(self.store.replica, rep.vm_id)
            if current is None or current.state != ReplicationState.REPLICATING:
                return
            try:
                history = await finish_in_thread(self.histories.load, current)
                await self.histories.thin(current, history)
            except (OSError, sqlite3.Error, HvrError) as exc:
                event(log, "recovery_points_thinning_failed", logging.WARNING, vm=rep.name, error=str(exc),
                      hint="retried after the next cycle; check the replica server's free space")

    async def apply_pending(self, rep: Replica) -> int:
        applied = 0
        if rep.vm_id not in self._thinned_since_start:
            await self._thin_once_after_start(rep)
        hold = os.environ.get(HOLD_ENV)
        if hold and os.path.exists(hold):
            return applied
        for row in await asyncio.to_thread(self.store.unapplied_cycles, rep.vm_id):
            if row.sequence != rep.last_applied_sequence + applied + 1:
                event(log, "apply_gap", logging.ERROR, vm=rep.name, seq=row.sequence,
                      expected=rep.last_applied_sequence + applied + 1)
                break
            started = time.monotonic()
            expect = {"vm_id": rep.vm_id, "generation": row.generation, "sequence": row.sequence,
                      "kind": BundleKind.CYCLE, "disks": {d.disk_id: d.size_bytes for d in rep.disks}}
            images = {d.disk_id: d.path for d in rep.disks}
            try:
                # No initial-window thread of the same VM writes its images meanwhile.
                async with self.service.image_lock(rep.vm_id):
                    current = await asyncio.to_thread(self.store.replica, rep.vm_id)
                    if (current is None or current.created_ns != rep.created_ns
                            or current.state != ReplicationState.REPLICATING):
                        return applied  # removed (or failed, or enabled anew) while waiting for the lock
                    history = await finish_in_thread(self.histories.load, current)
                    await finish_in_thread(self.histories.kept_aside.settle, current, history)
                    pins = await finish_in_thread(self.histories.pins, rep.vm_id)
                    capture = await finish_in_thread(history.prepare_capture, current.history, pins)
                    await finish_in_thread(apply_bundle, row.path, images, expect, capture)
                    await finish_in_thread(self.store.mark_applied, rep.vm_id, row.sequence, row.log_created_ns,
                                           row.consistency)
                    # Committed: what follows is bookkeeping, whose failure does not undo the cycle.
                    await self._after_commit(current, history, pins)
            except (OSError, sqlite3.Error) as exc:
                self._interrupted[rep.vm_id] = f"cycle {row.sequence}: {exc}"
                self._transient_failure(rep.name, row.sequence, exc)
                return applied
            except HvrError as exc:  # the stored bundle itself is bad: the operator must look
                detail = f"applying cycle {row.sequence} failed: {exc}"
                event(log, "apply_failed", logging.ERROR, vm=rep.name, seq=row.sequence, error=str(exc),
                      hint=f"hvrctl replica get {rep.name}; after fixing, hvrctl replica resume {rep.name}")
                if not await asyncio.to_thread(self.service.states.fail, rep, detail):
                    event(log, "apply_failed_replica_changed", logging.WARNING, vm=rep.name, seq=row.sequence)
                return applied
            self._backoff_s = 0.0
            self._interrupted.pop(rep.vm_id, None)
            await asyncio.to_thread(unlink_if_exists, row.path)
            applied += 1
            event(log, "cycle_applied", vm=rep.name, seq=row.sequence, bytes=row.bytes,
                  latency_s=round(time.monotonic() - started, 6))
            async with self.service.applied:
                self.service.applied.notify_all()
        return applied

