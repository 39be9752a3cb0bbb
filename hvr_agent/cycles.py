"""Cycles (``Replicating``): cut, build, ship, clean up after the acknowledgement.

Every ``frequency_s`` (or on sync-now) cut the VM, then upload every closed
log not yet acknowledged, strictly in sequence order (R2).  When the cut
falls due is the pure cut clock's business (:mod:`hvr_common.pure.schedule`),
and so is counting the cuts skipped while earlier cycles wait.  A cut that
falls due while a cycle uploads happens then (if no other cycle waits), and
the next spool is built meanwhile (journal mode; a bitmap-tracked VM's cycles
are streamed from the disks when shipped, :mod:`hvr_agent.bitmap_cycles`).
While a cycle waits for the replica the journal's backlog is measured against
its budget; past it the VM is tracked by bitmap until the backlog is shipped
(:mod:`hvr_agent.tracking_switch`).
After a cycle's acknowledgement, ``next_sequence`` is recorded (the commit
point); its logs and spool file are deleted in the background (R1), and
``sync-now --wait`` callers answered.

Application-consistent cuts: when one is due (the VM's ``app_consistent_hours``,
:func:`hvr_common.pure.recovery_points.app_consistent_due`), the configured
freeze command runs before the cut and the thaw command after it
(:mod:`hvr_agent.app_consistency`).  Without a freeze command, or when it
fails, the cut is crash-consistent and counted as a failure; the next cut
tries again.  A frozen cut's sequence is recorded before its cycle is shipped,
so its upload (``?consistency=application``) says so, also when the cycle is
rebuilt after a restart; a crash between the cut and that record leaves the
cycle marked crash-consistent, which is never wrong, only less than it could be.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from pathlib import Path

from hvr_common.pure.config import FreezeHooks
from hvr_common.pure.errors import HvrError
from hvr_common.pure.log_backlog import DEFAULT_BUDGET_PERCENT
from hvr_common.pure.measure import NS, CycleResult, CycleStat, result_for
from hvr_common.pure.recovery_points import Consistency, app_consistent_due
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.schedule import Backoff, CutClock
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_agent import shipper
from hvr_agent.app_consistency import frozen_cut
from hvr_agent.bitmap_cycles import BitmapCycles
from hvr_agent.shipper import spool_path
from hvr_agent.housekeeping import delete_cycle_files
from hvr_agent.relationship import Relationship
from hvr_agent.replica_client import ReplicaClient, ReplicaConflictError
from hvr_agent.tracking_switch import TrackingSwitch

log = logging.getLogger("hvr.agent.replication")

S = ReplicationState
STATS_KEPT_S = 7 * 24 * 3600


class Cycles:
    """One VM's cycles: the cut clock, the spools built, the clean-up running, the sync-now waiters."""

    def __init__(self, rel: Relationship, outbox: Path, backoff: Backoff, hooks: FreezeHooks | None = None,
                 budget_percent: int = DEFAULT_BUDGET_PERCENT):
        self.rel = rel
        self.outbox = outbox
        self.backoff = backoff
        self.hooks = hooks  # agent.toml [app_consistency] for this VM (None: none configured)
        self.clock = CutClock.started(rel.rec.frequency_s, time.time_ns())
        self._waiters: list[tuple[int | None, asyncio.Future]] = []
        self._spools: dict[int, shipper.SpooledBundle] = {}
        self.bitmap = BitmapCycles(rel, self._spools)  # snapshots, stand-ins, abandonment, streamed sending
        # Deleting an acknowledged cycle's files and recording its statistics: off the path to
        # the next cut (both wait for a busy disk); each runs after the one before it.
        self._after_ack: asyncio.Task | None = None
        # The cut that fell due while a cycle was uploading, and the build of its bundle: it
        # answers the error that stopped it, if any (see _prepare_next).
        self._prepare: asyncio.Task | None = None
        # journal mode past the log budget: bitmap tracking until the backlog is shipped
        self.switch = TrackingSwitch(rel, outbox, budget_percent)

    # --- verbs -------------------------------------------------------------------------------
    def request_sync(self, wait: bool) -> asyncio.Future | None:
        """sync-now: cut at once; with ``wait``, a future answered once that cycle is acknowledged."""
        self.clock = self.clock.with_sync_requested()
        fut = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((None, fut))
        self.rel.wake.set()
        return fut

    def cut_soon(self) -> None:
        """Cut at the next step (after the initial copy: writes made during it go out right away)."""
        self.clock = self.clock.with_sync_requested()

    def restart_schedule(self) -> None:
        """After a suspension: the next cut is one interval from now.  Intervals spent suspended are
        not missed cycles (replication was paused), and logs closed before the suspension ship at once."""
        self.clock = self.clock.restarted(time.time_ns())

    # --- the step ----------------------------------------------------------------------------
    async def step(self, client: ReplicaClient) -> bool:
        """Cut if due, then ship every pending cycle in order; False when there was nothing to do."""
        if self._prepare is not None:  # a cut begun while the last cycle uploaded: let it finish first
            exc = await self._prepare  # (if this is cancelled, the task stops and waits for it)
            self._prepare = None
            if exc is not None:
                raise exc
        rel = self.rel
        # A cycle waits for the replica: the journal's backlog against its budget, bitmap tracking past it
        # (the switch cuts: the cut that fell due, if any, is that one).
        await self.switch.check(self._cut)
        pending = rel.pending_sequences()
        plan = self.clock.plan(time.time_ns(), bool(pending))
        self.clock = plan.clock
        for missed_ns in plan.missed_ns:
            # A cut fell due while earlier cycles were still not acknowledged: the cycle that should
            # have started then is missed (the late ones count as missed themselves when acknowledged).
            await self._record(CycleStat(None, missed_ns, missed_ns, 0, 0, CycleResult.MISSED, rel.last_error))
            event(log, "cycle_missed", logging.WARNING, vm=rel.name, seq=pending[0], pending=len(pending))
        if plan.cut:
            await self.switch.before_cut()  # switched to bitmap and the backlog is shipped: back to journal
            await self._cut()
            pending = rel.pending_sequences()
        if not pending:
            return False
        for seq in pending:
            rel.check_state(S.REPLICATING)
            await self._ship_while_preparing(seq, client)
        return True

    async def _cut(self) -> int:
        """Cut now; return the sequence of the cycle it closed.

        sync-now callers waiting before the cut wait for that cycle; those that ask once it
        began (it may wait for the previous cut to settle) wait for the next one, which holds
        their writes.
        """
        self.clock = self.clock.cut_begun()
        asked = {id(f) for t, f in self._waiters if t is None}
        rel = self.rel
        began = time.time_ns()
        # The closed logs are made durable (with the images) while the bundle is built from
        # the page cache; the upload waits for that (_ship).
        if app_consistent_due(rel.rec.history, rel.rec.last_app_consistent_ns, began):
            closed, consistency = await self._frozen_cut()
            await rel.app_consistent_cut(closed[0].sequence, consistency, began)
        else:
            closed = await rel.registry.begin_cut(rel.name)
        self.clock = self.clock.cut_made(time.time_ns())
        target = closed[0].sequence
        self._waiters = [(target if t is None and id(f) in asked else t, f) for t, f in self._waiters]
        return target

    async def check_backlog(self) -> bool:
        """Between steps (waiting for a cut or a retry): the journal's backlog may pass its budget meanwhile.
        True if the VM switched to bitmap tracking (at a cut; never while a cut begun during an upload settles)."""
        if self._prepare is None and self.rel.rec.state is S.REPLICATING:
            return await self.switch.check(self._cut)
        return False

    async def _frozen_cut(self) -> tuple[list, Consistency]:
        """The cut between the freeze and thaw commands; crash-consistent if there are none or freeze fails."""
        rel = self.rel
        if self.hooks is None:
            event(log, "app_consistent_failed", logging.WARNING, vm=rel.name,
                  error=f"no freeze command is configured for VM {rel.name}",
                  hint="configure the freeze and thaw commands in agent.toml [app_consistency] (or "
                       f"[app_consistency.vm.{rel.name}]) and restart the agent; this cycle is crash-consistent")
            return await rel.registry.begin_cut(rel.name), Consistency.CRASH
        closed, frozen = await frozen_cut(self.hooks, rel.name, lambda: rel.registry.begin_cut(rel.name))
        return closed, frozen.consistency

    async def _ship_while_preparing(self, seq: int, client: ReplicaClient) -> None:
        """Ship cycle ``seq``; if the next cut falls due (or sync-now asks) meanwhile and no other
        cycle waits behind this one, cut on time and build that cycle's bundle while this one
        uploads, so the next upload starts as soon as this one is acknowledged.

        Within one cycle the build runs while the cut's fdatasync settles, and the upload
        waits for both; a cycle's cut and build do not wait for the previous upload.
        """
        rel = self.rel
        ship = asyncio.ensure_future(self._ship(seq, client))
        woken = False
        try:
            while not ship.done():
                can_prepare = (self._prepare is None and rel.rec.state is S.REPLICATING
                               and rel.vm().sequence == seq + 1)
                now = time.time_ns()
                due_s = self.clock.seconds_to_cut(now)
                if can_prepare and self.clock.wants_cut(now):
                    self._prepare = asyncio.ensure_future(self._prepare_next())
                    continue
                waker = asyncio.ensure_future(rel.wake.wait())
                try:
                    await asyncio.wait([ship, waker], timeout=due_s if can_prepare else None,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waker.cancel()
                if rel.wake.is_set():
                    rel.wake.clear()  # seen here (sync-now, a state change) and passed on below
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
                rel.wake.set()

    async def _prepare_next(self) -> Exception | None:
        """The cut that fell due during an upload, then its bundle (a failed build is left to _ship).
        Answers the error that stopped the cut, for the replication step to raise."""
        if self.rel.rec.state is not S.REPLICATING:
            return None
        try:
            seq = await self._cut()
        except Exception as exc:  # noqa: BLE001 - raised by step() like any error of a cut
            return exc
        if BitmapCycles.tracks(self.rel.vm()):
            return None  # its cycle streams from the disks when it is shipped: nothing to build ahead
        try:
            await self._bundle(seq)
        except (OSError, HvrError) as exc:
            event(log, "cycle_build_failed", logging.WARNING, vm=self.rel.name, seq=seq, error=str(exc),
                  hint="built again when the cycle is shipped")
        return None

    async def _bundle(self, seq: int) -> tuple[shipper.SpooledBundle, float]:
        """Journal mode: the spool of cycle ``seq`` (built now unless it already is) and the seconds building
        took.  (A bitmap-tracked VM's cycles stream from the disks: :mod:`hvr_agent.bitmap_cycles`.)"""
        bundle = self._spools.get(seq)
        if bundle is not None and bundle.path.exists():
            return bundle, 0.0
        rel = self.rel
        vm = rel.vm()
        build_ns = time.time_ns()
        bundle = await finish_in_thread(functools.partial(  # never leaves a thread writing the outbox
            shipper.build_cycle_bundle, self.outbox, vm_id=vm.record.vm_id, generation=rel.rec.generation,
            sequence=seq, disks=rel.disks(), compress=rel.rec.compression))
        self._spools[seq] = bundle
        return bundle, (time.time_ns() - build_ns) / NS

    async def _send(self, client: ReplicaClient, vm, seq: int, bundle, consistency, streamed: bool = False) -> int:
        """Upload a cycle (or commit one streamed); a stand-in the replica already holds (with the blocks the
        agent lost) counts as acknowledged: the regions kept marked make the next cycle consistent on top of it."""
        rel = self.rel
        try:
            if streamed:
                status, _ = await client.commit_cycle(vm.record.vm_id, seq, rel.rec.generation, bundle.sha256,
                                                      bundle.wire_bytes, consistency)
            else:
                status, _ = await client.send_cycle(vm.record.vm_id, seq, rel.rec.generation, bundle.path,
                                                    bundle.sha256, bundle.wire_bytes, consistency)
        except ReplicaConflictError as exc:
            expected = (exc.detail or {}).get("expected")
            if seq not in self.bitmap.stand_ins or exc.code != "out_of_order" or not isinstance(expected, int) \
                    or expected <= seq:
                raise
            event(log, "cycle_already_held", vm=rel.name, seq=seq, expected=expected)
            status = 200
        if seq not in self.bitmap.stand_ins and rel.rec.state_detail and "abandoned" in rel.rec.state_detail:
            await rel.update(state_detail=None)  # a cycle with its blocks went through: nothing to say any more
        self.bitmap.stand_ins.discard(seq)
        return status

    async def _ship(self, seq: int, client: ReplicaClient) -> None:
        rel = self.rel
        vm = rel.vm()
        bitmap = BitmapCycles.tracks(vm)
        bundle, built_s = (None, 0.0) if bitmap else await self._bundle(seq)
        # A log a crash could still tear must not reach the replica: the agent could not rebuild
        # the same cycle after a restart.  (Also waits for a cut made by hvrctl vm cut.)
        await rel.registry.durable(rel.name, seq)
        sent_ns = time.time_ns()
        consistency = rel.rec.consistency_of(seq)
        if bitmap:
            bundle, status = await self.bitmap.stream(client, vm, seq, consistency, self._send)
        else:
            status = await self._send(client, vm, seq, bundle, consistency)
        finished = time.time_ns()
        # Commit point: the replica holds cycle seq durably (P2); record that before deleting anything (R1).
        await rel.acknowledged(seq, finished)
        await rel.registry.acknowledged(rel.name, seq)  # bitmap mode: the write-intent marks may shrink
        for disk in rel.vm().disks.values():
            if disk.dirty is not None:
                disk.dirty.built(seq)  # acknowledged: copy-before-write disarmed, the copies go
        committed = time.time_ns()
        self._spools.pop(seq, None)
        started = bundle.cut_ns or sent_ns
        result = result_for(started, finished, rel.rec.frequency_s)
        stat = CycleStat(seq, started, finished, bundle.wire_bytes, bundle.raw_bytes, result)
        answer = {"vm": rel.name, "sequence": seq, "bytes": bundle.wire_bytes, "raw_bytes": bundle.raw_bytes,
                  "result": result.value}
        self._after_ack = asyncio.ensure_future(
            self._clean_up_cycle(self._after_ack, rel.disks(), seq, spool_path(self.outbox, seq), stat, answer))
        self.backoff.reset()
        rel.last_error = None
        event(log, "cycle_shipped", vm=rel.name, seq=seq, bytes=bundle.wire_bytes, raw_bytes=bundle.raw_bytes,
              write_bytes=bundle.write_bytes, frames=bundle.frames, compressed_frames=bundle.compressed_frames,
              already_stored=status == 200, result=result.value, consistency=consistency.value,
              latency_s=round((finished - started) / NS, 3), build_s=round(built_s, 3),
              upload_s=round((finished - sent_ns) / NS, 3), commit_s=round((committed - finished) / NS, 3))

    async def _clean_up_cycle(self, before: asyncio.Task | None, disks: list[shipper.DiskSource], seq: int,
                              spool: Path, stat: CycleStat, answer: dict) -> None:
        """After cycle ``seq`` was acknowledged and committed: delete its logs and spool, record its
        statistics, then answer ``sync-now --wait`` callers waiting for it."""
        if before is not None:
            await asyncio.wait([before])
        rel = self.rel
        began = time.time_ns()
        try:
            await asyncio.to_thread(delete_cycle_files, disks, seq, spool)
            await self._record(stat)
            if seq % 100 == 0:
                await asyncio.to_thread(rel.store.prune_cycle_stats, rel.name, stat.finished_ns - STATS_KEPT_S * NS)
        except (OSError, sqlite3.Error) as exc:  # the cycle is committed; the next start deletes what is left
            event(log, "cycle_cleanup_failed", logging.WARNING, vm=rel.name, seq=seq, error=str(exc))
        else:
            event(log, "cycle_files_deleted", logging.DEBUG, vm=rel.name, seq=seq,
                  latency_s=round((time.time_ns() - began) / NS, 3))
        waiters, self._waiters = self._waiters, []
        for target, fut in waiters:
            if target is not None and target <= seq:
                if not fut.done():
                    fut.set_result(answer)
            else:
                self._waiters.append((target, fut))

    async def _record(self, stat: CycleStat) -> None:
        await asyncio.to_thread(self.rel.store.add_cycle_stat, self.rel.name, stat)

    async def forget_upto(self, sequence: int) -> None:
        """A resync replaced the cycles up to ``sequence``: their spool files go (their logs are gone)."""
        for seq in [s for s in self._spools if s <= sequence]:
            bundle = self._spools.pop(seq)
            await asyncio.to_thread(bundle.path.unlink, missing_ok=True)

    # --- ending ------------------------------------------------------------------------------
    async def stop_prepare(self) -> None:
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
                event(log, "cycle_prepare_failed", logging.WARNING, vm=self.rel.name, error=str(exc))

    async def settle_after_ack(self) -> None:
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

    def fail_waiters(self, exc: HvrError) -> None:
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(exc)
