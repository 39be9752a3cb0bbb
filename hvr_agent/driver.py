"""One task per replicated VM: the step its state names, run again and again; retries and failures.

The task asks the state table (:func:`hvr_common.pure.replication_state.step_for`)
what to run in the relationship's state, runs it, and waits until it is
woken (a verb, a state change) or a scheduled time comes.  A transient error
is recorded as a failed cycle and retried after the backoff (1 s doubling to
300 s, reset by any success); a permanent one puts the VM in ``Error`` with
the reason (R3).  Either way ``sync-now --wait`` callers get the error.

A heartbeat (:mod:`hvr_agent.heartbeat`) runs beside the steps while the
task runs.  A refusal for a stale generation, by any upload, commit or
heartbeat, fences the relationship (:mod:`hvr_common.pure.fencing`): Error
with a sentence saying what happened and what to do; nothing more is sent.

Before a step that talks to the replica (not while the VM is suspended or in
``Error``), recovery history settings the replica has not acknowledged yet
(``settings_pending``: after ``vm enable`` and every ``vm set`` that changed
them) are sent (``PUT /v1/replicas/{vm_id}/settings``), with the same retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from hvr_common.pure.config import AgentConfig
from hvr_common.pure.errors import CorruptError, HvrError, NotFoundError, TransientError
from hvr_common.pure.fencing import fenced_error
from hvr_common.pure.measure import CycleResult, CycleStat
from hvr_common.pure.replication_state import Action, ReplicationState, Step
from hvr_common.pure.schedule import Backoff, initial_due, initial_wait_s
from hvr_common.shell.key_file import KeyFile
from hvr_common.shell.logs import event
from hvr_agent.client_tls import ClientTls
from hvr_agent.cycles import Cycles
from hvr_agent.heartbeat import Heartbeat
from hvr_agent.housekeeping import clean_leftovers, pending_log_gap
from hvr_agent.initial_export import IMPORT_POLL_S, complete_if_imported
from hvr_agent.initial_copy import InitialCopy
from hvr_agent.relationship import Relationship, Stopped
from hvr_agent.replica_client import ReplicaClient, ReplicaEndpoint
from hvr_agent.replica_credentials import ReplicaCredentials
from hvr_agent.resync import Resync, resync_cures
from hvr_agent.store import ReplicationRecord
from hvr_agent.transfers import Transfers
from hvr_agent.tracking_switch import POLL_S as SWITCH_POLL_S
from hvr_agent.verify import Verify

log = logging.getLogger("hvr.agent.replication")

S = ReplicationState


class VmReplication:
    """One VM's relationship, its task, and the work the task does (initial copy, cycles)."""

    def __init__(self, rel: Relationship, config: AgentConfig, transfers: Transfers | None = None):
        self.rel = rel
        self.transfers = transfers
        self.outbox = config.outbox_dir / rel.name
        self.task: asyncio.Task | None = None
        self.client: ReplicaClient | None = None  # while the task runs
        self.backoff = Backoff()
        self.export_lock = asyncio.Lock()  # one media export of the VM at a time
        self.initial = InitialCopy(rel, config.initial_window_bytes, self.backoff)
        self.cycles = Cycles(rel, self.outbox, self.backoff, config.app_consistency.hooks_for(rel.name),
                             config.log_budget_percent)
        self.resync = Resync(rel, self.cycles, config.resync.window_for(rel.name))
        self.verify = Verify(rel, self.cycles)
        self.heartbeat = Heartbeat(rel, config.heartbeat_s, self._fail)
        self._steps: dict[Step, Callable[[ReplicaClient], Awaitable[bool]]] = {
            Step.WAIT_FOR_SCHEDULE: self._wait_for_schedule,
            Step.INITIAL_COPY: self._initial_copy,
            Step.CYCLES: self.cycles.step,
            Step.WAIT_FOR_IMPORT: self._wait_for_import,
            Step.WAIT_FOR_RESYNC: self.resync.wait_step,
            Step.RESYNC: self.resync.step,
            Step.IDLE: self._idle,
        }

    @property
    def name(self) -> str:
        return self.rel.name

    @property
    def rec(self) -> ReplicationRecord:
        return self.rel.rec

    # --- the task ----------------------------------------------------------------------------
    async def run(self) -> None:
        rec = self.rel.rec
        try:
            credentials = ReplicaCredentials(rec.auth, rec.key_file, rec.ca_file, rec.cert_file, rec.cert_key_file)
            key, ssl_context, _ = await asyncio.to_thread(credentials.load)
            if key is not None:  # token mode: the key file is read again when it is replaced (rotation)
                key = await asyncio.to_thread(KeyFile, rec.key_file, self._key_problem)
            if ssl_context is not None:  # the certificate and CA files likewise, at the next connection
                ssl_context = ClientTls(credentials.files(), ssl_context, self._tls_problem)
            endpoint = ReplicaEndpoint(rec.replica_host, rec.replica_port, credentials.tls)
            async with ReplicaClient(endpoint, key, ssl_context=ssl_context,
                                           transfers=self.transfers) as client:
                self.client = client
                await asyncio.to_thread(clean_leftovers, self.rel, self.outbox)
                await self.cycles.switch.load()
                await self.resync.require_if_changed_offline()
                await self._require_if_log_lost()
                # not a TaskGroup: it would wrap the loop's HvrError in an ExceptionGroup, past the handler below
                beats = asyncio.create_task(self.heartbeat.run(client), name=f"heartbeat:{self.name}")
                try:
                    await self._loop(client)
                finally:
                    beats.cancel()
                    await asyncio.wait([beats])
        except HvrError as exc:
            await self._fail(exc)
        except Exception as exc:  # a bug: stop this VM's replication, keep serving disks
            log.exception("replication task of VM %s failed", self.name)
            await self._fail(HvrError(f"internal error in the replication task: {type(exc).__name__}: {exc}",
                                      hint="see the agent's log; hvrctl vm resume NAME retries"))
        finally:
            self.client = None
            await self.cycles.stop_prepare()
            await self.cycles.settle_after_ack()
            self.cycles.fail_waiters(HvrError("replication task stopped"))

    def _tls_problem(self, exc: HvrError) -> None:
        event(log, "certificate_files_unusable", logging.WARNING, vm=self.name, error=exc.message,
              hint="the last good certificate and CA bundle stay in use")

    def _key_problem(self, exc: HvrError) -> None:
        event(log, "key_file_unusable", logging.WARNING, vm=self.name, file=str(self.rec.key_file), error=exc.message,
              hint="the last good key stays in use")

    async def _loop(self, client: ReplicaClient) -> None:
        wake = self.rel.wake
        while True:
            wake.clear()
            try:
                step = self.rel.step()
                if step is not Step.IDLE and self.rel.rec.settings_pending:
                    await self._send_settings(client)
                worked = await self._steps[step](client)
                if not worked and step is Step.CYCLES:
                    await self._wait_watching_backlog(self._idle_timeout_s())
                elif not worked:
                    await self._wait(self._idle_timeout_s())
            except Stopped:
                continue
            except TransientError as exc:
                await self._transient(exc)
                await self._wait_watching_backlog(self.backoff.delay_s)
                self.backoff.grow()
            except HvrError as exc:
                if self.rel.rec.state is S.REPLICATING and resync_cures(exc):
                    await self._require_resync(exc)
                else:
                    await self._fail(exc)

    async def _require_resync(self, exc: HvrError) -> None:
        """Certainty about the replica was lost: compare the disks (never a full copy)."""
        await self.cycles.stop_prepare()
        self.cycles.fail_waiters(exc)
        self.rel.last_error = exc.message
        when = self.resync.schedule_automatic()
        await self.rel.set_state(Action.REQUIRE_RESYNC, f"resynchronization required ({when}): {exc.message}")
        event(log, "resync_required", logging.WARNING, vm=self.name, code=exc.code, reason=exc.message, starts=when)

    async def _require_if_log_lost(self) -> None:
        """At the task's start: a pending log missing or out of sequence (deleted or renamed while the agent
        was stopped) cannot ship as it was journaled: the disks are compared instead (log_continuity)."""
        rel = self.rel
        if rel.rec.state is not S.REPLICATING:
            return  # (a later cycle that meets it raises the same error when it is built)
        gap = await asyncio.to_thread(pending_log_gap, rel.disks(), rel.pending_sequences())
        if gap is not None:
            event(log, "log_sequence_broken", logging.WARNING, vm=rel.name, disk=gap.disk, seq=gap.sequence,
                  reason=gap.reason)
            await self._require_resync(CorruptError(f"{gap.describe()}: its cycle cannot be shipped as it was "
                                                    "journaled"))

    async def _wait_watching_backlog(self, delay_s: float | None) -> None:
        """Wait for the next cut or retry, measuring the journal's backlog every few seconds meanwhile (a
        guest writing fast, or a link down for long, must not let the logs outgrow their budget)."""
        deadline = time.monotonic() + (delay_s if delay_s is not None else 365 * 86400)
        while (left := deadline - time.monotonic()) > 0 and not self.rel.wake.is_set():
            await self._wait(min(left, SWITCH_POLL_S))
            try:
                if await self.cycles.check_backlog():
                    return  # switched at a cut: its cycle waits to be shipped
            except (HvrError, OSError) as exc:  # the next step measures again and raises it there
                event(log, "log_budget_check_failed", logging.WARNING, vm=self.name, error=str(exc))

    async def _wait(self, timeout_s: float | None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.rel.wake.wait()
        except TimeoutError:
            pass

    def _idle_timeout_s(self) -> float | None:
        now = time.time_ns()
        step = self.rel.step()
        if step is Step.WAIT_FOR_SCHEDULE:
            return initial_wait_s(self.rel.rec.initial_at_ns, now)
        if step is Step.CYCLES:
            return self.cycles.clock.wait_s(now)
        if step is Step.WAIT_FOR_IMPORT:
            return IMPORT_POLL_S
        if step is Step.WAIT_FOR_RESYNC:
            return self.resync.wait_s(now)
        return None

    # --- the steps (True: work was done, look again at once) ---------------------------------
    async def _wait_for_schedule(self, _client: ReplicaClient) -> bool:
        if initial_due(self.rel.rec.initial_at_ns, time.time_ns()):
            await self.rel.set_state(Action.START_INITIAL, initial_at_ns=None)
            return True
        return False

    async def _initial_copy(self, client: ReplicaClient) -> bool:
        await self.initial.run(client)
        self.cycles.cut_soon()  # writes made during the copy go out right away
        return True

    async def _wait_for_import(self, client: ReplicaClient) -> bool:
        if not await complete_if_imported(self.rel, client):
            return False
        self.cycles.cut_soon()  # writes made since the export point go out right away
        self.backoff.reset()
        return True

    async def _idle(self, _client: ReplicaClient) -> bool:
        return False

    async def _send_settings(self, client: ReplicaClient) -> None:
        rel = self.rel
        sent = rel.rec.history
        await client.set_settings(rel.vm().record.vm_id, rel.rec.generation, sent)
        await rel.settings_acknowledged(sent)
        event(log, "replica_settings_sent", vm=rel.name, **sent.to_json())

    # --- errors ------------------------------------------------------------------------------
    def _failed_cycle(self, exc: HvrError) -> tuple[int | None, CycleStat]:
        seq = self.rel.rec.next_sequence if self.rel.rec.state is S.REPLICATING else None
        now = time.time_ns()
        return seq, CycleStat(seq, now, now, 0, 0, CycleResult.ERROR, f"{exc.code}: {exc.message}")

    async def _transient(self, exc: TransientError) -> None:
        await self.cycles.settle_after_ack()  # the cycle acknowledged before this failure is answered as a success
        rel = self.rel
        rel.last_error = exc.message
        seq, stat = self._failed_cycle(exc)
        event(log, "cycle_failed" if seq is not None else "initial_failed", logging.WARNING, vm=rel.name,
              seq=seq, transient=True, code=exc.code, error=exc.message, retry_in_s=self.backoff.delay_s)
        await asyncio.to_thread(rel.store.add_cycle_stat, rel.name, stat)
        self.cycles.fail_waiters(exc)

    async def _fail(self, exc: HvrError) -> None:
        fenced = fenced_error(exc, self.name, self.rel.rec.generation)
        if fenced is not None:
            exc = fenced
            event(log, "replication_fenced", logging.ERROR, vm=self.name, generation=exc.detail.get("generation"),
                  local_generation=self.rel.rec.generation)
        await self.cycles.stop_prepare()
        await self.cycles.settle_after_ack()
        rel = self.rel
        rel.last_error = exc.message
        detail = exc.message + (f" ({exc.hint})" if exc.hint else "")
        seq, stat = self._failed_cycle(exc)
        event(log, "cycle_failed" if seq is not None else "replication_failed", logging.ERROR, vm=rel.name,
              seq=seq, transient=False, code=exc.code, error=exc.message)
        try:
            await asyncio.to_thread(rel.store.add_cycle_stat, rel.name, stat)
            await rel.fail(detail)
        except NotFoundError:
            pass  # the relationship was removed meanwhile
        self.cycles.fail_waiters(exc)
