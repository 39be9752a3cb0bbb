"""Receiving a cycle (``PUT /v1/replicas/{vm_id}/cycles/{sequence}``): durable before it is acknowledged.

The body is received into a spool file under the VM's lock (cycles arrive
strictly in order), made durable, renamed into ``cycles/`` and recorded: the
record is the commit point of a received cycle.  The applier is woken after
every attempt, whatever happened.  The cycle's consistency (``crash``, or
``application`` when the primary froze the guest around its cut) is recorded
with it; the recovery point made when it is applied takes it.

Two forms (``docs/replication-protocol.md``).  *Counted* (journal mode): one
``PUT .../cycles/{n}`` whose body has a ``Content-Length`` and a signed
digest.  *Streamed* (bitmap mode): ``PUT .../cycles/{n}/stream`` receives a
chunked body into ``incoming/cycle-{n:010d}.{sha256}.staged`` (validated,
durable, not recorded: the listener knows the digest only at the end), then
``POST .../cycles/{n}/commit`` with the signed digest moves the staged file
whose digest it names into ``cycles/`` and records it; a staged body of
another digest is deleted and refused (``digest_mismatch``), so a cycle whose
digest did not verify is never recorded, nor applied.  A bundle of the other
form than its request is refused (``upload_form_mismatch``), never misread.
A replica paused on this server (``Suspended``) keeps receiving and storing
cycles; the applier applies them once it is resumed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from hvr_common.pure.bundle import HEADER, MAX_DISKS, BundleHeader, BundleKind, decode_header, header_size
from hvr_common.pure.bundle_decoder import BundleDecoder
from hvr_common.pure.errors import HvrError
from hvr_common.pure.recovery_points import Consistency
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_common.pure.authorization import Grant
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.files import unlink_if_exists
from hvr_listener.body_feed import TooLargeError, as_body_error, check_length, feed_checked, feed_pipelined
from hvr_listener.bundle_io import SpoolWriter, commit_file
from hvr_listener.replica_access import ReplicaAccess, check_generation, conflict
from hvr_listener.store import ListenerStore, Replica

log = logging.getLogger("hvr.listener.replicas")

# states that store cycles: a replica paused on this server (Suspended) stores them and applies none
RECEIVING = frozenset({ReplicationState.REPLICATING, ReplicationState.SUSPENDED})


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
            if rep.state not in RECEIVING:
                raise conflict("wrong_state", f"VM {rep.name} is {rep.state}, not Replicating")
            if await self._already_held(rep, sequence, generation, digest):
                return False, rep
            spool = rep.storage_dir / "incoming" / f"cycle-{sequence}.{secrets.token_hex(4)}.part"
            header = await self._receive_spool(spool, length, digest, _expect(rep, sequence, False), body)
            final = rep.storage_dir / "cycles" / f"{sequence:010d}.bundle"
            await finish_in_thread(_commit_cycle, self.store, spool, final, vm_id, sequence, generation, digest,
                                   length or 0, header.created_ns, consistency)
        event(log, "cycle_received", vm=rep.name, seq=sequence, bytes=length, consistency=consistency.value)
        return True, await self.access.get(vm_id)

    async def _receive_spool(self, spool: Path, length: int | None, digest: str, expect: dict,
                             body: AsyncIterator[bytes]) -> BundleHeader:
        check_length(length, self.max_bundle_bytes)
        decoder = BundleDecoder(keep_data=False, max_bytes=length, expect=expect)
        writer = await finish_in_thread(SpoolWriter, spool, decoder, undo=SpoolWriter.abort)
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


    async def _already_held(self, rep: Replica, sequence: int, generation: int, digest: str) -> bool:
        """True: the cycle is stored with this digest (P4).  Refuses a stored one of other contents and
        one out of sequence (P3, P8)."""
        if sequence <= rep.last_received_sequence:
            row = await asyncio.to_thread(self.store.cycle, rep.vm_id, sequence)
            if row is not None and row.digest == digest and row.generation == generation:
                return True
            raise conflict("out_of_order", f"cycle {sequence} of VM {rep.name} was already received "
                           f"with other contents", expected=rep.next_sequence)
        if sequence != rep.next_sequence:
            raise conflict("out_of_order", f"cycle {sequence} of VM {rep.name} is out of order; "
                           f"expected {rep.next_sequence}", expected=rep.next_sequence)
        return False

    # --- the streamed form ---------------------------------------------------------------
    async def stage(self, vm_id: uuid.UUID, sequence: int, peer: Grant, generation: int,
                    body: AsyncIterator[bytes]) -> tuple[str, int]:
        """Receive a streamed cycle body into a durable staged file; (its SHA-256, its length).  Nothing
        is recorded: the commit request does that once it names the same digest."""
        async with await self.access.locked(vm_id, peer):
            rep = await self.access.get(vm_id, peer)
            check_generation(rep, generation)
            if rep.state not in RECEIVING:
                raise conflict("wrong_state", f"VM {rep.name} is {rep.state}, not Replicating")
            if sequence > rep.next_sequence:
                raise conflict("out_of_order", f"cycle {sequence} of VM {rep.name} is out of order; "
                               f"expected {rep.next_sequence}", expected=rep.next_sequence)
            incoming = rep.storage_dir / "incoming"
            spool = incoming / f"cycle-{sequence}.{secrets.token_hex(4)}.part"
            writer = await finish_in_thread(SpoolWriter, spool,
                                            BundleDecoder(keep_data=False, expect=_expect(rep, sequence, True)),
                                            undo=SpoolWriter.abort)
            limit = self.max_bundle_bytes

            def feed(chunks: list) -> None:
                if writer.bytes + sum(len(c) for c in chunks) > limit:
                    raise TooLargeError(f"streamed bundle exceeds this server's limit of {limit} bytes")
                writer.feed(chunks)
            try:
                await feed_pipelined(feed, body)
                await finish_in_thread(writer.finish)
                digest = writer.sha.hexdigest()
                await finish_in_thread(_stage_file, spool, incoming, sequence, digest)
            except HvrError as exc:
                await finish_in_thread(writer.abort)
                raise as_body_error(exc) from None
            except BaseException:
                await finish_in_thread(writer.abort)
                raise
        event(log, "cycle_staged", vm=rep.name, seq=sequence, bytes=writer.bytes)
        return digest, writer.bytes

    async def commit(self, vm_id: uuid.UUID, sequence: int, peer: Grant, generation: int, digest: str,
                     length: int, consistency: Consistency = Consistency.CRASH) -> tuple[bool, Replica]:
        """Record the staged body of ``digest`` as the cycle (durable, then acknowledged); (created, replica)."""
        try:
            async with await self.access.locked(vm_id, peer):
                rep = await self.access.get(vm_id, peer)
                check_generation(rep, generation)
                if rep.state not in RECEIVING:
                    raise conflict("wrong_state", f"VM {rep.name} is {rep.state}, not Replicating")
                if await self._already_held(rep, sequence, generation, digest):
                    await asyncio.to_thread(_drop_staged, rep.storage_dir / "incoming", sequence)
                    return False, rep
                staged, created_ns = await asyncio.to_thread(_staged, rep.storage_dir / "incoming", sequence, digest,
                                                             length)
                final = rep.storage_dir / "cycles" / f"{sequence:010d}.bundle"
                await finish_in_thread(_commit_cycle, self.store, staged, final, vm_id, sequence, generation, digest,
                                       length, created_ns, consistency)
            event(log, "cycle_received", vm=rep.name, seq=sequence, bytes=length, consistency=consistency.value,
                  streamed=True)
            return True, await self.access.get(vm_id)
        finally:
            self.wake_applier.set()


def _expect(rep: Replica, sequence: int, streamed: bool) -> dict:
    return {"vm_id": rep.vm_id, "generation": rep.generation, "sequence": sequence, "kind": BundleKind.CYCLE,
            "disks": {d.disk_id: d.size_bytes for d in rep.disks}, "streamed": streamed}


def _staged_glob(sequence: int) -> str:
    return f"cycle-{sequence:010d}.*.staged"


def _stage_file(spool: Path, incoming: Path, sequence: int, digest: str) -> None:
    """The received body becomes the one staged body of ``sequence`` (an older one goes)."""
    _drop_staged(incoming, sequence)
    commit_file(spool, incoming / f"cycle-{sequence:010d}.{digest}.staged")


def _drop_staged(incoming: Path, sequence: int) -> None:
    for old in incoming.glob(_staged_glob(sequence)):
        unlink_if_exists(old)


def _staged(incoming: Path, sequence: int, digest: str, length: int) -> tuple[Path, int]:
    """The staged body of ``sequence`` with ``digest`` and its cycle time; refuses (and deletes) another."""
    path = incoming / f"cycle-{sequence:010d}.{digest}.staged"
    others = [p for p in incoming.glob(_staged_glob(sequence)) if p != path]
    if not path.exists() or os.stat(path).st_size != length:
        for other in others + [path]:
            unlink_if_exists(other)
        if others or path.exists():
            raise error("digest_mismatch", f"the streamed body of cycle {sequence} does not match the digest "
                        "and length its commit carries; it was discarded", hint="the agent sends the cycle again")
        raise error("cycle_not_staged", f"no streamed body of cycle {sequence} is held (never received, or "
                    "the replica server restarted since)", hint="the agent sends the cycle again")
    for other in others:
        unlink_if_exists(other)
    with open(path, "rb") as f:
        head = f.read(header_size(MAX_DISKS))
    if len(head) < HEADER.size:
        raise error("bundle_corrupt", f"the staged body of cycle {sequence} is shorter than its header")
    return path, decode_header(head).created_ns


def _commit_cycle(store: ListenerStore, spool: Path, final: Path, vm_id, sequence, generation, digest,
                  nbytes, created_ns, consistency: Consistency) -> None:
    """Rename the durable spool into place, then record it: the commit point of a received cycle."""
    commit_file(spool, final)
    store.record_cycle(vm_id, sequence, generation, digest, nbytes, final, created_ns, consistency.value)
