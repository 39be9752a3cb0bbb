"""Resynchronization (``WaitingForStartResynchronize`` -> ``Resynchronizing`` -> ``Replicating``).

Never a blind copy (``docs/resync.md``): once the replica applied what it
stored, the VM is cut (``A``), its disks are compared with the replica by
digest tree (:mod:`hvr_agent.compare`), and each block found different is
**re-journaled**: its current contents are read from the image and appended
to the disk's active log as a WRITE record (a hole as a TRIM) in one step of
the event loop, so the record takes its place in the order of the guest's
writes.  Then the replica is rebased (``resync/complete``: it drops the
stored cycles it had not applied and expects ``A + 1``), the logs up to ``A``
are deleted and the state is ``Replicating``: the next cycles carry the
re-journaled blocks, applied like any other (crash-safely, with undo
capture), so the replica stays at its last applied point until then and
keeps its recovery points.

The compare of each disk keeps its descent: a suspension (``vm suspend``:
``ResynchronizeSuspended``) or a lost link stops it between two questions, and
``vm resume`` (or the retry) continues where it stopped.  ``vm resync
--cancel`` drops the compare and waits for the operator
(``WaitingForStartResynchronize``).  A restart of the agent continues a
compare from its checkpoint (:mod:`hvr_agent.compare_checkpoint`): the same
cut, the nodes still to compare, the saved trees; without a usable one it
compares again from a new cut (a compare changes nothing on the replica).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

from hvr_common.pure import byte_ranges as br
from hvr_common.pure.errors import HvrError, TransientError
from hvr_common.pure.wire.error_catalogue import RemoteError
from hvr_common.pure.resync_window import ResyncWindow
from hvr_common.pure.replication_state import Action, ReplicationState, allowed_actions
from hvr_common.shell import sparse
from hvr_common.shell.logs import event
from hvr_agent import compare_checkpoint as checkpoints
from hvr_agent.compare import NS, CompareProgress, DiskCompare
from hvr_agent.cycles import Cycles
from hvr_agent.housekeeping import delete_logs_upto
from hvr_agent.relationship import Relationship, Stopped
from hvr_agent.replica_client import ReplicaClient
from hvr_agent.tracker import TrackedDisk

log = logging.getLogger("hvr.agent.resync")

S = ReplicationState
PIECE_BYTES = 1024 * 1024  # re-journaled per event-loop step
SETTLE_WAIT_S = 300.0


# What a resync cures while cycles are shipped: the replica refuses a cycle out of sequence, or is in Error
# (a stored cycle could not be applied: it refuses cycles as "not Replicating"), or a closed log is damaged
# or not the cycle it should be.  The resync replaces every cycle up to its cut (docs/resync.md).
REPLICA_REFUSALS = frozenset({"out_of_order", "wrong_state"})
DAMAGED_LOG = frozenset({"hrl_corrupt", "corrupt"})


def resync_cures(exc: HvrError) -> bool:
    if isinstance(exc, TransientError):
        return False
    if isinstance(exc, RemoteError):
        return exc.code in REPLICA_REFUSALS
    return exc.code in DAMAGED_LOG


def rejournal(disk: TrackedDisk, ranges: list[br.Range]) -> int:
    """Append the current contents of ``ranges`` to the disk's active log (synchronous: each piece is read
    and appended in one step, so no guest write can fall between the two).  Returns the bytes written."""
    fd = disk.device.fd
    sent = 0
    for offset, end in br.split(ranges, PIECE_BYTES):
        if disk.log is None:
            raise Stopped()  # the disk is closing
        for run_offset, length, is_data in sparse.data_extents(fd, offset, end - offset):
            if is_data:
                disk.log.append_write(run_offset, disk.pread(run_offset, length), 0)
                sent += length
            else:
                disk.log.append_trim(run_offset, length, 0)
        disk.log.drain_if_full()
    return sent


async def mark_changed(disk: TrackedDisk, ranges: list[br.Range]) -> int:
    """Send ``ranges`` with the next cycle: in bitmap mode their blocks are marked changed (the write-intent
    regions durably first, as a guest write marks them), in journal mode their current contents are
    re-journaled.  Returns the bytes the next cycle will carry for them."""
    if not disk.bitmap:
        return rejournal(disk, ranges)
    if disk.log is None or disk.dirty is None:
        raise Stopped()  # the disk is closing
    size = disk.intent.region_bytes
    regions = sorted({r for off, end in ranges for r in range(off // size, (end - 1) // size + 1) if end > off})
    if regions:
        await disk.intent.mark(regions)
    disk.dirty.seed([(off, end - off) for off, end in ranges])
    return br.total(ranges)


class Resync:
    """One VM's resynchronization: when it starts, the compare in progress, its progress."""

    def __init__(self, rel: Relationship, cycles: Cycles, window: ResyncWindow | None = None):
        self.rel = rel
        self.cycles = cycles
        self.window = window  # agent.toml [resync]: when an automatic resync may start (None: at once)
        # When a waiting resync starts: 0 at once (the default: an automatic resync), a time (--at),
        # or None: only when the operator asks (after --cancel).  Kept in memory; a restart starts at once.
        self.start_at_ns: int | None = 0
        self.progress: CompareProgress | None = None
        self.last: dict | None = None  # the last finished resync's figures
        self._compares: dict[str, DiskCompare] | None = None
        self._base: int | None = None  # the cut the compare started after: cycles up to it are replaced
        self._replica_applied = 0  # the replica's last applied cycle when the compare started
        self._saved_ns = 0  # when the checkpoint was last written (monotonic)
        self._saved_bytes = 0  # the bytes compared then
        self._trees_saved: set[str] = set()
        self._saving: asyncio.Future | None = None  # the checkpoint being written beside the compare

    # --- verbs -------------------------------------------------------------------------------
    def schedule(self, at_ns: int | None) -> None:
        self.start_at_ns = at_ns or 0

    def schedule_automatic(self) -> str:
        """A resync hvr starts by itself: at once, or at the next opening of the VM's window; says when."""
        if self.window is None:
            self.start_at_ns = 0
            return "at once"
        opens = self.window.next_open(datetime.datetime.now().astimezone())
        self.start_at_ns = int(opens.timestamp() * NS)
        return f"in the resync window {self.window} (from {opens.isoformat(timespec='minutes')})"

    def cancel(self) -> None:
        self.start_at_ns = None
        self._compares = None
        self._base = None
        self.progress = None
        self._forget_checkpoint()

    async def require_if_changed_offline(self) -> None:
        """At the task's start: an image changed while the agent did not serve it needs a compare."""
        rel = self.rel
        vm = rel.vm()
        if rel.rec.state is S.WAITING_FOR_START_RESYNCHRONIZE:
            self.schedule_automatic()  # after a restart: by the window (a --at time was kept in memory only)
        if not vm.changed_offline:
            return
        reasons = "; ".join(f"disk {disk}: {why}" for disk, why in vm.changed_offline.items())
        vm.changed_offline.clear()
        self._forget_checkpoint()  # what it recorded as compared may have been changed meanwhile
        if Action.REQUIRE_RESYNC in allowed_actions("primary", rel.rec.state):
            when = self.schedule_automatic()
            await rel.set_state(Action.REQUIRE_RESYNC, f"resynchronization required ({when}): {reasons}")
            event(log, "resync_required", logging.WARNING, vm=rel.name, reason=reasons, starts=when)

    # --- the steps ---------------------------------------------------------------------------
    def wait_s(self, now_ns: int) -> float | None:
        if self.start_at_ns is None:
            return None
        return max(0.0, (self.start_at_ns - now_ns) / NS)

    async def wait_step(self, _client: ReplicaClient) -> bool:
        """``WaitingForStartResynchronize``: start when the time comes."""
        if self.start_at_ns is None or time.time_ns() < self.start_at_ns:
            return False
        await asyncio.to_thread(self._forget_checkpoint)  # a new resync starts from a new cut
        await self.rel.set_state(Action.RESYNC, "comparing the disks with the replica")
        return True

    async def step(self, client: ReplicaClient) -> bool:
        """``Resynchronizing``: compare every disk (continuing a stopped compare), then back to Replicating."""
        rel = self.rel
        vm = rel.vm()
        if self._compares is None and not await self._resume(client):
            await asyncio.to_thread(self._forget_checkpoint)
            self._replica_applied = await self._wait_replica_settled(client, vm.record.vm_id)
            # durable: the compare starts after it; no cycle ships this cut (its cycles are replaced)
            closed = await rel.registry.cut(rel.name, shipped=False)
            self._base = closed[0].sequence if closed else vm.sequence - 1
            self.progress = CompareProgress(total_bytes=sum(d.size for d in vm.disks.values()))
            self._compares = {name: DiskCompare(disk, self.progress, "resync") for name, disk in vm.disks.items()}
            self._saved_ns, self._saved_bytes = time.monotonic_ns(), 0
            event(log, "resync_started", vm=rel.name, disks=list(vm.disks), bytes=self.progress.total_bytes)
        progress = self.progress
        try:
            for dc in self._compares.values():
                await dc.run(client, vm.record.vm_id, self._send, self._still_resyncing, self._checkpoint_due)
            await self._finish_saving()
        except Stopped:
            if self._compares is not None and rel.rec.state is S.RESYNCHRONIZE_SUSPENDED:
                await self._save_checkpoint()  # suspended: a restart meanwhile continues from here
            else:
                await self._finish_saving()
                if self._compares is None:  # cancelled: what was being written meanwhile goes too
                    await asyncio.to_thread(self._forget_checkpoint)
            raise
        except BaseException:
            saving, self._saving = self._saving, None
            if saving is not None:
                await asyncio.wait([saving])
                if not saving.cancelled():
                    saving.exception()  # the step's own failure is the one raised
            raise
        for disk in vm.disks.values():  # the re-journaled records are durable before the state says done
            await disk.flush(force=True)
        rel.check_state(S.RESYNCHRONIZING)
        base = self._base
        # The cycles up to the cut are replaced by the compare: the replica drops those it stored and
        # expects base + 1 (which holds the re-journaled blocks); then the primary forgets them too.
        await client.complete_resync(vm.record.vm_id, rel.rec.generation, base + 1)
        await asyncio.to_thread(delete_logs_upto, rel.disks(), base)
        await self.cycles.forget_upto(base)
        await rel.set_state(Action.COMPLETE_RESYNC, None, next_sequence=base + 1)
        self.cycles.cut_soon()
        self.last = dict(progress.to_json(), finished_ns=time.time_ns(),
                         differing_ranges={n: len(dc.differing) + dc.restored_ranges
                                           for n, dc in self._compares.items()})
        self._compares = None
        self._base = None
        self.progress = None
        await asyncio.to_thread(self._forget_checkpoint)
        event(log, "resync_completed", vm=rel.name, next_seq=base + 1, bytes=progress.total_bytes,
              differing_bytes=progress.differing_bytes, sent_bytes=progress.sent_bytes,
              latency_s=round((time.time_ns() - progress.started_ns) / NS, 3))
        return True

    async def _wait_replica_settled(self, client: ReplicaClient, vm_id) -> int:
        """Until the replica applied every cycle it stored (or cannot: it is in Error), so its images do not
        change while they are compared; returns its last applied cycle."""
        try:
            async with asyncio.timeout(SETTLE_WAIT_S):
                while True:
                    view = await client.replica_state(vm_id)
                    if view.get("state") == S.ERROR.value or \
                            view.get("last_applied_sequence", 0) >= view.get("last_received_sequence", 0):
                        return view.get("last_applied_sequence", 0)
                    await asyncio.sleep(0.2)  # polling the replica's progress: nothing to wait on locally
        except TimeoutError:
            raise TransientError(f"the replica of VM {self.rel.name!r} has not applied its stored cycles "
                                 f"within {SETTLE_WAIT_S:.0f} s",
                                 hint="hvrctl replica get on the replica host") from None

    # --- the checkpoint (compare_checkpoint; docs/resync.md "A restart continues the compare") -------
    def _vm_log_base(self):
        return next(iter(self.rel.vm().disks.values())).log_base

    def _forget_checkpoint(self) -> None:
        """Blocking (small): the checkpoint and the saved trees go."""
        vm = self.rel.registry.vms.get(self.rel.name)
        if vm is None or not vm.disks:
            return
        checkpoints.remove(self._vm_log_base(), [d.log_base for d in vm.disks.values()])
        self._trees_saved = set()

    async def _checkpoint_due(self) -> None:
        """After an answer: start writing a checkpoint when one is due (one at a time, beside the compare)."""
        if self._saving is not None:
            if not self._saving.done():
                return
            saving, self._saving = self._saving, None
            saving.result()  # a failed checkpoint fails the step (retried)
        if time.monotonic_ns() - self._saved_ns >= checkpoints.INTERVAL_S * NS or \
                self.progress.compared_bytes - self._saved_bytes >= checkpoints.STEP_BYTES or \
                any(dc.tree is not None and name not in self._trees_saved for name, dc in self._compares.items()):
            self._saving = asyncio.ensure_future(self._write_checkpoint(*self._snapshot()))

    async def _save_checkpoint(self) -> None:
        """A checkpoint now (the compare is stopped), after any still being written."""
        await self._finish_saving()
        await self._write_checkpoint(*self._snapshot())

    async def _finish_saving(self) -> None:
        saving, self._saving = self._saving, None
        if saving is not None:
            await saving

    def _snapshot(self) -> tuple[checkpoints.ResyncCheckpoint, dict]:
        """What the checkpoint will say, taken between two answers (synchronous: consistent)."""
        vm = self.rel.vm()
        progress = self.progress
        trees = {name: dc.tree for name, dc in self._compares.items()
                 if dc.tree is not None and name not in self._trees_saved}
        cp = checkpoints.ResyncCheckpoint(
            str(vm.record.vm_id), self._base, self._replica_applied,
            {k: getattr(progress, k) for k in checkpoints.COUNTERS},
            {name: checkpoints.DiskCheckpoint(str(dc.disk.identity.disk_id), dc.disk.size, dc.pending_runs(),
                                              dc.descent.compared_bytes, len(dc.differing) + dc.restored_ranges,
                                              dc.tree is not None)
             for name, dc in self._compares.items()})
        return cp, trees

    async def _write_checkpoint(self, cp: checkpoints.ResyncCheckpoint, trees: dict) -> None:
        """The re-journaled records durable (every record the snapshot counts was appended before this flush),
        the new trees saved, then the checkpoint (its commit point)."""
        vm = self.rel.vm()
        for disk in vm.disks.values():
            await disk.flush(force=True)
        for name, tree in trees.items():
            await asyncio.to_thread(checkpoints.save_tree, vm.disks[name].log_base, tree)
            self._trees_saved.add(name)
        await asyncio.to_thread(checkpoints.save, self._vm_log_base(), cp)
        self._saved_ns, self._saved_bytes = time.monotonic_ns(), cp.counters["compared_bytes"]

    async def _resume(self, client: ReplicaClient) -> bool:
        """After a restart: continue the compare from its checkpoint if it still holds (same VM, disks, sizes,
        cut; the replica still at the point it was compared at); False: start again."""
        rel = self.rel
        vm = rel.vm()
        cp = await asyncio.to_thread(checkpoints.load, self._vm_log_base())
        if cp is None:
            return False
        why = None
        if cp.vm_id != str(vm.record.vm_id) or set(cp.disks) != set(vm.disks):
            why = "another VM or other disks"
        elif any(cp.disks[n].disk_id != str(d.identity.disk_id) or cp.disks[n].size != d.size
                 for n, d in vm.disks.items()):
            why = "a disk's id or size differs"
        elif not rel.rec.next_sequence - 1 <= cp.base < vm.sequence:
            why = f"its cut {cp.base} is not between the shipped cycles and the active log {vm.sequence}"
        else:
            applied = await self._wait_replica_settled(client, vm.record.vm_id)
            if applied != cp.replica_applied:
                why = f"the replica is at cycle {applied}, not {cp.replica_applied}"
        compares = {}
        if why is None:
            progress = CompareProgress(**cp.counters)
            for name, disk in vm.disks.items():
                dcp = cp.disks[name]
                dc = DiskCompare(disk, progress, "resync")
                tree = await asyncio.to_thread(checkpoints.load_tree, disk.log_base, dc.geometry) \
                    if dcp.tree_saved else None
                try:
                    dc.resume(dcp.pending, dcp.compared_bytes, dcp.differing_ranges, tree)
                except HvrError as exc:
                    why = f"disk {name}: {exc}"
                    break
                compares[name] = dc
        if why is not None:
            event(log, "resync_checkpoint_dropped", logging.WARNING, vm=rel.name, reason=why)
            return False
        progress.resumed_bytes = progress.compared_bytes
        progress.scanned_bytes = sum(dc.disk.size for dc in compares.values() if dc.tree is not None)  # others again
        self.progress, self._compares = progress, compares
        self._base, self._replica_applied = cp.base, cp.replica_applied
        self._trees_saved = {n for n, dc in compares.items() if dc.tree is not None}
        self._saved_ns, self._saved_bytes = time.monotonic_ns(), progress.compared_bytes
        event(log, "resync_resumed", vm=rel.name, base=cp.base, compared_bytes=progress.compared_bytes,
              sent_bytes=progress.sent_bytes, bytes=progress.total_bytes)
        return True

    def _still_resyncing(self) -> bool:
        return self.rel.rec.state is S.RESYNCHRONIZING

    async def _send(self, disk: TrackedDisk, ranges: list[br.Range]) -> None:
        self.rel.check_state(S.RESYNCHRONIZING)
        self.progress.sent_bytes += await mark_changed(disk, ranges)

    def status(self) -> dict | None:
        if self.progress is not None:
            return dict(self.progress.to_json(), running=True)
        return dict(self.last, running=False) if self.last else None
