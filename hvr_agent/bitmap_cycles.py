"""One VM's bitmap-mode cycles: their snapshots, stand-ins, abandonment, and their streamed sending.

A bitmap-tracked VM's cycle is the cut-time contents of its frozen blocks
(:mod:`hvr_agent.cut_snapshot`), sent as it is read from the disks
(:mod:`hvr_agent.cycle_stream`: no spool file) and committed with its
digest.  A cycle whose blocks the agent no longer holds ships as an empty
*stand-in*, its blocks carried by the next cycle (docs/bitmap-tracking.md,
B7, B8).
"""

from __future__ import annotations

import asyncio
import logging

from hvr_common.pure.recovery_points import Consistency
from hvr_common.shell.logs import event
from hvr_agent import shipper
from hvr_agent.cut_snapshot import SnapshotAbandoned
from hvr_agent.cycle_stream import CycleStream
from hvr_agent.relationship import Relationship
from hvr_agent.replica_client import ReplicaClient

log = logging.getLogger("hvr.agent.replication")


class BitmapCycles:
    def __init__(self, rel: Relationship, spools: dict):
        self.rel = rel
        self.spools = spools  # the spool files of Cycles by sequence (an abandonment drops the later ones)
        self.stand_ins: set[int] = set()  # cycles sent without their blocks (see snapshots)

    async def snapshots(self, vm, seq: int) -> dict | None:
        """Bitmap mode: the frozen cycle ``seq`` of every disk.  A cycle whose blocks the agent no
        longer holds (cut before a restart, or abandoned) is a stand-in: it ships empty, and the
        write-intent regions make a later cycle carry its blocks (docs/bitmap-tracking.md)."""
        disks = list(vm.disks.values())
        if all(d.dirty is None for d in disks):  # journal mode (and no bitmap cycle left from before a switch)
            return None
        found = {n: d.dirty.snapshots[seq] for n, d in vm.disks.items() if d.dirty and seq in d.dirty.snapshots}
        if not found and any(d.dirty and seq in d.dirty.frozen for d in disks):  # its snapshot closed since
            await self.abandon(vm, seq, f"cycle {seq} was abandoned: its copies were dropped before it was "
                                        "acknowledged")
        if not found:
            self.stand_ins.add(seq)
        return found

    async def abandon(self, vm, seq: int, why: str) -> None:
        """Abandon cycle ``seq`` and every later one cut: each disk's blocks of them go into the current
        cycle, they ship empty; the replica skips to the next consistent point, no resynchronization."""
        gone = [d.dirty.abandon_from(seq, d.intent) for d in vm.disks.values() if d.dirty is not None]
        for later in [s for s in self.spools if s >= seq]:
            del self.spools[later]  # built with blocks of their own cycle only: built again
        self.stand_ins.update(range(seq, vm.sequence))
        event(log, "cycle_abandoned", logging.WARNING, vm=self.rel.name, seq=seq, reason=why,
              cycles=sorted({s for g in gone for s in g}), hint="nothing to do: the next cycle carries its blocks, "
                                                                 "no resynchronization is needed")
        await self.rel.update(state_detail=why + "; its blocks are carried by the next cycle")

    @staticmethod
    def tracks(vm) -> bool:
        """A disk of the VM is bitmap-tracked (or holds bitmap cycles from before a switch): cycles stream."""
        return any(d.dirty is not None for d in vm.disks.values())

    async def stream(self, client: ReplicaClient, vm, seq: int, consistency, send) -> tuple[shipper.SpooledBundle, int]:
        """Bitmap mode: send cycle ``seq`` as it is read from the disks (no spool file), then commit it
        with its digest.  A cycle whose snapshot gave up copy-before-write is abandoned and sent as a stand-in."""
        rel = self.rel
        while True:
            snapshots = await self.snapshots(vm, seq)
            if seq in self.stand_ins:  # it holds the replica's previous point, not what a freeze made (B7)
                consistency = Consistency.CRASH
            stream = CycleStream(vm_id=vm.record.vm_id, generation=rel.rec.generation, sequence=seq,
                                 disks=rel.disks(), compress=rel.rec.compression, snapshots=snapshots or {})
            upload = asyncio.ensure_future(client.stream_cycle(vm.record.vm_id, seq, rel.rec.generation,
                                                               stream.body()))
            failed = asyncio.ensure_future(stream.failed.wait())
            try:
                await asyncio.wait([upload, failed], return_when=asyncio.FIRST_COMPLETED)
                if not upload.done():  # the stream failed while the upload was stuck (the link is down)
                    upload.cancel()
                    await asyncio.wait([upload])
                if stream.error is None:
                    upload.result()
                elif not upload.cancelled():
                    upload.exception()  # superseded by the stream's error
            finally:
                failed.cancel()
                if not upload.done():
                    upload.cancel()
                    await asyncio.wait([upload])
                await stream.close()
            if isinstance(stream.error, SnapshotAbandoned):
                await self.abandon(vm, seq, f"cycle {seq} was abandoned: {stream.error}")
                continue
            if stream.error is not None:
                raise stream.error
            bundle = stream.bundle
            if snapshots:
                event(log, "cycle_built", vm=rel.name, seq=seq, bytes=bundle.wire_bytes, streamed=True,
                      write_bytes=bundle.write_bytes, cbw_bytes=sum(s.copied_bytes for s in snapshots.values()))
            return bundle, await send(client, vm, seq, bundle, consistency, streamed=True)
