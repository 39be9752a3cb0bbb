"""Failover on the agent: a planned failover prepared here, a failed-over VM served here, and its reverse.

On the primary (``Start-VMFailover -Prepare``; docs/failover.md, "On the primary"):

1. ``prepare``: the ``stop_vm`` hook; refused (``vm_running``) while any NBD
   client is connected to the VM's disks; the VM's exports take no new client;
   a final cut shipped and acknowledged; the compare engine (the verify
   machinery) waits until the replica applied it and finds no difference; then
   ``PreparedForFailover`` with ``prepared_sequence`` (the commit point).  A
   prepared VM ships nothing more and heartbeats ``running: false``.
2. ``cancel``: back to ``Replicating``, the exports take clients again.

Only the state is durable: a crash before the commit point leaves
``Replicating`` (the exports open again at restart); repeating ``prepare``
does every step again, each being idempotent (a cut with nothing written,
a verify).  At start the exports of prepared VMs are closed again (:meth:`load`).

On the new primary (the replica host after ``hvrctl failover start``):

3. ``serve``: register the failover disks the listener made under the VM's
   name, with its VM id, disk ids and raised generation (bitmap tracking), in
   failover status ``waiting_completion``; then ``define_vm`` and ``start_vm``.
   Recording the VM is the commit point; repeating after a crash or a failed
   hook finds it and runs the hooks not yet run.
4. ``withdraw`` (``DELETE``, the failover is cancelled): ``stop_vm``, refused
   while NBD clients are connected, ``undefine_vm``, unregister (files stay).
5. ``complete``: failover status ``completed`` (the VM may be reversed).
6. ``reverse`` (``hvrctl vm set NAME --reverse``): enable replication towards
   the old primary's listener with the VM's generation, then the initial
   replication with ``use_existing`` (the compare engine; never a disk copy).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from hvr_common.pure.errors import ConflictError, NotFoundError, TransientError, UsageError
from hvr_common.pure.names import check_name, storage_location_problem
from hvr_common.pure.replication_state import Action, ReplicationState, transition
from hvr_common.pure.tracking_mode import TrackingMode
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.logs import event
from hvr_agent.hooks import VmHooks
from hvr_agent.relationship import ROLE
from hvr_agent.replication import ReplicationManager
from hvr_agent.store import DiskRecord, VmRecord
from hvr_agent.vms import ProtectedVm, VmRegistry

log = logging.getLogger("hvr.agent.failover")

S = ReplicationState
WAITING = "waiting_completion"
COMPLETED = "completed"
TASK_WAIT_S = 60.0


class Failover:
    def __init__(self, registry: VmRegistry, replication: ReplicationManager, hooks: VmHooks):
        self.registry = registry
        self.replication = replication
        self.hooks = hooks
        self._locks: dict[str, asyncio.Lock] = {}
        self._hooks_done: dict[str, set[str]] = {}  # served VM -> the serve hooks that ran since registration

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self) -> None:
        """At start: prepared VMs take no NBD client (before the NBD server listens)."""
        for rec in await asyncio.to_thread(self.registry.store.list_replications):
            if rec.state is S.PREPARED_FOR_FAILOVER:
                self.registry.refused.add(rec.vm)

    async def _run_hook(self, hook: str, vm: ProtectedVm) -> None:
        first = next(iter(vm.disks), "")
        await self.hooks.run(hook, vm.name, str(vm.record.vm_id), f"{vm.name}/{first}")

    def _replication_of(self, name: str):
        rep = self.replication.vms.get(name)
        if rep is None:
            raise NotFoundError(f"replication of VM {name!r} is not enabled here", hint="hvrctl vm get lists them")
        return rep

    def _check_idle(self, name: str, doing: str) -> None:
        clients = self.registry.nbd_clients(name)
        if clients:
            raise error("vm_running", f"VM {name} has {clients} NBD client(s) connected to its disks: cannot {doing} "
                                      "while it runs", detail={"nbd_clients": clients},
                        hint="shut the VM down (or configure agent.toml [hooks] stop_vm), then repeat")

    # --- planned failover, on the primary ------------------------------------------------------------
    async def prepare(self, name: str) -> dict:
        async with self._lock(name):
            rep = self._replication_of(name)
            if rep.rec.state is S.PREPARED_FOR_FAILOVER:
                self.registry.refused.add(name)
                return await self.replication.status_of(rep)
            transition(ROLE, rep.rec.state, Action.PREPARE_FAILOVER)  # wrong_state unless Replicating
            vm = rep.rel.vm()
            await self._run_hook("stop_vm", vm)
            self._check_idle(name, "prepare a planned failover")
            self.registry.refused.add(name)
            started = time.monotonic()
            try:
                self._check_idle(name, "prepare a planned failover")  # one may have connected meanwhile
                await self.replication.sync_now(name, True)  # the final cut, shipped and acknowledged
                report = await self.replication.verify(name, False)  # applied, and equal to the primary
                if report["differing_bytes"] or report["skipped_bytes"]:
                    raise ConflictError(
                        f"the replica of VM {name} differs from the primary after the final cycle "
                        f"({report['differing_bytes']} bytes differ, {report['skipped_bytes']} written meanwhile)",
                        hint="hvrctl vm verify NAME --repair, then prepare again")
                seq = report["sequence"]
                await rep.rel.set_state(Action.PREPARE_FAILOVER,
                                        f"prepared for a planned failover at cycle {seq}: on the replica server run "
                                        f"hvrctl failover start {name}; here hvrctl failover stop {name} cancels",
                                        prepared_sequence=seq)
            except BaseException:
                self.registry.refused.discard(name)
                raise
        event(log, "failover_prepared", vm=name, seq=seq, latency_s=round(time.monotonic() - started, 3))
        return await self.replication.status_of(rep)

    async def cancel(self, name: str) -> dict:
        async with self._lock(name):
            rep = self._replication_of(name)
            if rep.rec.state is S.PREPARED_FOR_FAILOVER:
                rep.cycles.restart_schedule()
                await rep.rel.set_state(Action.CANCEL_FAILOVER, "planned failover cancelled", prepared_sequence=None)
                event(log, "failover_prepare_cancelled", vm=name)
            elif rep.rec.state is not S.REPLICATING:
                raise error("not_prepared", f"VM {name} is {rep.rec.state.value}, not prepared for a failover")
            self.registry.refused.discard(name)
            return await self.replication.status_of(rep)

    # --- the failed-over VM, on the new primary --------------------------------------------------------
    async def serve(self, name: str, body: dict) -> dict:
        check_name("VM", name)
        rec = _served_record(name, body)
        async with self._lock(name):
            vm = self.registry.vms.get(name)
            if vm is None:
                for d in rec.disks:
                    size = await asyncio.to_thread(lambda p=d.path: os.stat(p).st_size)
                    if size != body_size(body, d.disk_id):
                        raise UsageError(f"failover disk {d.path} holds {size} bytes, not the "
                                         f"{body_size(body, d.disk_id)} the replica server gave")
                vm = await self.registry.register(name, [d.path for d in rec.disks],
                                                  lambda: self.registry.store.insert_vm(rec))
                self._hooks_done[name] = set()
                event(log, "failover_vm_served", vm=name, vm_id=str(rec.vm_id), generation=rec.generation,
                      recovery_point=body.get("recovery_point"), disks=[str(d.path) for d in rec.disks])
            elif (vm.record.vm_id, vm.record.generation, vm.record.failover is not None) != \
                    (rec.vm_id, rec.generation, True):
                raise ConflictError(f"a VM named {name!r} is registered here already, not this failover's "
                                    f"(VM id {vm.record.vm_id}, generation {vm.record.generation})",
                                    hint="hvrctl vm get NAME shows it")
            done = self._hooks_done.setdefault(name, set())
            for hook in ("define_vm", "start_vm"):
                if hook not in done:
                    await self._run_hook(hook, vm)
                    done.add(hook)
            return vm.status()

    def _served(self, name: str) -> ProtectedVm:
        vm = self.registry.vms.get(name)
        if vm is None or vm.record.failover is None:
            raise error("not_failed_over_vm", f"VM {name} is not a failed-over VM served by this agent",
                        hint="hvrctl vm list shows the VMs; hvrctl failover start NAME on the replica server "
                             "serves one")
        return vm

    async def withdraw(self, name: str) -> dict:
        async with self._lock(name):
            if name not in self.registry.vms:
                return {"removed": name, "already": True}
            vm = self._served(name)
            if vm.record.failover == COMPLETED or name in self.replication.vms:
                raise ConflictError(f"the failover of VM {name} was completed (or reversed): it is this host's VM",
                                    hint="hvrctl vm remove NAME unregisters it")
            await self._run_hook("stop_vm", vm)
            self._check_idle(name, "cancel its failover")
            await self._run_hook("undefine_vm", vm)
            await self.registry.remove(name)
            self._hooks_done.pop(name, None)
        event(log, "failover_vm_withdrawn", vm=name)
        return {"removed": name, "already": False}

    async def complete(self, name: str) -> dict:
        async with self._lock(name):
            vm = self._served(name)
            if vm.record.failover != COMPLETED:
                await asyncio.to_thread(self.registry.store.set_failover, name, COMPLETED)
                vm.record = replace(vm.record, failover=COMPLETED)
                event(log, "failover_vm_completed", vm=name)
            return vm.status()

    async def reverse(self, name: str, enable: Callable[[], Awaitable[dict]]) -> dict:
        """Set-VMReplication -Reverse: replicate the failed-over VM back to the old primary's listener
        (``enable``: the enabling as ``vm enable`` asked it)."""
        async with self._lock(name):
            vm = self._served(name)
            if vm.record.failover != COMPLETED:
                raise error("not_failed_over_vm", f"the failover of VM {name} is not completed",
                            hint=f"hvrctl failover complete {name} first (on this host)")
            rep = self.replication.vms.get(name)
            if rep is None:
                await enable()
                rep = self.replication.vms[name]
                event(log, "replication_reversed", vm=name, replica=f"{rep.rec.replica_host}:{rep.rec.replica_port}",
                      generation=rep.rec.generation)
            if rep.rec.state is S.READY_FOR_INITIAL_REPLICATION:
                await self._wait_task(name)
                await self.replication.start_initial(name, None, use_existing=True)
            return await self.replication.status_of(self.replication.vms[name])

    async def _wait_task(self, name: str) -> None:
        """Until the new relationship's task talks to the replica (its client exists)."""
        try:
            async with asyncio.timeout(TASK_WAIT_S):
                while self.replication.vms[name].client is None:
                    await asyncio.sleep(0.05)  # the task opens its client right after it starts
        except TimeoutError:
            raise TransientError(f"the replication task of VM {name} did not start",
                                 hint="repeat hvrctl vm set NAME --reverse ...") from None


