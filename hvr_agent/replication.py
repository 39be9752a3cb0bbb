"""Replication on the primary: initial copy and cycles of each protected VM.

The :class:`ReplicationManager` belongs to the agent's composition root
(:mod:`hvr_agent.daemon`); it runs one :class:`VmReplication` task per
relationship in its own ``TaskGroup``.  Each task does, one step at a time:

* **initial copy** (``InitialReplicationInProgress``): cut the VM once (the
  closed logs up to that sequence S are contained in the images: they are
  deleted), record ``next_sequence = S + 1``, then, per disk, ask the replica
  for its durable offset and send windows of allocated data from there;
  finally ``initial/complete`` with ``next_sequence`` S + 1.  Writes made
  meanwhile are in logs S + 1, S + 2, ... and are shipped right after.
* **cycles** (``Replicating``): every ``frequency_s`` (or on sync-now) cut the
  VM, then upload every closed log not yet acknowledged, strictly in sequence
  order.  A cut that falls due while a cycle uploads happens then (if no
  other cycle waits), and the next spool is built meanwhile.  After a cycle's
  acknowledgement: ``next_sequence`` is recorded (the commit point); its logs
  and spool file are deleted in the background.

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
import datetime
import functools
import logging
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hvr_common.pure.config import AgentConfig
from hvr_common.pure.errors import ConflictError, HvrError, NotFoundError, TransientError, UsageError
from hvr_common.pure.health import replication_health
from hvr_common.shell.key_file import read_key
from hvr_common.shell.logs import event
from hvr_common.pure.measure import DEFAULT_WINDOW_S, NS, CycleResult, CycleStat, measure, result_for
from hvr_common.pure.replication_state import TRANSITIONS, Action, ReplicationState, transition
from hvr_common.shell.threads import finish_in_thread
from hvr_common.pure.wire.messages import DiskSpec, EnableRequest
from hvr_common.pure.wire.status_views import PrimaryStatus
from hvr_agent import shipper
from hvr_agent.journal import list_logs, log_path
from hvr_agent.replica_client import ReplicaClient, ReplicaConflictError, ReplicaEndpoint
from hvr_agent.store import AgentStore, InitialProgress, ReplicationRecord
from hvr_agent.vms import ProtectedVm, VmRegistry

log = logging.getLogger("hvr.agent.replication")

S = ReplicationState
FREQUENCIES_S = (30, 300, 900)
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0
# Initial windows uploading at once per disk; with the one being built, this many + 1 are in memory.
INITIAL_WINDOWS_IN_FLIGHT = 4
STATS_KEPT_S = 7 * 24 * 3600
ROLE = "primary"


def iso_time(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.datetime.fromtimestamp(ns / NS, datetime.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


@dataclass
class DiskProgress:
    name: str
    disk_id: uuid.UUID
    size_bytes: int
    durable_offset: int
    allocated_bytes: int
    done_bytes: int

    def to_dict(self) -> dict:
        return {"disk": self.name, "disk_id": str(self.disk_id), "size_bytes": self.size_bytes,
                "durable_offset": self.durable_offset, "allocated_bytes": self.allocated_bytes,
                "done_bytes": self.done_bytes}


class _Stopped(Exception):
    """The relationship changed state under a running step (suspend, remove): stop the step."""


class VmReplication:
    """One VM's relationship: its record, its task, its in-memory progress."""

    def __init__(self, manager: ReplicationManager, rec: ReplicationRecord):
        self.manager = manager
        self.rec = rec
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()
        self._save_lock = asyncio.Lock()
        self._client: ReplicaClient | None = None
        self._backoff_s = FIRST_BACKOFF_S
        self._next_cut_ns = time.time_ns() + rec.frequency_s * NS
        self._sync_requested = False
        self._waiters: list[tuple[int | None, asyncio.Future]] = []
        self._spools: dict[int, shipper.SpooledBundle] = {}
        # Deleting an acknowledged cycle's files and recording its statistics: off the path to
        # the next cut (both wait for a busy disk); each runs after the one before it.
        self._after_ack: asyncio.Task | None = None
        # The cut that fell due while a cycle was uploading, and the build of its bundle: it
        # answers the error that stopped it, if any (see _prepare_next).
        self._prepare: asyncio.Task | None = None
        self.progress: dict[uuid.UUID, DiskProgress] = {}
        self._run_started_ns: int | None = None
        self._run_bytes = 0
        self.last_error: str | None = None

    # --- helpers -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.rec.vm

    @property
    def store(self) -> AgentStore:
        return self.manager.store

    def vm(self) -> ProtectedVm:
        vm = self.manager.registry.vms.get(self.name)
        if vm is None:
            raise NotFoundError(f"VM {self.name!r} is no longer registered")
        return vm

    def disks(self) -> list[shipper.DiskSource]:
        vm = self.vm()
        return [shipper.DiskSource(n, d.identity.disk_id, d.image_path, d.size, d.log_base)
                for n, d in vm.disks.items()]

    @property
    def outbox(self) -> Path:
        return self.manager.config.outbox_dir / self.name

    async def _save(self) -> None:
        async with self._save_lock:  # R4: whoever saves last writes the newest record
            await asyncio.to_thread(self.store.save_replication, self.rec)

    async def update(self, **changes) -> None:
        self.rec = self.rec.replace(**changes)
        await self._save()

    async def set_state(self, action: Action, detail: str | None = None, **changes) -> None:
        old = self.rec.state
        new = transition(ROLE, old, action)
        await self.update(state=new, state_detail=detail, **changes)
        if new is not old:
            event(log, "replication_state_changed", vm=self.name, old=old.value, new=new.value, action=action.value,
                  detail=detail)
        self.wake.set()

    async def _record(self, stat: CycleStat) -> None:
        await asyncio.to_thread(self.store.add_cycle_stat, self.name, stat)

    def pending_sequences(self) -> list[int]:
        nxt = self.rec.next_sequence
        if nxt is None:
            return []
        return list(range(nxt, self.vm().sequence))

    # --- the task ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            key = await asyncio.to_thread(read_key, self.rec.key_file)
            endpoint = ReplicaEndpoint(self.rec.replica_host, self.rec.replica_port)
            async with ReplicaClient(endpoint, key) as client:
                self._client = client
                await asyncio.to_thread(self._clean_leftovers)
                await self._loop()
        except HvrError as exc:
            await self._fail(exc)
        except Exception as exc:  # a bug: stop this VM's replication, keep serving disks
            log.exception("replication task of VM %s failed", self.name)
            await self._fail(HvrError(f"internal error in the replication task: {type(exc).__name__}: {exc}",
                                      hint="see the agent's log; hvrctl vm resume NAME retries"))
        finally:
            self._client = None
            await self._stop_prepare()
            await self._settle_after_ack()
            self._fail_waiters(HvrError("replication task stopped"))

    async def _stop_prepare(self) -> None:
        """Cancel the cut-and-build begun during an upload; return once it (and its build thread) ended."""
        task, self._prepare = self._prepare, None
        if task is None:
            return
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        if not task.cancelled():
            exc = task.exception() or task.result()
            if exc is not None:
                event(log, "cycle_prepare_failed", logging.WARNING, vm=self.name, error=str(exc))

    async def _settle_after_ack(self) -> None:
        """Let the last acknowledged cycle's clean-up finish (files left behind are deleted at the next start)."""
        task = self._after_ack
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            raise
        except Exception:  # logged by the task itself
            pass

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                worked = await self._step()
                if not worked:
                    await self._wait(self._idle_timeout_s())
            except _Stopped:
                continue
            except TransientError as exc:
                await self._transient(exc)
                await self._wait(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
            except HvrError as exc:
                await self._fail(exc)

    async def _wait(self, timeout_s: float | None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.wake.wait()
        except TimeoutError:
            pass

    def _idle_timeout_s(self) -> float | None:
        now = time.time_ns()
        if self.rec.state is S.READY_FOR_INITIAL_REPLICATION and self.rec.initial_at_ns is not None:
            return max(0.0, (self.rec.initial_at_ns - now) / NS)
        if self.rec.state is S.REPLICATING:
            return max(0.0, (self._next_cut_ns - now) / NS)
        return None

    async def _step(self) -> bool:
        st = self.rec.state
        if st is S.READY_FOR_INITIAL_REPLICATION:
            at = self.rec.initial_at_ns
            if at is not None and time.time_ns() >= at:
                await self.set_state(Action.START_INITIAL, initial_at_ns=None)
                return True
            return False
        if st is S.INITIAL_REPLICATION_IN_PROGRESS:
            await self._initial()
            return True
        if st is S.REPLICATING:
            return await self._replicating_step()
        return False

    def _check_state(self, expected: ReplicationState) -> None:
        if self.rec.state is not expected:
            raise _Stopped()

    # --- errors ------------------------------------------------------------------------------
    async def _transient(self, exc: TransientError) -> None:
        await self._settle_after_ack()  # the cycle acknowledged before this failure is answered as a success
        self.last_error = exc.message
        seq = self.rec.next_sequence if self.rec.state is S.REPLICATING else None
        event(log, "cycle_failed" if seq is not None else "initial_failed", logging.WARNING, vm=self.name,
              seq=seq, transient=True, code=exc.code, error=exc.message, retry_in_s=self._backoff_s)
        now = time.time_ns()
        await self._record(CycleStat(seq, now, now, 0, 0, CycleResult.ERROR, f"{exc.code}: {exc.message}"))
        self._fail_waiters(exc)

    async def _fail(self, exc: HvrError) -> None:
        await self._stop_prepare()
        await self._settle_after_ack()
        self.last_error = exc.message
        detail = exc.message + (f" ({exc.hint})" if exc.hint else "")
        seq = self.rec.next_sequence if self.rec.state is S.REPLICATING else None
        event(log, "cycle_failed" if seq is not None else "replication_failed", logging.ERROR, vm=self.name,
              seq=seq, transient=False, code=exc.code, error=exc.message)
        now = time.time_ns()
        try:
            await self._record(CycleStat(seq, now, now, 0, 0, CycleResult.ERROR, f"{exc.code}: {exc.message}"))
            if (ROLE, self.rec.state, Action.FAIL) in TRANSITIONS:
                await self.set_state(Action.FAIL, detail)
            else:
                await self.update(state_detail=detail)
        except NotFoundError:
            pass  # the relationship was removed meanwhile
        self._fail_waiters(exc)

    def _fail_waiters(self, exc: HvrError) -> None:
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(exc)

    # --- initial copy ------------------------------------------------------------------------
    async def _initial(self) -> None:
        vm = self.vm()
        disks = self.disks()
        if self.rec.base_sequence is None:
            await self._initial_cut(vm, disks)
        client = self._client
        remote = await client.replica_state(vm.record.vm_id)
        offsets = remote.get("initial") or {}
        stored = {p.disk_id: p for p in await asyncio.to_thread(self.store.initial_progress, self.name)}
        self._run_started_ns = time.time_ns()
        self._run_bytes = 0
        for disk in disks:
            offset = int(offsets.get(str(disk.disk_id), 0))
            prior = stored.get(disk.disk_id)
            done = await asyncio.to_thread(_allocated_below, disk.image_path, offset)
            allocated = prior.allocated_bytes if prior else done
            self.progress[disk.disk_id] = DiskProgress(disk.name, disk.disk_id, disk.size_bytes, offset,
                                                       max(allocated, done), done)
        for disk in disks:
            await self._initial_disk(vm, disk)
        self._check_state(S.INITIAL_REPLICATION_IN_PROGRESS)
        next_sequence = self.rec.base_sequence + 1
        await client.complete_initial(vm.record.vm_id, self.rec.generation, next_sequence)
        now = time.time_ns()
        await self.set_state(Action.COMPLETE_INITIAL, initial_completed_ns=now, next_sequence=next_sequence)
        await asyncio.to_thread(self.store.clear_initial_progress, self.name)
        total = sum(p.done_bytes for p in self.progress.values())
        event(log, "initial_completed", vm=self.name, seq=next_sequence, bytes=total,
              latency_s=round((now - (self.rec.initial_started_ns or now)) / NS, 3))
        self._backoff_s = FIRST_BACKOFF_S
        self._sync_requested = True  # writes made during the copy go out right away

    async def _initial_cut(self, vm: ProtectedVm, disks: list[shipper.DiskSource]) -> None:
        closed = await self.manager.registry.cut(self.name)
        base = closed[0].sequence if closed else vm.sequence - 1
        await self.update(base_sequence=base, next_sequence=base + 1, initial_started_ns=time.time_ns())
        removed = await asyncio.to_thread(_delete_logs_upto, disks, base)
        for disk in disks:
            allocated = await asyncio.to_thread(_allocated_below, disk.image_path, disk.size_bytes)
            await asyncio.to_thread(self.store.set_initial_progress, self.name,
                                    InitialProgress(disk.disk_id, disk.size_bytes, 0, allocated, 0))
            self.progress[disk.disk_id] = DiskProgress(disk.name, disk.disk_id, disk.size_bytes, 0, allocated, 0)
        event(log, "initial_started", vm=self.name, seq=base, logs_deleted=removed,
              bytes=sum(p.allocated_bytes for p in await asyncio.to_thread(self.store.initial_progress,
                                                                            self.name)))

    async def _initial_disk(self, vm: ProtectedVm, disk: shipper.DiskSource) -> None:
        """Send the disk's windows from the replica's durable offset to the end.

        Up to ``INITIAL_WINDOWS_IN_FLIGHT`` windows travel at once (the listener
        stores the next while it makes the previous durable) and the one after
        them is built meanwhile, in a thread, in memory.  Answers are taken in
        window order; one that leaves the durable offset short of its window's
        end (``409 initial_gap``, or a window refused because the one before it
        failed) drops the windows after it and the copy goes on from there.
        """
        progress = self.progress[disk.disk_id]
        window_bytes = self.manager.config.initial_window_bytes
        fd = await asyncio.to_thread(os.open, disk.image_path, os.O_RDONLY | os.O_CLOEXEC)

        spare: list[bytearray] = []  # buffers of windows whose uploads have ended, for reuse

        def build(start: int, buffer: bytearray | None) -> shipper.InitialWindow:
            # plan and build the window at ``start`` (blocking; runs in a thread)
            end = shipper.plan_window(fd, start, disk.size_bytes, window_bytes)
            return shipper.build_initial_bundle(
                vm_id=vm.record.vm_id, generation=self.rec.generation, disk=disk, image_fd=fd, start=start,
                end=end, compress=self.rec.compression, created_ns=time.time_ns(), buffer=buffer)

        def build_next(start: int) -> asyncio.Future:
            return asyncio.ensure_future(asyncio.to_thread(build, start, spare.pop() if spare else None))

        async def send(window: shipper.InitialWindow) -> int:
            sent_ns = time.time_ns()
            try:
                answer = await self._client.send_initial_window(
                    vm.record.vm_id, disk.disk_id, window.start, window.end, self.rec.generation,
                    window.bundle.pieces, window.bundle.sha256, window.bundle.wire_bytes)
                durable = int(answer.get("offset", window.end))
            except ReplicaConflictError as exc:
                if exc.code != "initial_gap" or "offset" not in exc.detail:
                    raise
                durable = int(exc.detail["offset"])  # the replica holds less than we thought: go on from there
                event(log, "initial_gap", logging.WARNING, vm=self.name, disk=disk.name, offset=durable,
                      window_start=window.start)
            event(log, "initial_window_sent", vm=self.name, disk=disk.name, offset=window.start, end=durable,
                  bytes=window.bundle.wire_bytes, data_bytes=window.bundle.write_bytes,
                  latency_s=round((time.time_ns() - sent_ns) / NS, 3))
            return durable

        in_flight: list[tuple[shipper.InitialWindow, asyncio.Task]] = []
        next_start = progress.durable_offset
        ahead: asyncio.Future | None = None  # the window after those in flight, being built
        saving: asyncio.Future | None = None  # the progress of the latest answer, being saved

        async def fill() -> None:
            nonlocal ahead, next_start
            while len(in_flight) < INITIAL_WINDOWS_IN_FLIGHT and next_start < disk.size_bytes:
                if ahead is None:
                    ahead = build_next(next_start)
                window = await ahead
                ahead = None
                in_flight.append((window, asyncio.ensure_future(send(window))))
                next_start = window.end
            if ahead is None and next_start < disk.size_bytes:
                ahead = build_next(next_start)

        try:
            while progress.durable_offset < disk.size_bytes:
                self._check_state(S.INITIAL_REPLICATION_IN_PROGRESS)
                await fill()
                window, task = in_flight.pop(0)
                durable = await task
                spare.append(window.buffer)
                if durable == window.end:
                    progress.done_bytes += window.allocated_bytes
                    self._run_bytes += window.allocated_bytes
                else:
                    spare += await _drop_windows(in_flight)
                    if ahead is not None:
                        await _drop_build(ahead)
                        ahead = None
                    next_start = durable
                    progress.done_bytes = await asyncio.to_thread(_allocated_below, disk.image_path, durable)
                progress.durable_offset = durable
                progress.allocated_bytes = max(progress.allocated_bytes, progress.done_bytes)
                self._backoff_s = FIRST_BACKOFF_S
                if progress.durable_offset < disk.size_bytes:
                    self._check_state(S.INITIAL_REPLICATION_IN_PROGRESS)
                    await fill()  # the next window is on its way before the progress is saved
                if saving is not None:
                    await saving
                saving = asyncio.ensure_future(asyncio.to_thread(self.store.set_initial_progress, self.name,
                                                                 InitialProgress(disk.disk_id, disk.size_bytes, durable,
                                                                                 progress.allocated_bytes,
                                                                                 progress.done_bytes)))
            if saving is not None:
                await saving
        finally:
            await _drop_windows(in_flight)
            if ahead is not None:
                await _drop_build(ahead)
            if saving is not None and not saving.done():
                await asyncio.wait([saving])
            os.close(fd)

    def initial_status(self) -> dict | None:
        rec = self.rec
        if rec.state not in (S.INITIAL_REPLICATION_IN_PROGRESS, S.READY_FOR_INITIAL_REPLICATION) and \
                rec.initial_completed_ns is not None:
            return {"scheduled_at": None, "started_at": iso_time(rec.initial_started_ns),
                    "completed_at": iso_time(rec.initial_completed_ns)}
        disks = list(self.progress.values())
        done = sum(p.done_bytes for p in disks)
        total = sum(p.allocated_bytes for p in disks)
        if total:
            percent = round(100.0 * done / total, 1)
        else:
            size = sum(p.size_bytes for p in disks)
            percent = round(100.0 * sum(p.durable_offset for p in disks) / size, 1) if size else 0.0
        rate = None
        eta_s = None
        if rec.state is S.INITIAL_REPLICATION_IN_PROGRESS and self._run_started_ns is not None:
            elapsed_s = (time.time_ns() - self._run_started_ns) / NS
            if elapsed_s > 0 and self._run_bytes:
                rate = round(self._run_bytes / elapsed_s)
                eta_s = round(max(0, total - done) / rate, 1)
        return {"scheduled_at": iso_time(rec.initial_at_ns), "started_at": iso_time(rec.initial_started_ns),
                "completed_at": iso_time(rec.initial_completed_ns), "bytes_done": done, "bytes_total": total,
                "percent": percent, "rate_bytes_per_s": rate, "eta_s": eta_s,
                "disks": [p.to_dict() for p in disks]}

    # --- cycles ------------------------------------------------------------------------------
    async def _replicating_step(self) -> bool:
        if self._prepare is not None:  # a cut begun while the last cycle uploaded: let it finish first
            exc = await self._prepare  # (if this is cancelled, run() stops the task and waits for it)
            self._prepare = None
            if exc is not None:
                raise exc
        now = time.time_ns()
        pending = self.pending_sequences()
        freq_ns = self.rec.frequency_s * NS
        if pending and now >= self._next_cut_ns:
            # A cut is due while earlier cycles are still not acknowledged: the cycle that should start
            # then is missed (the late ones count as missed themselves when they are acknowledged).
            while self._next_cut_ns <= now:
                await self._record(CycleStat(None, self._next_cut_ns, self._next_cut_ns, 0, 0,
                                             CycleResult.MISSED, self.last_error))
                event(log, "cycle_missed", logging.WARNING, vm=self.name, seq=pending[0], pending=len(pending))
                self._next_cut_ns += freq_ns
        if self._sync_requested or (now >= self._next_cut_ns and not pending):
            await self._cut()
            pending = self.pending_sequences()
        if not pending:
            return False
        for seq in pending:
            self._check_state(S.REPLICATING)
            await self._ship_while_preparing(seq)
        return True

    async def _cut(self) -> int:
        """Cut now; return the sequence of the cycle it closed.

        sync-now callers waiting before the cut wait for that cycle; those that ask once it
        began (it may wait for the previous cut to settle) wait for the next one, which holds
        their writes.
        """
        self._sync_requested = False
        asked = {id(f) for t, f in self._waiters if t is None}
        # The closed logs are made durable (with the images) while the bundle is built from
        # the page cache; the upload waits for that (_ship).
        closed = await self.manager.registry.begin_cut(self.name)
        self._next_cut_ns = time.time_ns() + self.rec.frequency_s * NS
        target = closed[0].sequence
        self._waiters = [(target if t is None and id(f) in asked else t, f) for t, f in self._waiters]
        return target

    async def _ship_while_preparing(self, seq: int) -> None:
        """Ship cycle ``seq``; if the next cut falls due (or sync-now asks) meanwhile and no other
        cycle waits behind this one, cut on time and build that cycle's bundle while this one
        uploads, so the next upload starts as soon as this one is acknowledged.

        Within one cycle the build runs while the cut's fdatasync settles, and the upload
        waits for both; a cycle's cut and build do not wait for the previous upload.
        """
        ship = asyncio.ensure_future(self._ship(seq))
        woken = False
        try:
            while not ship.done():
                can_prepare = (self._prepare is None and self.rec.state is S.REPLICATING
                               and self.vm().sequence == seq + 1)
                due_s = (self._next_cut_ns - time.time_ns()) / NS
                if can_prepare and (self._sync_requested or due_s <= 0):
                    self._prepare = asyncio.ensure_future(self._prepare_next())
                    continue
                waker = asyncio.ensure_future(self.wake.wait())
                try:
                    await asyncio.wait([ship, waker], timeout=due_s if can_prepare else None,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waker.cancel()
                if self.wake.is_set():
                    self.wake.clear()  # seen here (sync-now, a state change) and passed on below
                    woken = True
            await ship
        except BaseException:
            if not ship.done():
                ship.cancel()
                await asyncio.wait([ship])
            elif not ship.cancelled():
                ship.exception()  # raised below or superseded: retrieved either way
            raise
        finally:
            if woken:  # the loop acts on it next (e.g. a retry after a failed upload starts at once)
                self.wake.set()

    async def _prepare_next(self) -> Exception | None:
        """The cut that fell due during an upload, then its bundle (a failed build is left to _ship).
        Answers the error that stopped the cut, for the replication step to raise."""
        if self.rec.state is not S.REPLICATING:
            return None
        try:
            seq = await self._cut()
        except Exception as exc:  # noqa: BLE001 - raised by _replicating_step like any error of a cut
            return exc
        try:
            await self._bundle(seq)
        except (OSError, HvrError) as exc:
            event(log, "cycle_build_failed", logging.WARNING, vm=self.name, seq=seq, error=str(exc),
                  hint="built again when the cycle is shipped")
        return None

    async def _bundle(self, seq: int) -> tuple[shipper.SpooledBundle, float]:
        """The spool of cycle ``seq`` (built now unless it already is) and the seconds building took."""
        bundle = self._spools.get(seq)
        if bundle is not None and bundle.path.exists():
            return bundle, 0.0
        vm = self.vm()
        build_ns = time.time_ns()
        bundle = await finish_in_thread(functools.partial(  # never leaves a thread writing the outbox
            shipper.build_cycle_bundle, self.outbox, vm_id=vm.record.vm_id, generation=self.rec.generation,
            sequence=seq, disks=self.disks(), compress=self.rec.compression))
        self._spools[seq] = bundle
        return bundle, (time.time_ns() - build_ns) / NS

    async def _ship(self, seq: int) -> None:
        vm = self.vm()
        bundle, built_s = await self._bundle(seq)
        # A log a crash could still tear must not reach the replica: the agent could not rebuild
        # the same cycle after a restart.  (Also waits for a cut made by hvrctl vm cut.)
        await self.manager.registry.durable(self.name, seq)
        sent_ns = time.time_ns()
        status, _ = await self._client.send_cycle(vm.record.vm_id, seq, self.rec.generation, bundle.path,
                                                  bundle.sha256, bundle.wire_bytes)
        finished = time.time_ns()
        # Commit point: the replica holds cycle seq durably (P2); record that before deleting anything (R1).
        await self.update(next_sequence=seq + 1, last_replication_ns=finished)
        committed = time.time_ns()
        self._spools.pop(seq, None)
        started = bundle.cut_ns or sent_ns
        result = result_for(started, finished, self.rec.frequency_s)
        stat = CycleStat(seq, started, finished, bundle.wire_bytes, bundle.raw_bytes, result)
        answer = {"vm": self.name, "sequence": seq, "bytes": bundle.wire_bytes, "raw_bytes": bundle.raw_bytes,
                  "result": result.value}
        self._after_ack = asyncio.ensure_future(
            self._clean_up_cycle(self._after_ack, self.disks(), seq, bundle.path, stat, answer))
        self._backoff_s = FIRST_BACKOFF_S
        self.last_error = None
        event(log, "cycle_shipped", vm=self.name, seq=seq, bytes=bundle.wire_bytes, raw_bytes=bundle.raw_bytes,
              write_bytes=bundle.write_bytes, frames=bundle.frames, compressed_frames=bundle.compressed_frames,
              already_stored=status == 200, result=result.value,
              latency_s=round((finished - started) / NS, 3), build_s=round(built_s, 3),
              upload_s=round((finished - sent_ns) / NS, 3), commit_s=round((committed - finished) / NS, 3))

    async def _clean_up_cycle(self, before: asyncio.Task | None, disks: list[shipper.DiskSource], seq: int,
                              spool: Path, stat: CycleStat, answer: dict) -> None:
        """After cycle ``seq`` was acknowledged and committed: delete its logs and spool, record its
        statistics, then answer ``sync-now --wait`` callers waiting for it."""
        if before is not None:
            await asyncio.wait([before])
        began = time.time_ns()
        try:
            await asyncio.to_thread(_delete_cycle_files, disks, seq, spool)
            await self._record(stat)
            if seq % 100 == 0:
                await asyncio.to_thread(self.store.prune_cycle_stats, self.name, stat.finished_ns - STATS_KEPT_S * NS)
        except (OSError, sqlite3.Error) as exc:  # the cycle is committed; the next start deletes what is left
            event(log, "cycle_cleanup_failed", logging.WARNING, vm=self.name, seq=seq, error=str(exc))
        else:
            event(log, "cycle_files_deleted", logging.DEBUG, vm=self.name, seq=seq,
                  latency_s=round((time.time_ns() - began) / NS, 3))
        waiters, self._waiters = self._waiters, []
        for target, fut in waiters:
            if target is not None and target <= seq:
                if not fut.done():
                    fut.set_result(answer)
            else:
                self._waiters.append((target, fut))

    def restart_schedule(self) -> None:
        """After a suspension: the next cut is one interval from now.  Intervals spent suspended are
        not missed cycles (replication was paused), and logs closed before the suspension ship at once."""
        self._next_cut_ns = time.time_ns() + self.rec.frequency_s * NS

    def request_sync(self, wait: bool) -> asyncio.Future | None:
        self._sync_requested = True
        fut = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((None, fut))
        self.wake.set()
        return fut

    # --- housekeeping ------------------------------------------------------------------------
    def _clean_leftovers(self) -> None:
        """Spool files are rebuilt from logs; logs older than next_sequence were acknowledged (R1)."""
        if self.outbox.is_dir():
            for p in self.outbox.iterdir():
                _unlink(p)
        nxt = self.rec.next_sequence
        if nxt is not None and self.rec.state is not S.READY_FOR_INITIAL_REPLICATION:
            removed = _delete_logs_upto(self.disks(), nxt - 1)
            if removed:
                event(log, "acknowledged_logs_deleted", vm=self.name, seq=nxt - 1, logs=removed)

    async def pending_bytes(self) -> int:
        """Bytes of logs not yet acknowledged: the closed ones on disk and the active ones."""
        try:
            vm = self.vm()
        except NotFoundError:
            return 0
        nxt = self.rec.next_sequence
        active = {disk.log_base: disk.log for disk in vm.disks.values() if disk.log is not None}
        total = sum(lg.written + len(lg.buf) for lg in active.values())
        skip = {(path, lg.sequence) for path, lg in active.items()}
        images = [d.log_base for d in vm.disks.values()]
        return total + await asyncio.to_thread(_closed_log_bytes, images, nxt, skip)


def _closed_log_bytes(images: list[Path], next_sequence: int | None, skip: set) -> int:
    total = 0
    for image in images:
        for seq, path in list_logs(image):
            if (next_sequence is not None and seq < next_sequence) or (image, seq) in skip:
                continue
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
    return total


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _delete_logs_upto(disks: list[shipper.DiskSource], last: int) -> int:
    removed = 0
    for disk in disks:
        for seq, path in list_logs(disk.logs_at):
            if seq <= last:
                _unlink(path)
                removed += 1
    return removed


def _delete_cycle_files(disks: list[shipper.DiskSource], seq: int, spool: Path) -> None:
    for disk in disks:
        _unlink(log_path(disk.logs_at, seq))
    _unlink(spool)


def _allocated_below(image: Path, end: int) -> int:
    if end <= 0:
        return 0
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return shipper.allocated_bytes(fd, 0, end)
    finally:
        os.close(fd)


class ReplicationManager:
    """Every VM's replication; the admin API's entry point for the replication verbs."""

    def __init__(self, config: AgentConfig, store: AgentStore, registry: VmRegistry):
        self.config = config
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
                    self._start(VmReplication(self, rec))
            await self._stop.wait()
            for rep in self.vms.values():
                if rep.task is not None:
                    rep.task.cancel()
        self._tg = None

    def request_stop(self) -> None:
        self._stop.set()

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
    async def enable(self, name: str, *, replica_host: str, port: int, key_file: str, frequency_s: int,
                     compression: bool) -> dict:
        if not isinstance(replica_host, str) or not replica_host or len(replica_host) > 253:
            raise UsageError("replica_server must be a host name or address")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise UsageError(f"port must be from 1 to 65535, not {port!r}")
        if frequency_s not in FREQUENCIES_S:
            raise UsageError(f"frequency must be one of {', '.join(map(str, FREQUENCIES_S))} seconds, "
                             f"not {frequency_s!r}")
        if not isinstance(compression, bool):
            raise UsageError("compression must be true or false")
        if not isinstance(key_file, str) or not Path(key_file).is_absolute():
            raise UsageError(f"key file must be an absolute path, not {key_file!r}")
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
            key = await asyncio.to_thread(read_key, Path(key_file))
            endpoint = ReplicaEndpoint(replica_host, port)
            request = EnableRequest(name, vm.record.generation, frequency_s, compression,
                                    tuple(DiskSpec(d.identity.disk_id, n, d.size) for n, d in vm.disks.items()))
            async with ReplicaClient(endpoint, key) as client:
                status, _ = await client.enable(vm.record.vm_id, request)
            rec = ReplicationRecord(
                vm=name, replica_host=replica_host, replica_port=port, key_file=Path(key_file),
                principal=key.principal, frequency_s=frequency_s, compression=compression, state=state,
                state_detail=None, generation=vm.record.generation, base_sequence=None, next_sequence=None,
                initial_at_ns=None, initial_started_ns=None, initial_completed_ns=None, last_replication_ns=None,
                enabled_ns=time.time_ns())
            await asyncio.to_thread(self.store.add_replication, rec)
            rep = VmReplication(self, rec)
            self._start(rep)
        event(log, "replication_enabled", vm=name, replica=str(endpoint), principal=key.principal,
              frequency_s=frequency_s, compression=compression, replica_existed=status == 200)
        return await self.status_of(rep)

    async def start_initial(self, name: str, at_ns: int | None) -> dict:
        rep = self._get(name)
        st = rep.rec.state
        if st is S.ERROR and rep.rec.initial_completed_ns is None:
            return await self.resume(name)
        if st is S.READY_FOR_INITIAL_REPLICATION and at_ns is not None and at_ns > time.time_ns():
            await rep.update(initial_at_ns=at_ns, state_detail=f"initial replication scheduled for {iso_time(at_ns)}")
            rep.wake.set()
            event(log, "initial_scheduled", vm=name, at=iso_time(at_ns))
        elif st is not S.INITIAL_REPLICATION_IN_PROGRESS:
            await rep.set_state(Action.START_INITIAL, initial_at_ns=None)
        return await self.status_of(rep)

    async def sync_now(self, name: str, wait: bool) -> dict:
        rep = self._get(name)
        if rep.rec.state is not S.REPLICATING:
            raise ConflictError(f"VM {name!r} is {rep.rec.state.value}: only a replicating VM can sync now",
                                hint="hvrctl vm get NAME shows why; hvrctl vm resume NAME if it is suspended")
        if self._stop.is_set() or rep.task is None or rep.task.done():
            raise TransientError(f"the replication task of VM {name!r} is not running (the agent is stopping?)",
                                 hint="try again once the agent runs; hvrctl vm get NAME shows the state")
        fut = rep.request_sync(wait)
        if fut is None:
            return {"vm": name, "requested": True}
        return await fut

    async def suspend(self, name: str) -> dict:
        rep = self._get(name)
        await rep.set_state(Action.SUSPEND, "suspended by the operator")
        event(log, "replication_suspended", vm=name)
        return await self.status_of(rep)

    async def resume(self, name: str) -> dict:
        rep = self._get(name)
        st = rep.rec.state
        if st is S.ERROR:
            action = Action.RESUME if rep.rec.initial_completed_ns is not None else Action.START_INITIAL
            await self._stop_task(rep)
            await rep.set_state(action)
            fresh = VmReplication(self, rep.rec)
            self._start(fresh)
            rep = fresh
        else:
            rep.restart_schedule()
            await rep.set_state(Action.RESUME)
        event(log, "replication_resumed", vm=name, state=rep.rec.state.value)
        return await self.status_of(rep)

    async def remove(self, name: str) -> dict:
        async with self._admin_lock:
            rep = self._get(name)
            del self.vms[name]
            await self._stop_task(rep)
            await asyncio.to_thread(self.store.remove_replication, name)
            await asyncio.to_thread(_remove_dir, rep.outbox)
        event(log, "replication_removed", vm=name, reason="operator")
        return {"vm": name, "removed": True}

    # --- reports -----------------------------------------------------------------------------
    async def status(self, name: str | None = None) -> list[dict]:
        reps = [self._get(name)] if name is not None else list(self.vms.values())
        return [await self.status_of(rep) for rep in reps]

    async def status_of(self, rep: VmReplication) -> dict:
        rec = rep.rec
        now = time.time_ns()
        rows = await asyncio.to_thread(self.store.cycle_stats, rep.name, now - 3600 * NS)
        health = replication_health(rec.state, frequency_s=rec.frequency_s, rows=rows, now_ns=now,
                                    last_ack_ns=rec.last_replication_ns,
                                    replicating_since_ns=rec.initial_completed_ns, state_detail=rec.state_detail)
        vm = self.registry.vms.get(rep.name)
        try:
            pending = len(rep.pending_sequences())
        except NotFoundError:
            pending = 0
        return PrimaryStatus(
            vm=rep.name, vm_id=vm.record.vm_id if vm else None, state=rec.state, state_detail=rec.state_detail,
            health=health.health.value, health_details=tuple(health.details), frequency_s=rec.frequency_s,
            compression=rec.compression, primary_server=self.primary_server, principal=rec.principal,
            replica_server=rec.replica_host, replica_port=rec.replica_port, generation=rec.generation,
            next_sequence=rec.next_sequence, pending_cycles=pending,
            last_replication_time=iso_time(rec.last_replication_ns), last_error=rep.last_error,
            enabled_at=iso_time(rec.enabled_ns), initial=rep.initial_status()).to_json()

    async def measure(self, name: str) -> dict:
        rep = self._get(name)
        now = time.time_ns()
        rows = await asyncio.to_thread(self.store.cycle_stats, name, now - DEFAULT_WINDOW_S * NS)
        pending = await rep.pending_bytes()
        m = measure(rows, now_ns=now, pending_bytes=pending, last_replication_ns=rep.rec.last_replication_ns)
        out = m.to_dict()
        out["LastReplicationTime"] = iso_time(m.LastReplicationTime)
        out["WindowStartTime"] = iso_time(m.WindowStartTime)
        out.update({"VMName": name, "State": rep.rec.state.value,
                    "Health": (await self.status_of(rep))["health"], "ReplicationMode": "Primary",
                    "FrequencySec": rep.rec.frequency_s})
        out["LastAppliedLogTime"] = await self._last_applied_log_time(rep)
        return out

    async def _last_applied_log_time(self, rep: "VmReplication") -> str | None:
        """LastAppliedLogTime lives on the replica: ask it (briefly); None when it cannot say."""
        client = getattr(rep, "_client", None)
        vm = self.registry.vms.get(rep.name)
        if client is None or vm is None:
            return None
        try:
            async with asyncio.timeout(MEASURE_REPLICA_TIMEOUT_S):
                state = await client.replica_state(vm.record.vm_id)
        except (HvrError, TimeoutError):
            return None
        return iso_time(state.get("last_applied_log_time_ns"))


MEASURE_REPLICA_TIMEOUT_S = 3.0


async def _drop_windows(in_flight: list[tuple[shipper.InitialWindow, asyncio.Task]]) -> list[bytearray]:
    """Cancel the uploads of windows that will not be used, wait until they have ended, return their buffers."""
    tasks = [task for _, task in in_flight]
    buffers = [window.buffer for window, _ in in_flight]
    in_flight.clear()
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a dropped window's failure is not news
    return buffers


async def _drop_build(task: asyncio.Future) -> None:
    """Wait for a window being built that will not be sent (the image fd must outlive its thread)."""
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: a window nobody sends has no news to tell


def _remove_dir(path: Path) -> None:
    if path.is_dir():
        for p in path.iterdir():
            _unlink(p)
        path.rmdir()
