"""Receiving a cycle (``PUT /v1/replicas/{vm_id}/cycles/{sequence}``): durable before it is acknowledged.

The body is received into a spool file under the VM's lock (cycles arrive
strictly in order), made durable, renamed into ``cycles/`` and recorded: the
record is the commit point of a received cycle.  The applier is woken after
every attempt, whatever happened.  The cycle's consistency (``crash``, or
``application`` when the primary froze the guest around its cut) is recorded
with it; the recovery point made when it is applied takes it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from hvr_common.pure.bundle import BundleHeader, BundleKind
from hvr_common.pure.bundle_decoder import BundleDecoder
from hvr_common.pure.errors import HvrError
from hvr_common.pure.recovery_points import Consistency
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_common.pure.authorization import Grant
from hvr_listener.body_feed import as_body_error, check_length, feed_checked
from hvr_listener.bundle_io import SpoolWriter, commit_file
from hvr_listener.replica_access import ReplicaAccess, check_generation, conflict
from hvr_listener.store import ListenerStore, Replica

log = logging.getLogger("hvr.listener.replicas")


class CycleReceipt:
    def __init__(self, access: ReplicaAccess, max_bundle_bytes: int, wake_applier: asyncio.Event):
        self.access = access
        self.store = access.store
        self.max_bundle_bytes = max_bundle_bytes
        self.wake_applier = wake_applier

    async def receive(self, vm_id: uuid.UUID, sequence: int, peer: Grant, generation: int,
                      length: int | None, digest: str, body: AsyncIterator[bytes],
                      consistency: Consistency = Consistency.CRASH) -> tuple[bool, Replica]:
        """Store a cycle durably.  Returns (created, replica).  A cycle already stored keeps its consistency."""
        try:
            return await self._receive(vm_id, sequence, peer, generation, length, digest, body, consistency)
        finally:
            self.wake_applier.set()  # whatever happened, a stored cycle must not wait for the next one

    async def _receive(self, vm_id, sequence, peer, generation, length, digest, body, consistency):
        async with await self.access.locked(vm_id, peer):
            rep = await self.access.get(vm_id, peer)
            check_generation(rep, generation)
            if rep.state != ReplicationState.REPLICATING:
                raise conflict("wrong_state", f"VM {rep.name} is {rep.state}, not Replicating")
            if sequence <= rep.last_received_sequence:
                row = await asyncio.to_thread(self.store.cycle, vm_id, sequence)
                if row is not None and row.digest == digest and row.generation == generation:
                    return False, rep
                raise conflict("out_of_order", f"cycle {sequence} of VM {rep.name} was already received "
                               f"with other contents", expected=rep.next_sequence)
            if sequence != rep.next_sequence:
                raise conflict("out_of_order", f"cycle {sequence} of VM {rep.name} is out of order; "
                               f"expected {rep.next_sequence}", expected=rep.next_sequence)
            expect = {"vm_id": vm_id, "generation": rep.generation, "sequence": sequence, "kind": BundleKind.CYCLE,
                      "disks": {d.disk_id: d.size_bytes for d in rep.disks}}
            spool = rep.storage_dir / "incoming" / f"cycle-{sequence}.{secrets.token_hex(4)}.part"
            header = await self._receive_spool(spool, length, digest, expect, body)
            final = rep.storage_dir / "cycles" / f"{sequence:010d}.bundle"
            await finish_in_thread(_commit_cycle, self.store, spool, final, vm_id, sequence, generation, digest,
                                   length or 0, header.created_ns, consistency)
        event(log, "cycle_received", vm=rep.name, seq=sequence, bytes=length, consistency=consistency.value)
        return True, await self.access.get(vm_id)

    async def _receive_spool(self, spool: Path, length: int | None, digest: str, expect: dict,
                             body: AsyncIterator[bytes]) -> BundleHeader:
        check_length(length, self.max_bundle_bytes)
        decoder = BundleDecoder(keep_data=False, max_bytes=length, expect=expect)
        writer = await finish_in_thread(SpoolWriter, spool, decoder)
        try:
            await feed_checked(writer, body, length, digest)
            done = await finish_in_thread(writer.finish)
        except HvrError as exc:
            await finish_in_thread(writer.abort)
            raise as_body_error(exc) from None
        except BaseException:
            await finish_in_thread(writer.abort)
            raise
        return done.header


def _commit_cycle(store: ListenerStore, spool: Path, final: Path, vm_id, sequence, generation, digest,
                  nbytes, created_ns, consistency: Consistency) -> None:
    """Rename the durable spool into place, then record it: the commit point of a received cycle."""
    commit_file(spool, final)
    store.record_cycle(vm_id, sequence, generation, digest, nbytes, final, created_ns, consistency.value)