def body_size(body: dict, disk_id: uuid.UUID) -> int:
    return next(d["size_bytes"] for d in body["disks"] if uuid.UUID(d["disk_id"]) == disk_id)


def _served_record(name: str, body: dict) -> VmRecord:
    """The VM record of a failed-over VM from ``failover/serve``'s body (validated whole)."""
    if not isinstance(body, dict) or set(body) - {"vm_id", "generation", "disks", "recovery_point"}:
        raise UsageError("the body must be {vm_id, generation, disks: [{disk_id, name, path, size_bytes}], "
                         "recovery_point}")
    try:
        vm_id = uuid.UUID(body.get("vm_id"))
    except (TypeError, ValueError, AttributeError):
        raise UsageError("field 'vm_id' must be a UUID") from None
    generation = body.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise UsageError("field 'generation' must be a positive integer")
    disks = body.get("disks")
    if not isinstance(disks, list) or not disks:
        raise UsageError("field 'disks' must be a non-empty list")
    records = []
    for d in disks:
        try:
            if not isinstance(d, dict) or set(d) != {"disk_id", "name", "path", "size_bytes"}:
                raise ValueError
            disk_id = uuid.UUID(d["disk_id"])
            size = d["size_bytes"]
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError
        except (TypeError, ValueError, AttributeError):
            raise UsageError("each disk must be {disk_id: UUID, name, path, size_bytes > 0}") from None
        check_name("disk", d["name"])
        problem = storage_location_problem(d["path"]) if isinstance(d["path"], str) else "must be a string"
        if problem is not None:
            raise UsageError(f"failover disk path {problem}")
        records.append(DiskRecord(d["name"], disk_id, Path(d["path"])))
    if len({r.name for r in records}) != len(records):
        raise UsageError("two failover disks have the same name")
    return VmRecord(name, vm_id, generation, 1, False, tuple(records), TrackingMode.BITMAP, WAITING)
