"""Failover of a replica VM (Start/Stop/Complete-VMFailover) on the replica server: the listener's half.

Each verb finds the replica by name, takes its per-VM lock and then its image
lock (the order of :mod:`hvr_listener.replica_access`), reads the replica and
its failover row again under them, asks the rules
(:mod:`hvr_common.pure.failover`) and only then changes anything.  Every
step is recorded before the next begins, so repeating a verb after a crash
at any point finishes it (``docs/state-machine.md``, "Failover"):

* **start**: (0) to the latest point: the cycles received durably but not yet
  applied are applied first (the applier is woken and awaited, outside the
  locks, up to ``APPLY_WAIT_S``; progress logged as ``failover_waiting_apply``);
  (1) preconditions and the split-brain guard; (2) one
  transaction: the failover row, FailedOverWaitingCompletion, generation
  g -> g+1 (cycles and heartbeats of g are refused from then on: 409
  ``stale_generation``); (3) the chosen point's disks written as sparse files
  (:mod:`hvr_listener.failover_disks`).  Repeated: the disks a crash left
  unmade are made, the same answer is given.
* **stop**: the failover disks deleted, then one transaction: the row gone,
  generation g, Replicating.  Every recovery point and the replica images
  were never touched.  Refused once complete began.
* **complete**: the row's step to ``completing``; the replica images, undo
  logs, cycles and points removed; then one transaction: FailedOver, step
  ``completed``.  The FailedOver row stays: its generation fences the old
  primary.

While a failover exists its point is pinned (thinning keeps it) and the
applier leaves the replica alone (it applies only Replicating replicas).

``HVR_TEST_FAILOVER_KILL`` (read here, set only by tests) names a step after
which the process kills itself with SIGKILL, to prove the repeat/cancel paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable

from aiohttp import web

from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.failover import (
    Failover, FailoverStep, check_complete, check_restart, check_start, check_stop, choose_point, guard,
    raised_generation,
)
from hvr_common.pure.replication_state import InvalidTransition, ReplicationState
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.files import fsync_dir
from hvr_common.shell.http_middleware import read_json_object
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_listener import failover_disks
from hvr_listener.recovery_history import Histories, points_dir
from hvr_listener.replicas import ReplicaService
from hvr_listener.store import Replica

log = logging.getLogger("hvr.listener.failover")

KILL_ENV = "HVR_TEST_FAILOVER_KILL"
APPLY_WAIT_S = 90.0  # failover start to the latest point: how long the applier may take to catch up (< hvrctl's 120 s)
APPLY_POLL_S = 0.2
APPLY_PROGRESS_S = 5.0


def _kill_point(step: str) -> None:
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class Failovers:
    def __init__(self, service: ReplicaService, histories: Histories, primary_alive_s: int,
                 backup_held: Callable[[str], object] | None = None, apply_wait_s: float = APPLY_WAIT_S):
        self.service = service
        self.apply_wait_s = apply_wait_s
        self.store = service.store
        self.histories = histories
        self.primary_alive_s = primary_alive_s
        self.backup_held = backup_held or (lambda name: None)  # a backup's view of the VM, or None
        histories.pin_sources.append(self.pins)

    def pins(self, vm_id: uuid.UUID) -> set[int]:
        """The point a failover stands on (worker thread)."""
        row = self.store.failover(vm_id)
        return {row.point_id} if row is not None else set()

    # --- verbs ------------------------------------------------------------------------------
    async def start(self, name: str, point_id: int | None, force: bool) -> dict:
        deadline = time.monotonic() + self.apply_wait_s
        waited = 0
        while True:
            rep = await self._replica(name)
            if point_id is None:  # the latest point: every cycle received durably is applied first
                waited += await self._wait_applied(rep, deadline)
            async with self.service.lock(rep.vm_id), self.service.image_lock(rep.vm_id):
                rep = await self._replica(name)
                row = await finish_in_thread(self.store.failover, rep.vm_id)
                if row is None:
                    if point_id is None and _unapplied(rep):
                        continue  # one more arrived before the locks: wait for it too (outside them)
                    row = await self._begin(rep, point_id, force)
                    rep = await self._replica(name)
                else:
                    check_restart(name, row, point_id)
                if row.step is FailoverStep.WAITING_COMPLETION:
                    await self._make_disks(rep, row)
            return self.view(rep, row) | ({"applied_before": waited} if waited else {})

    async def stop(self, name: str) -> dict:
        rep = await self._replica(name)
        async with self.service.lock(rep.vm_id), self.service.image_lock(rep.vm_id):
            rep = await self._replica(name)
            row = await finish_in_thread(self.store.failover, rep.vm_id)
            check_stop(name, row)
            await finish_in_thread(failover_disks.remove, rep)
            _kill_point("disks_removed")
            if not await finish_in_thread(self.service.states.cancel_failover, rep, row):
                raise InvalidTransition(f"the replication state of VM {name} changed while its failover was "
                                        "cancelled")
        self.service.wake_applier.set()
        event(log, "failover_cancelled", vm=name, point=row.point_id, generation=row.old_generation)
        rep = await self._replica(name)
        return {"name": name, "vm_id": str(rep.vm_id), "generation": rep.generation, "state": rep.state.value,
                "recovery_point": row.point_id, "cancelled": True}

    async def complete(self, name: str) -> dict:
        rep = await self._replica(name)
        async with self.service.lock(rep.vm_id), self.service.image_lock(rep.vm_id):
            rep = await self._replica(name)
            row = await finish_in_thread(self.store.failover, rep.vm_id)
            check_complete(name, row)
            if row.step is not FailoverStep.COMPLETED and self.backup_held(name) is not None:
                raise error("backup_running", f"a backup of VM {name} is held: it reads the recovery history "
                            "that completing removes", hint=f"end it first: hvrctl backup end {name}")
            if row.step is FailoverStep.WAITING_COMPLETION:
                await self._make_disks(rep, row)  # a crash may have left some unmade
                await finish_in_thread(self.store.set_failover_step, rep.vm_id, row.step, FailoverStep.COMPLETING)
                _kill_point("completing")
            if row.step is not FailoverStep.COMPLETED:
                await finish_in_thread(self.histories.forget, rep.vm_id)
                await finish_in_thread(_remove_history, rep)
                await finish_in_thread(self.store.forget_history, rep.vm_id)
                _kill_point("history_removed")
                if not await finish_in_thread(self.service.states.complete_failover, rep, time.time_ns()):
                    raise InvalidTransition(f"the replication state of VM {name} changed while its failover was "
                                            "completed")
                event(log, "failover_completed", vm=name, point=row.point_id, generation=row.generation)
            rep = await self._replica(name)
            row = await finish_in_thread(self.store.failover, rep.vm_id)
        return self.view(rep, row)

    # --- views ------------------------------------------------------------------------------
    @staticmethod
    def view(rep: Replica, row: Failover) -> dict:
        return {"name": rep.name, "vm_id": str(rep.vm_id), "generation": rep.generation,
                "recovery_point": row.point_id, "state": rep.state.value, **_row_view(row),
                "disks": failover_disks.disk_views(rep)}

    def status(self, vm_id: uuid.UUID) -> dict | None:
        """The failover of a replica for ``replica get`` (worker thread), or None."""
        row = self.store.failover(vm_id)
        return _row_view(row) | {"recovery_point": row.point_id} if row is not None else None

    # --- internals ----------------------------------------------------------------------------
    async def _wait_applied(self, rep: Replica, deadline: float) -> int:
        """Until the applier applied every cycle received (the replica Replicating; outside the locks: the
        applier takes the image lock); how many it applied meanwhile.  Past ``deadline``: 503
        ``recovery_point_changing`` (nothing changed; repeat, or name an older point)."""
        first, said = rep.last_applied_sequence, 0.0
        while _unapplied(rep):
            now = time.monotonic()
            if now >= deadline:
                raise error("recovery_point_changing",
                            f"VM {rep.name} has cycles received but not applied yet (applied {rep.last_applied_sequence}"
                            f" of {rep.last_received_sequence}): the latest point would miss them",
                            hint=f"repeat hvrctl failover start {rep.name} once they are applied (hvrctl replica get "
                                 f"{rep.name}), or name an older point with --recovery-point",
                            detail={"applied": rep.last_applied_sequence, "received": rep.last_received_sequence})
            if now - said >= APPLY_PROGRESS_S:
                event(log, "failover_waiting_apply", vm=rep.name, applied=rep.last_applied_sequence,
                      received=rep.last_received_sequence, left_s=round(deadline - now, 1))
                said = now
            self.service.wake_applier.set()
            await asyncio.sleep(APPLY_POLL_S)  # the applier's progress is read from the store
            rep = await self._replica(rep.name)
        return rep.last_applied_sequence - first

    async def _replica(self, name: str) -> Replica:
        rep = await finish_in_thread(self.store.replica_by_name, name)
        if rep is None:
            raise NotFoundError(f"no replica VM named {name!r} on this server", hint="hvrctl replica list")
        return rep

    async def _begin(self, rep: Replica, point_id: int | None, force: bool) -> Failover:
        running_test = await finish_in_thread(self.store.test_failover, rep.vm_id)
        check_start(rep.name, rep.state, running_test is not None)
        beat = await finish_in_thread(self.store.heartbeat, rep.vm_id)
        guard(rep.name, rep.principal, beat, time.time_ns(), self.primary_alive_s, force)
        history = await finish_in_thread(self.histories.load, rep)
        point = choose_point(rep.name, history.points, point_id)
        row = Failover(point.id, point.sequence, point.time_ns, rep.generation, raised_generation(rep.generation),
                       FailoverStep.WAITING_COMPLETION, time.time_ns(), force)
        if not await finish_in_thread(self.service.states.fail_over, rep, row):
            raise InvalidTransition(f"the replication state of VM {rep.name} changed while it was failed over")
        event(log, "failover_started", vm=rep.name, point=point.id, seq=point.sequence, generation=row.generation,
              forced=force, heartbeat_age_s=round((time.time_ns() - beat.received_ns) / 1e9, 1) if beat else None)
        _kill_point("started")
        return row

    async def _make_disks(self, rep: Replica, row: Failover) -> None:
        history = await finish_in_thread(self.histories.load, rep)
        await finish_in_thread(failover_disks.materialize, rep, history, row.point_id,
                               lambda disk: _kill_point("disk_written"))
        event(log, "failover_disks_ready", vm=rep.name, point=row.point_id, disks=len(rep.disks))


def _unapplied(rep: Replica) -> bool:
    """Cycles received durably but not applied yet, which the applier will apply (the replica Replicating)."""
    return rep.state is ReplicationState.REPLICATING and rep.last_received_sequence > rep.last_applied_sequence


def _row_view(row: Failover) -> dict:
    return {"step": row.step.value, "point_sequence": row.point_sequence, "point_time_ns": row.point_time_ns,
            "old_generation": row.old_generation, "started_ns": row.started_ns, "forced": row.forced,
            "completed_ns": row.completed_ns}


def _remove_history(rep: Replica) -> None:
    """The replica's images, undo logs and stored cycles (complete): the failover disks are the VM's now."""
    for disk in rep.disks:
        try:
            os.unlink(disk.path)
        except FileNotFoundError:
            pass
    for sub in (points_dir(rep), rep.storage_dir / "cycles", rep.storage_dir / "incoming"):
        shutil.rmtree(sub, ignore_errors=True)
    fsync_dir(rep.storage_dir)


# --- the admin API's routes ---------------------------------------------------------------
FAILOVERS = web.AppKey("failovers", Failovers)


async def _start(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    unknown = sorted(set(body) - {"recovery_point", "force"})
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise UsageError("field 'force' must be true or false")
    return web.json_response(await request.app[FAILOVERS].start(request.match_info["name"],
                                                                body.get("recovery_point"), force))


async def _stop(request: web.Request) -> web.Response:
    return web.json_response(await request.app[FAILOVERS].stop(request.match_info["name"]))


async def _complete(request: web.Request) -> web.Response:
    return web.json_response(await request.app[FAILOVERS].complete(request.match_info["name"]))


def register(app: web.Application, failovers: Failovers) -> None:
    """``POST/DELETE /v1/replicas/{name}/failover``, ``POST /v1/replicas/{name}/failover/complete``."""
    app[FAILOVERS] = failovers
    app.router.add_post("/v1/replicas/{name}/failover", _start)
    app.router.add_delete("/v1/replicas/{name}/failover", _stop)
    app.router.add_post("/v1/replicas/{name}/failover/complete", _complete)
