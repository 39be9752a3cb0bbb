"""Online verify (``hvrctl vm verify NAME [--repair]``): is the replica what the primary says it is?

The replica at its latest point is compared with the primary by digest tree
(:mod:`hvr_agent.compare`) while both keep running, and nothing is changed:

1. ``acked``: the last cycle the replica acknowledged; wait (bounded) until the
   replica has applied it, so its images are exactly that point;
2. compare every disk (the primary's image is live);
3. the ranges written on the primary since ``acked`` (every log after it,
   closed or active: the active one's buffer handed to the kernel first) are
   not differences: they are on their way;
4. if a cycle was acknowledged or applied meanwhile (the point moved), go
   again from 1 (at most ``ATTEMPTS`` times).

What is left are differences the replica must not have; they are reported
by disk as byte ranges (4 KiB aligned).  With ``--repair`` they are
re-journaled (:func:`hvr_agent.resync.rejournal`) and a cut taken at once, so
the next cycle repairs them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hvr_common.pure import byte_ranges as br
from hvr_common.pure.errors import ConflictError, TransientError
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.logs import event
from hvr_agent.compare import NS, CompareProgress, DiskCompare, written_since
from hvr_agent.cycles import Cycles
from hvr_agent.relationship import Relationship
from hvr_agent.replica_client import ReplicaClient
from hvr_agent.resync import mark_changed

log = logging.getLogger("hvr.agent.verify")

ATTEMPTS = 5
APPLIED_WAIT_S = 120.0


class Verify:
    def __init__(self, rel: Relationship, cycles: Cycles):
        self.rel = rel
        self.cycles = cycles
        self.progress: CompareProgress | None = None
        self.last: dict | None = None
        self._lock = asyncio.Lock()

    async def run(self, client: ReplicaClient, repair: bool) -> dict:
        if self._lock.locked():
            raise ConflictError(f"a verify of VM {self.rel.name!r} is already running")
        async with self._lock:
            try:
                return await self._run(client, repair)
            finally:
                self.progress = None

    async def _run(self, client: ReplicaClient, repair: bool) -> dict:
        rel = self.rel
        if rel.rec.state is not ReplicationState.REPLICATING:
            raise ConflictError(f"VM {rel.name!r} is {rel.rec.state.value}: only a replicating VM can be verified")
        vm = rel.vm()
        started = time.time_ns()
        for attempt in range(1, ATTEMPTS + 1):
            acked = rel.rec.next_sequence - 1
            await self._wait_applied(client, acked)
            self.progress = progress = CompareProgress(total_bytes=sum(d.size for d in vm.disks.values()))
            compares = {name: DiskCompare(disk, progress) for name, disk in vm.disks.items()}
            for dc in compares.values():
                await dc.run(client, vm.record.vm_id, None)
            for disk in vm.disks.values():
                if disk.log is not None:
                    disk.log.drain()
            written = {name: await asyncio.to_thread(written_since, disk, acked) for name, disk in vm.disks.items()}
            if rel.rec.next_sequence - 1 == acked and progress.applied_sequences <= {acked}:
                break
            event(log, "verify_point_moved", vm=rel.name, attempt=attempt, acked=acked,
                  applied=sorted(progress.applied_sequences))
        else:
            raise TransientError(f"the replica of VM {rel.name!r} moved to a new point during each of "
                                 f"{ATTEMPTS} verifies", hint="try again; a shorter verify races fewer cycles")
        differing = {}
        repaired = 0
        for name, dc in compares.items():
            disk = vm.disks[name]
            skip = br.align_out(written[name], dc.geometry.block_size, disk.size)
            differing[name] = br.subtract(dc.differing, skip)
            if repair and differing[name]:
                await mark_changed(disk, differing[name])  # journal: WRITE records, holes as TRIMs; bitmap: marks
                repaired += br.total(differing[name])
        if repaired:
            for disk in vm.disks.values():
                await disk.flush(force=True)
            self.cycles.request_sync(False)
        result = {
            "vm": rel.name, "sequence": acked, "repair": repair, "repaired_bytes": repaired,
            "compared_bytes": progress.compared_bytes, "skipped_bytes": sum(br.total(w) for w in written.values()),
            "differing_bytes": sum(br.total(r) for r in differing.values()),
            "disks": {name: [{"offset": o, "length": e - o} for o, e in ranges] for name, ranges in differing.items()},
            "elapsed_s": round((time.time_ns() - started) / NS, 3),
        }
        self.last = result
        event(log, "verify_finished", logging.WARNING if result["differing_bytes"] else logging.INFO, vm=rel.name,
              seq=acked, differing_bytes=result["differing_bytes"], repaired_bytes=repaired,
              latency_s=result["elapsed_s"])
        return result

    async def _wait_applied(self, client: ReplicaClient, acked: int) -> None:
        """Until the replica applied cycle ``acked`` (it applies every cycle it acknowledged, in order)."""
        vm_id = self.rel.vm().record.vm_id
        try:
            async with asyncio.timeout(APPLIED_WAIT_S):
                while True:
                    view = await client.replica_state(vm_id)
                    if view.get("last_applied_sequence", 0) >= acked:
                        return
                    await asyncio.sleep(0.2)  # polling the replica's progress: nothing to wait on locally
        except TimeoutError:
            raise TransientError(f"the replica of VM {self.rel.name!r} has not applied cycle {acked} "
                                 f"within {APPLIED_WAIT_S:.0f} s", hint="hvrctl replica get on the replica host")
