"""Resynchronization (``WaitingForStartResynchronize`` -> ``Resynchronizing`` -> ``Replicating``).

Never a blind copy: the disks are compared with the replica by digest tree
(:mod:`hvr_agent.compare`), and each block found different is **re-journaled**:
its current contents are read from the image and appended to the disk's
active log as a WRITE record (a hole as a TRIM) in one step of the event
loop, so the record takes its place in the order of the guest's writes.  The
next cycle ships those records with the guest's; the replica applies that
cycle like any other (crash-safely, with undo capture), so it stays at its
last applied point until then and keeps its recovery points.  Why this
converges although the image is read live: ``docs/resync.md``.

The compare of each disk keeps its descent: a suspension (``vm suspend``:
``ResynchronizeSuspended``) or a lost link stops it between two questions, and
``vm resume`` (or the retry) continues where it stopped.  ``vm resync
--cancel`` drops the compare and waits for the operator
(``WaitingForStartResynchronize``).  When every disk was compared, the logs
are made durable (so the re-journaled records survive a crash), the state
goes to ``Replicating`` and a cut is taken at once.

A restart of the agent forgets a compare in progress: the VM is still
``Resynchronizing`` and compares again from the start (a compare changes
nothing on the replica, and re-journaled blocks are shipped either way).
"""

from __future__ import annotations

import logging
import time

from hvr_common.pure import byte_ranges as br
from hvr_common.pure.replication_state import Action, ReplicationState, allowed_actions
from hvr_common.shell import sparse
from hvr_common.shell.logs import event
from hvr_agent.compare import NS, CompareProgress, DiskCompare
from hvr_agent.cycles import Cycles
from hvr_agent.relationship import Relationship, Stopped
from hvr_agent.replica_client import ReplicaClient
from hvr_agent.tracker import TrackedDisk

log = logging.getLogger("hvr.agent.resync")

S = ReplicationState
PIECE_BYTES = 1024 * 1024  # re-journaled per event-loop step


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


class Resync:
    """One VM's resynchronization: when it starts, the compare in progress, its progress."""

    def __init__(self, rel: Relationship, cycles: Cycles):
        self.rel = rel
        self.cycles = cycles
        # When a waiting resync starts: 0 at once (the default: an automatic resync), a time (--at),
        # or None: only when the operator asks (after --cancel).  Kept in memory; a restart starts at once.
        self.start_at_ns: int | None = 0
        self.progress: CompareProgress | None = None
        self.last: dict | None = None  # the last finished resync's figures
        self._compares: dict[str, DiskCompare] | None = None

    # --- verbs -------------------------------------------------------------------------------
    def schedule(self, at_ns: int | None) -> None:
        self.start_at_ns = at_ns or 0

    def cancel(self) -> None:
        self.start_at_ns = None
        self._compares = None
        self.progress = None

    async def require_if_changed_offline(self) -> None:
        """At the task's start: an image changed while the agent did not serve it needs a compare."""
        rel = self.rel
        vm = rel.vm()
        if not vm.changed_offline:
            return
        reasons = "; ".join(f"disk {disk}: {why}" for disk, why in vm.changed_offline.items())
        vm.changed_offline.clear()
        if Action.REQUIRE_RESYNC in allowed_actions("primary", rel.rec.state):
            self.start_at_ns = 0
            await rel.set_state(Action.REQUIRE_RESYNC, f"resynchronization required: {reasons}")
            event(log, "resync_required", logging.WARNING, vm=rel.name, reason=reasons)

    # --- the steps ---------------------------------------------------------------------------
    def wait_s(self, now_ns: int) -> float | None:
        if self.start_at_ns is None:
            return None
        return max(0.0, (self.start_at_ns - now_ns) / NS)

    async def wait_step(self, _client: ReplicaClient) -> bool:
        """``WaitingForStartResynchronize``: start when the time comes."""
        if self.start_at_ns is None or time.time_ns() < self.start_at_ns:
            return False
        await self.rel.set_state(Action.RESYNC, "comparing the disks with the replica")
        return True

    async def step(self, client: ReplicaClient) -> bool:
        """``Resynchronizing``: compare every disk (continuing a stopped compare), then back to Replicating."""
        rel = self.rel
        vm = rel.vm()
        if self._compares is None:
            self.progress = CompareProgress(total_bytes=sum(d.size for d in vm.disks.values()))
            self._compares = {name: DiskCompare(disk, self.progress) for name, disk in vm.disks.items()}
            event(log, "resync_started", vm=rel.name, disks=list(vm.disks), bytes=self.progress.total_bytes)
        progress = self.progress
        for dc in self._compares.values():
            await dc.run(client, vm.record.vm_id, self._send, self._still_resyncing)
        for disk in vm.disks.values():  # the re-journaled records are durable before the state says done
            await disk.flush(force=True)
        rel.check_state(S.RESYNCHRONIZING)
        await rel.set_state(Action.COMPLETE_RESYNC, None)
        self.cycles.cut_soon()
        self.last = dict(progress.to_json(), finished_ns=time.time_ns(),
                         differing_ranges={n: len(dc.differing) for n, dc in self._compares.items()})
        self._compares = None
        self.progress = None
        event(log, "resync_completed", vm=rel.name, bytes=progress.total_bytes,
              differing_bytes=progress.differing_bytes, sent_bytes=progress.sent_bytes,
              latency_s=round((time.time_ns() - progress.started_ns) / NS, 3))
        return True

    def _still_resyncing(self) -> bool:
        return self.rel.rec.state is S.RESYNCHRONIZING

    async def _send(self, disk: TrackedDisk, ranges: list[br.Range]) -> None:
        self.rel.check_state(S.RESYNCHRONIZING)
        self.progress.sent_bytes += rejournal(disk, ranges)

    def status(self) -> dict | None:
        if self.progress is not None:
            return dict(self.progress.to_json(), running=True)
        return dict(self.last, running=False) if self.last else None
