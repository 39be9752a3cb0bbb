"""Replication on the primary: the operator's verbs and one task per protected VM.

The :class:`ReplicationManager` belongs to the agent's composition root
(:mod:`hvr_agent.daemon`); it runs one task per relationship in its own
``TaskGroup`` and answers the verbs (enable, initial start, sync-now, suspend,
resume, remove, change the recovery history settings, status, measure).  The
work is done in rooms of its own:

* :mod:`hvr_agent.relationship`: the record in memory and its only writer;
* :mod:`hvr_agent.driver`: the per-VM task: the step the state table names,
  retries and failures;
* :mod:`hvr_agent.initial_copy` (``InitialReplicationInProgress``): cut the VM
  once (the closed logs up to that sequence S are contained in the images:
  they are deleted), record ``next_sequence = S + 1``, then, per disk, ask
  the replica for its durable offset and send windows of allocated data from
  there; finally ``initial/complete`` with ``next_sequence`` S + 1.  Writes
  made meanwhile are in logs S + 1, S + 2, ... and are shipped right after;
* :mod:`hvr_agent.cycles` (``Replicating``): every ``frequency_s`` (or on
  sync-now) cut the VM, then upload every closed log not yet acknowledged,
  strictly in sequence order.  A cut that falls due while a cycle uploads
  happens then (if no other cycle waits), and the next spool is built
  meanwhile.  After a cycle's acknowledgement: ``next_sequence`` is recorded
  (the commit point); its logs and spool file are deleted in the background;
* :mod:`hvr_agent.housekeeping`: logs and spool files; :mod:`hvr_agent.replication_report`:
  status and measure; :mod:`hvr_common.pure.schedule`: when to cut, missed
  cycles, the initial schedule, backoff.

Invariants:

* R1 A log is deleted only when its content is on the replica: after the
  acknowledgement of its cycle, or when it predates the initial cut.
* R2 Sequence k + 1 is uploaded only after k was acknowledged.
* R3 Only transient errors are retried (backoff 1 s doubling to 300 s); a
  permanent one puts the VM in ``Error`` with the replica's message.
* R4 The relationship record is saved whole, latest version last, so the
  database never goes back to an older state.

A crash between any two steps leaves logs that are either still needed or
older than ``next_sequence``; the latter are deleted when the task starts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from hvr_common.pure.config import AgentConfig
from hvr_common.pure.errors import ConflictError, NotFoundError, TransientError, UsageError
from hvr_common.pure.input_limits import quoted
from hvr_common.pure.names import is_host, storage_location_problem
from hvr_common.pure.monitoring import monitoring_settings
from hvr_common.pure.recovery_points import HistorySettings
from hvr_common.pure.replication_state import Action, ReplicationState, transition
from hvr_common.pure.schedule import FREQUENCIES_S, initial_is_later
from hvr_common.shell.logs import event
from hvr_agent import initial_export
from hvr_agent.driver import VmReplication
from hvr_agent.housekeeping import remove_dir
from hvr_agent.relationship import ROLE, Relationship
from hvr_agent.replica_client import ReplicaClient, ReplicaEndpoint
from hvr_agent.replica_credentials import ReplicaCredentials
from hvr_common.pure.wire.messages import DiskSpec, EnableRequest
from hvr_agent.replication_report import iso_time, measure_of, status_of
from hvr_agent.store import AgentStore, ReplicationRecord
from hvr_agent.transfers import Transfers
from hvr_agent.vms import VmRegistry

log = logging.getLogger("hvr.agent.replication")

S = ReplicationState


class ReplicationManager:
    """Every VM's replication; the admin API's entry point for the replication verbs."""

    def __init__(self, config: AgentConfig, store: AgentStore, registry: VmRegistry,
                 transfers: Transfers | None = None):
        self.config = config
        self.transfers = transfers if transfers is not None else Transfers(config.transfers)
        self.store = store
        self.registry = registry
        self.vms: dict[str, VmReplication] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._admin_lock = asyncio.Lock()
        self.primary_server = socket.getfqdn()
        registry.on_remove.append(self._vm_unregistered)

    # --- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        records = await asyncio.to_thread(self.store.list_replications)
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for rec in records:
                if rec.vm in self.registry.vms:
                    self._start(self._replication(Relationship(rec, self.store, self.registry)))
            await self._stop.wait()
            for rep in self.vms.values():
                if rep.task is not None:
                    rep.task.cancel()
        self._tg = None

    def request_stop(self) -> None:
        self._stop.set()

    def _replication(self, rel: Relationship) -> VmReplication:
        return VmReplication(rel, self.config, self.transfers)

    def _start(self, rep: VmReplication) -> None:
        self.vms[rep.name] = rep
        if self._tg is None:
            raise TransientError("the agent is starting or stopping", hint="try again in a moment")
        rep.task = self._tg.create_task(rep.run(), name=f"replication:{rep.name}")

    async def _stop_task(self, rep: VmReplication) -> None:
        task = rep.task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise

    def _vm_unregistered(self, name: str) -> None:
        rep = self.vms.pop(name, None)
        if rep is not None and rep.task is not None:
            rep.task.cancel()
            event(log, "replication_removed", vm=name, reason="VM unregistered")

    def _get(self, name: str) -> VmReplication:
        rep = self.vms.get(name)
        if rep is None:
            if name not in self.registry.vms:
                raise NotFoundError(f"no VM named {name!r} is registered", hint="hvrctl vm list shows them")
            raise NotFoundError(f"replication of VM {name!r} is not enabled",
                                hint="enable it with hvrctl vm enable NAME --replica-server HOST ...")
        return rep

    # --- verbs -------------------------------------------------------------------------------
    async def enable(self, name: str, *, replica_host: str, port: int, credentials: ReplicaCredentials,
                     frequency_s: int, compression: bool, history: HistorySettings = HistorySettings()) -> dict:
        if not is_host(replica_host):
            raise UsageError(f"replica_server must be a host name or address, not {quoted(replica_host)}")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise UsageError(f"port must be from 1 to 65535, not {quoted(port)}")
        if frequency_s not in FREQUENCIES_S or isinstance(frequency_s, bool):
            raise UsageError(f"frequency must be one of {', '.join(map(str, FREQUENCIES_S))} seconds, "
                             f"not {quoted(frequency_s)}")
        if not isinstance(compression, bool):
            raise UsageError("compression must be true or false")
        for what, path in (("key file", credentials.key_file), ("CA file", credentials.ca_file),
                           ("certificate file", credentials.cert_file),
                           ("certificate key file", credentials.cert_key_file)):
            problem = None if path is None else storage_location_problem(str(path))
            if problem is not None:
                raise UsageError(f"{what} {problem}, not {quoted(str(path))}")
        self._check_hooks(name, history)
        async with self._admin_lock:
            vm = self.registry.vms.get(name)
            if vm is None:
                raise NotFoundError(f"no VM named {name!r} is registered", hint="hvrctl vm list shows them")
            if vm.record.read_only:
                raise UsageError(f"VM {name!r} is exported read-only: it has no changes to replicate")
            if name in self.vms:
                raise ConflictError(f"replication of VM {name!r} is already enabled "
                                    f"(state {self.vms[name].rec.state.value})",
                                    hint="remove it first with hvrctl vm remove NAME --replication-only")
            state = transition(ROLE, None, Action.ENABLE)
            key, ssl_context, principal = await asyncio.to_thread(credentials.load)
            endpoint = ReplicaEndpoint(replica_host, port, credentials.tls)
            request = EnableRequest(name, vm.record.generation, frequency_s, compression,
                                    tuple(DiskSpec(d.identity.disk_id, n, d.size) for n, d in vm.disks.items()))
            async with ReplicaClient(endpoint, key, ssl_context=ssl_context) as client:
                status, _ = await client.enable(vm.record.vm_id, request)
            rec = ReplicationRecord(
                vm=name, replica_host=replica_host, replica_port=port, key_file=credentials.key_file,
                principal=principal, frequency_s=frequency_s, compression=compression, state=state,
                state_detail=None, generation=vm.record.generation, base_sequence=None, next_sequence=None,
                initial_at_ns=None, initial_started_ns=None, initial_completed_ns=None, last_replication_ns=None,
                enabled_ns=time.time_ns(), auth=credentials.auth, ca_file=credentials.ca_file,
                cert_file=credentials.cert_file, cert_key_file=credentials.cert_key_file,
            ).with_history(history).replace(settings_pending=True)
            rep = self._replication(await Relationship.add(rec, self.store, self.registry))
            self._start(rep)
        event(log, "replication_enabled", vm=name, replica=str(endpoint), principal=principal, auth=credentials.auth,
              tls=credentials.tls,
              frequency_s=frequency_s, compression=compression, replica_existed=status == 200, **history.to_json())
        return await self.status_of(rep)

    async def change_settings(self, name: str, changes: dict) -> dict:
        """Set-VMReplication: change the recovery history settings given in ``changes`` (the others stay).

        Validated whole before anything changes; the replica is told before the next step.
        """
        rep = self._get(name)
        current = rep.rec.history
        if not isinstance(changes, dict) or not changes:
            raise UsageError("give at least one setting to change: recovery_history, fine_window_min, "
                             "app_consistent_hours")
        settings = HistorySettings.from_json({**current.to_json(), **changes})
        self._check_hooks(name, settings)
        if settings != current:
            await rep.rel.set_history(settings)
            event(log, "replication_settings_changed", vm=name, **settings.to_json())
        return await self.status_of(rep)

    def _check_hooks(self, name: str, settings: HistorySettings) -> None:
        """Application-consistent points need freeze/thaw commands for the VM: refused without them."""
        if settings.app_consistent_hours is not None and self.config.app_consistency.hooks_for(name) is None:
            raise UsageError(f"application-consistent points of VM {name!r} need freeze and thaw commands, and "
                             "agent.toml configures none for it",
                             hint="add [app_consistency] (or [app_consistency.vm.NAME]) to agent.toml and "
                                  "restart the agent (deploy/agent.toml has a virsh example)")

    async def start_initial(self, name: str, at_ns: int | None, use_existing: bool = False) -> dict:
        rep = self._get(name)
        rel = rep.rel
        st = rel.rec.state
        if use_existing:
            await self._check_existing_copy(rep)
        if st is S.ERROR and rel.rec.initial_completed_ns is None:
            return await self.resume(name)
        if st is S.READY_FOR_INITIAL_REPLICATION and initial_is_later(at_ns, time.time_ns()):
            await rel.update(initial_at_ns=at_ns, state_detail=f"initial replication scheduled for {iso_time(at_ns)}")
            rel.wake.set()
            event(log, "initial_scheduled", vm=name, at=iso_time(at_ns))
        elif st is not S.INITIAL_REPLICATION_IN_PROGRESS:
            await rel.set_state(Action.START_INITIAL, initial_at_ns=None)
        return await self.status_of(rep)

    async def export_initial(self, name: str, directory: Path, chunk_bytes: int, report) -> dict:
        """Start-VMInitialReplication -DestinationPath (:mod:`hvr_agent.initial_export`)."""
        rep = self._get(name)
        if rep.export_lock.locked():
            raise ConflictError(f"an export of VM {name!r} is running already")
        async with rep.export_lock:
            return await initial_export.export(rep.rel, directory, chunk_bytes, report)

    async def _check_existing_copy(self, rep: VmReplication) -> None:
        """Start-VMInitialReplication -UseBackup: the replica must hold an adopted copy of every disk."""
        if rep.client is None:
            raise TransientError(f"the replication task of VM {rep.name!r} is not running",
                                 hint="hvrctl vm get NAME shows the state")
        view = await rep.client.replica_state(rep.rel.vm().record.vm_id)
        offsets = view.get("initial") or {}
        short = [d.name for d in rep.rel.disks() if int(offsets.get(str(d.disk_id), 0)) < d.size_bytes]
        if short or view.get("state") not in (S.WAITING_FOR_INITIAL_REPLICATION.value,
                                                          S.INITIAL_REPLICATION_IN_PROGRESS.value, S.REPLICATING.value):
            raise ConflictError(f"the replica server holds no existing copy of VM {rep.name!r} "
                                f"(disks without one: {', '.join(short) or 'none'}; replica {view.get('state')})",
                                hint=f"on the replica server: hvrctl replica adopt {rep.name} --vm-id "
                                     f"{rep.rel.vm().record.vm_id} --disk PATH ..., before vm enable")

    async def sync_now(self, name: str, wait: bool) -> dict:
        rep = self._get(name)
        if rep.rec.state is not S.REPLICATING:
            raise ConflictError(f"VM {name!r} is {rep.rec.state.value}: only a replicating VM can sync now",
                                hint="hvrctl vm get NAME shows why; hvrctl vm resume NAME if it is suspended")
        if self._stop.is_set() or rep.task is None or rep.task.done():
            raise TransientError(f"the replication task of VM {name!r} is not running (the agent is stopping?)",
                                 hint="try again once the agent runs; hvrctl vm get NAME shows the state")
        fut = rep.cycles.request_sync(wait)
        if fut is None:
            return {"vm": name, "requested": True}
        return await fut

    async def suspend(self, name: str) -> dict:
        rep = self._get(name)
        await rep.rel.set_state(Action.SUSPEND, "suspended by the operator")
        event(log, "replication_suspended", vm=name)
        return await self.status_of(rep)

    async def resume(self, name: str) -> dict:
        rep = self._get(name)
        st = rep.rec.state
        if st is S.ERROR:
            action = Action.RESUME if rep.rec.initial_completed_ns is not None else Action.START_INITIAL
            await self._stop_task(rep)
            await rep.rel.set_state(action)
            fresh = self._replication(rep.rel.fresh())
            self._start(fresh)
            rep = fresh
        else:
            rep.cycles.restart_schedule()
            await rep.rel.set_state(Action.RESUME)
        event(log, "replication_resumed", vm=name, state=rep.rec.state.value)
        return await self.status_of(rep)

    async def resync(self, name: str, at_ns: int | None, cancel: bool) -> dict:
        """Resume-VMReplication -Resynchronize: start (now or at ``at_ns``) or cancel a resynchronization."""
        rep = self._get(name)
        st = rep.rec.state
        if cancel:
            await rep.rel.set_state(Action.CANCEL_RESYNC, "resynchronization cancelled: hvrctl vm resync NAME "
                                                         "starts it again")
            rep.resync.cancel()
            event(log, "resync_cancelled", vm=name)
        elif st is S.RESYNCHRONIZING or st is S.RESYNCHRONIZE_SUSPENDED:
            raise ConflictError(f"VM {name!r} is {st.value} already",
                                hint="hvrctl vm resume NAME continues a suspended one")
        else:
            rep.resync.schedule(at_ns)
            if st is not S.WAITING_FOR_START_RESYNCHRONIZE:
                await rep.rel.set_state(Action.REQUIRE_RESYNC, "resynchronization requested by the operator")
            rep.rel.wake.set()
            event(log, "resync_requested", vm=name, at=iso_time(at_ns) if at_ns else "now")
        return await self.status_of(rep)

    async def verify(self, name: str, repair: bool) -> dict:
        """Compare the replica at its latest point with the primary; change nothing (unless ``repair``)."""
        rep = self._get(name)
        if rep.client is None:
            raise TransientError(f"the replication task of VM {name!r} is not running",
                                 hint="hvrctl vm get NAME shows the state")
        return await rep.verify.run(rep.client, repair)

    async def remove(self, name: str) -> dict:
        async with self._admin_lock:
            rep = self._get(name)
            del self.vms[name]
            await self._stop_task(rep)
            await rep.rel.remove()
            await asyncio.to_thread(remove_dir, rep.outbox)
        event(log, "replication_removed", vm=name, reason="operator")
        return {"vm": name, "removed": True}

    # --- reports -----------------------------------------------------------------------------
    async def status(self, name: str | None = None) -> list[dict]:
        reps = [self._get(name)] if name is not None else list(self.vms.values())
        return [await self.status_of(rep) for rep in reps]

    async def status_of(self, rep: VmReplication) -> dict:
        return await status_of(rep, self.primary_server)

    async def measure(self, name: str) -> dict:
        return await measure_of(self._get(name), self.primary_server)

    async def reset_statistics(self, name: str) -> dict:
        """Reset-VMReplicationStatistics: a new collection starts now (a Warning from the window clears)."""
        self._get(name)
        await asyncio.to_thread(self.store.reset_statistics, name, time.time_ns())
        event(log, "statistics_reset", vm=name)
        return await self.measure(name)

    # --- server settings (Set-VMReplicationServer's monitoring part) ------------------------------
    async def server_view(self) -> dict:
        settings = monitoring_settings(await asyncio.to_thread(self.store.monitoring))
        return {"server_name": self.primary_server, **settings.to_dict()}

    async def change_server(self, changes: dict) -> dict:
        allowed = {"monitoring_interval_s", "monitoring_start", "latency_limit_s"}
        unknown = set(changes) - allowed
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}",
                             hint=f"settings of the agent are: {', '.join(sorted(allowed))}")
        current = await asyncio.to_thread(self.store.monitoring)
        settings = monitoring_settings({**current, **changes})  # validates all before storing any
        await asyncio.to_thread(self.store.set_monitoring, settings.to_dict())
        event(log, "server_settings_changed", changes=changes)
        return await self.server_view()
