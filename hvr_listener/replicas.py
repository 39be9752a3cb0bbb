"""Replica VMs on this server: enabling, initial replication, receiving cycles.

The business rules of the replication API live here; the HTTP shell
(:mod:`hvr_listener.replication_api`) only authenticates, parses and maps
errors.  Every rule that refuses a request does so before anything changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from hvr_common.pure.bundle import BundleKind
from hvr_common.pure.bundle_decoder import BundleDecoder
from hvr_common.pure.errors import ConflictError, HvrError, NotFoundError, UsageError
from hvr_common.shell.logs import event
from hvr_common.pure.replication_state import Action, ReplicationState, transition
from hvr_common.shell.threads import finish_in_thread
from hvr_listener.bundle_io import DirectWindowWriter, SpoolWriter, commit_file, fsync_dir
from hvr_listener.store import ListenerStore, Replica

log = logging.getLogger("hvr.listener.replicas")

# A pipelined initial window that arrives before the one it follows waits this long for it.
PREDECESSOR_WAIT_S = 3.0

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FREQUENCIES = (30, 300, 900)
MAX_DISK_BYTES = 64 * 1024 ** 4


class ForbiddenError(HvrError):
    code = "not_authorized"
    exit_code = 77


class BodyError(UsageError):
    """The request body is damaged or malformed (400)."""


class TooLargeError(UsageError):
    code = "body_too_large"


class LengthRequiredError(UsageError):
    code = "length_required"


def _conflict(code: str, message: str, **detail) -> ConflictError:
    exc = ConflictError(message, detail=detail or None)
    exc.code = code
    return exc


class ReplicaService:
    def __init__(self, store: ListenerStore, storage: Callable[[], str], max_bundle_bytes: int):
        self.store = store
        self.storage = storage  # the current default storage location (a setting)
        self.max_bundle_bytes = max_bundle_bytes
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._image_locks: dict[uuid.UUID, asyncio.Lock] = {}
        # disk id -> [(end, future of "it became durable")] of the initial windows in progress
        self._windows: dict[uuid.UUID, list[tuple[int, asyncio.Future]]] = {}
        self._window_changed = asyncio.Event()  # replaced (after being set) whenever a window starts or ends
        self.applied = asyncio.Condition()  # notified after every applied cycle
        self.wake_applier = asyncio.Event()

    async def locked(self, vm_id: uuid.UUID, principal: str | None = None):
        """The VM's lock, made only for a replica that exists (random ids make no locks)."""
        await self.get(vm_id, principal)
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def lock(self, vm_id: uuid.UUID) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def image_lock(self, vm_id: uuid.UUID) -> asyncio.Lock:
        """Held by whoever writes the replica images (initial windows, the applier)."""
        return self._image_locks.setdefault(vm_id, asyncio.Lock())

    async def get(self, vm_id: uuid.UUID, principal: str | None = None) -> Replica:
        rep = await asyncio.to_thread(self.store.replica, vm_id)
        if rep is None:
            exc = NotFoundError(f"this replica server has no VM {vm_id}",
                                hint="enable replication first (hvrctl vm enable)")
            exc.code = "unknown_vm"
            raise exc
        if principal is not None and rep.principal != principal:
            raise ForbiddenError(f"VM {rep.name} is replicated from {rep.principal!r}, not from {principal!r}")
        return rep

    # --- enable -----------------------------------------------------------
    async def enable(self, vm_id: uuid.UUID, principal: str, body: dict) -> tuple[Replica, bool]:
        name, generation, frequency_s, compression, disks = _parse_enable(body)
        async with self.lock(vm_id):
            existing = await asyncio.to_thread(self.store.replica, vm_id)
            if existing is not None:
                if existing.principal != principal:
                    raise ForbiddenError(f"VM {existing.name} is replicated from another primary")
                same = (existing.name == name and existing.generation == generation and
                        [(d.disk_id, d.name, d.size_bytes) for d in existing.disks] == disks)
                untouched = (existing.state == ReplicationState.WAITING_FOR_INITIAL_REPLICATION
                             and all(d.initial_offset == 0 for d in existing.disks))
                if same and not untouched:
                    raise _conflict("replica_conflict",
                                    f"VM {existing.name} already has a replica here ({existing.state}); enabling "
                                    f"again would mix an old copy with a new one",
                                    hint=f"on the replica server: hvrctl replica remove {existing.name} "
                                         f"--delete-storage, then enable again")
                if not same:
                    raise _conflict("replica_conflict",
                                    f"a replica of VM {vm_id} exists with other settings (name, disks or generation)",
                                    hint="remove the old replica first")
                return existing, False
            vm_dir = Path(self.storage()) / name
            if vm_dir.exists() and any(vm_dir.iterdir()):
                raise _conflict("replica_conflict", f"replica storage {vm_dir} is already in use",
                                hint="move the old files away or use another VM name")
            paths = [(d_id, d_name, size, vm_dir / f"{d_name}.img") for d_id, d_name, size in disks]
            await asyncio.to_thread(_create_images, vm_dir, paths)
            await asyncio.to_thread(self.store.create_replica, vm_id, name, principal, generation, frequency_s,
                                    compression, vm_dir, paths)
        event(log, "replica_enabled", vm=name, vm_id=str(vm_id), principal=principal, disks=len(disks))
        return await self.get(vm_id), True

    # --- initial replication ----------------------------------------------
    async def initial_window(self, vm_id: uuid.UUID, disk_id: uuid.UUID, principal: str, generation: int,
                             start: int, end: int, length: int | None, digest: str,
                             body: AsyncIterator[bytes]) -> int:
        """Store one initial window; return the disk's durable offset afterwards.

        Windows are received straight into the image (bytes at or above the
        durable offset are not replicated content yet) and made durable
        without the VM's lock, so the next window, starting where this one
        ends, is received meanwhile.  They commit in order, each in one store
        transaction that checks the replica, its generation and state: a
        window whose predecessor did not become durable is refused with
        ``409 initial_gap`` and the durable offset stays put.
        """
        deadline = time.monotonic() + PREDECESSOR_WAIT_S
        while True:
            async with await self.locked(vm_id, principal):
                rep = await self.get(vm_id, principal)
                self._check_initial(rep, generation)
                disk = rep.disk(disk_id)
                if not 0 <= start < end <= disk.size_bytes:
                    raise UsageError(f"window [{start}, {end}) is not inside disk {disk.name} "
                                     f"of {disk.size_bytes} bytes")
                # the newest window in progress that ends where this one starts
                before = next((f for e, f in reversed(self._windows.get(disk_id, [])) if e == start), None)
                if end <= disk.initial_offset:
                    return disk.initial_offset  # already stored; the unread body is discarded
                if start <= disk.initial_offset or before is not None:
                    self.check_length(length)
                    mine = asyncio.get_running_loop().create_future()
                    self._windows.setdefault(disk_id, []).append((end, mine))
                    self._window_news()
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _conflict("initial_gap", f"window starts at {start} but disk {disk.name} is durable "
                                    f"only up to {disk.initial_offset}", offset=disk.initial_offset)
                news = self._window_changed  # taken under the lock: no change between here and the wait is missed
            # Pipelined windows travel on separate connections and may overtake each other:
            # give the one this window follows a moment to arrive before calling it a gap.
            try:
                await asyncio.wait_for(news.wait(), left)
            except TimeoutError:
                pass
        expect = {"vm_id": vm_id, "generation": rep.generation, "kind": BundleKind.INITIAL,
                  "disks": {disk_id: disk.size_bytes}, "window": (disk_id, start, end)}
        durable = False
        writer = None
        try:
            received_ns = time.monotonic_ns()
            writer = await self._receive_window(disk, length, digest, expect, body)
            synced_ns = time.monotonic_ns()
            received_ns = synced_ns - received_ns
            await finish_in_thread(writer.finish)
            synced_ns = time.monotonic_ns() - synced_ns
            if before is not None:
                await asyncio.shield(before)
            now = await asyncio.to_thread(self.store.advance_initial_offset, vm_id, rep.created_ns, disk_id,
                                          generation, start, end)
            if now is None:
                raise NotFoundError(f"replica of VM {rep.name} was removed while a window was stored")
            now_generation, now_state, offset = now
            if now_generation != generation:
                self._check_generation(await self.get(vm_id), generation)
            if now_state not in (ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                                 ReplicationState.INITIAL_REPLICATION_IN_PROGRESS):
                raise _conflict("wrong_state", f"VM {rep.name} is {now_state}, not in initial replication")
            if offset < start:
                raise _conflict("initial_gap", f"window starts at {start} but the window before it did not "
                                f"become durable: disk {disk.name} is durable up to {offset}", offset=offset)
            durable = True
        finally:
            # Settled before anything that can be interrupted: the windows after this one wait on it.
            mine.set_result(durable)
            pending = self._windows.get(disk_id, [])
            pending.remove((end, mine))
            if not pending:
                self._windows.pop(disk_id, None)
            self._window_news()
            if writer is not None:
                await finish_in_thread(writer.close)
        event(log, "initial_window_stored", vm=rep.name, disk=disk.name, offset=start, bytes=end - start,
              receive_s=round(received_ns / 1e9, 3), sync_s=round(synced_ns / 1e9, 3))
        return max(offset, end)

    def _window_news(self) -> None:
        self._window_changed.set()
        self._window_changed = asyncio.Event()

    def _check_initial(self, rep: Replica, generation: int) -> None:
        self._check_generation(rep, generation)
        if rep.state not in (ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                             ReplicationState.INITIAL_REPLICATION_IN_PROGRESS):
            raise _conflict("wrong_state", f"VM {rep.name} is {rep.state}, not in initial replication")

    async def initial_complete(self, vm_id: uuid.UUID, principal: str, body: dict) -> Replica:
        generation = _int_field(body, "generation", 1)
        next_sequence = _int_field(body, "next_sequence", 1)
        async with await self.locked(vm_id, principal):
            rep = await self.get(vm_id, principal)
            # A window still being received (a duplicate on a slow connection, say) writes into the
            # image: it must be over before cycles may change the image.  None can start meanwhile
            # (that needs this lock); they end without it.
            for d in rep.disks:
                while in_progress := [f for _, f in self._windows.get(d.disk_id, [])]:
                    await asyncio.wait([asyncio.shield(f) for f in in_progress])
            rep = await self.get(vm_id, principal)
            self._check_generation(rep, generation)
            if rep.state == ReplicationState.REPLICATING:
                if rep.next_sequence == next_sequence and rep.last_received_sequence == next_sequence - 1:
                    return rep  # the same completion again (its answer was lost)
                raise _conflict("wrong_state", f"initial replication of VM {rep.name} completed already; "
                                f"the replica expects cycle {rep.next_sequence}", expected=rep.next_sequence)
            incomplete = {str(d.disk_id): d.initial_offset for d in rep.disks if d.initial_offset != d.size_bytes}
            if incomplete:
                raise _conflict("initial_incomplete", "initial replication has not reached the end of every disk",
                                offsets=incomplete)
            state = transition("replica", rep.state if rep.state != ReplicationState.WAITING_FOR_INITIAL_REPLICATION
                               else ReplicationState.INITIAL_REPLICATION_IN_PROGRESS, Action.COMPLETE_INITIAL)
            await asyncio.to_thread(self.store.update_replica, vm_id, state=state, next_sequence=next_sequence,
                                    last_received_sequence=next_sequence - 1,
                                    last_applied_sequence=next_sequence - 1, last_replication_ns=time.time_ns(),
                                    last_applied_ns=time.time_ns())
        event(log, "initial_completed", vm=rep.name, next_sequence=next_sequence)
        return await self.get(vm_id)

    # --- cycles -----------------------------------------------------------
    async def receive_cycle(self, vm_id: uuid.UUID, sequence: int, principal: str, generation: int,
                            length: int | None, digest: str, body: AsyncIterator[bytes]) -> tuple[bool, Replica]:
        """Store a cycle durably.  Returns (created, replica)."""
        try:
            return await self._receive_cycle(vm_id, sequence, principal, generation, length, digest, body)
        finally:
            self.wake_applier.set()  # whatever happened, a stored cycle must not wait for the next one

    async def _receive_cycle(self, vm_id, sequence, principal, generation, length, digest, body):
        async with await self.locked(vm_id, principal):
            rep = await self.get(vm_id, principal)
            self._check_generation(rep, generation)
            if rep.state != ReplicationState.REPLICATING:
                raise _conflict("wrong_state", f"VM {rep.name} is {rep.state}, not Replicating")
            if sequence <= rep.last_received_sequence:
                row = await asyncio.to_thread(self.store.cycle, vm_id, sequence)
                if row is not None and row.digest == digest and row.generation == generation:
                    return False, rep
                raise _conflict("out_of_order", f"cycle {sequence} of VM {rep.name} was already received "
                                f"with other contents", expected=rep.next_sequence)
            if sequence != rep.next_sequence:
                raise _conflict("out_of_order", f"cycle {sequence} of VM {rep.name} is out of order; "
                                f"expected {rep.next_sequence}", expected=rep.next_sequence)
            expect = {"vm_id": vm_id, "generation": rep.generation, "sequence": sequence, "kind": BundleKind.CYCLE,
                      "disks": {d.disk_id: d.size_bytes for d in rep.disks}}
            spool = self._spool_path(rep, f"cycle-{sequence}")
            header = await self._receive(spool, length, digest, expect, body)
            final = rep.storage_dir / "cycles" / f"{sequence:010d}.bundle"
            await finish_in_thread(_commit_cycle, self.store, spool, final, vm_id, sequence, generation, digest,
                                   length or 0, header.created_ns)
        event(log, "cycle_received", vm=rep.name, seq=sequence, bytes=length)
        return True, await self.get(vm_id)

    def _check_generation(self, rep: Replica, generation: int) -> None:
        if generation != rep.generation:
            raise _conflict("stale_generation", f"request is for generation {generation} of VM {rep.name}; "
                            f"the replica is at generation {rep.generation}", generation=rep.generation)

    def _spool_path(self, rep: Replica, what: str) -> Path:
        return rep.storage_dir / "incoming" / f"{what}.{secrets.token_hex(4)}.part"

    async def _receive(self, spool: Path, length: int | None, digest: str, expect: dict,
                       body: AsyncIterator[bytes]):
        self.check_length(length)
        decoder = BundleDecoder(keep_data=False, max_bytes=length, expect=expect)
        writer = await finish_in_thread(SpoolWriter, spool, decoder)
        try:
            await feed_pipelined(writer.feed, body)
            _check_body_end(writer.bytes, length, writer.sha.hexdigest(), digest)
            done = await finish_in_thread(writer.finish)
        except HvrError as exc:
            await finish_in_thread(writer.abort)
            raise _as_body_error(exc) from None
        except BaseException:
            await finish_in_thread(writer.abort)
            raise
        return done.header

    async def _receive_window(self, disk, length: int, digest: str, expect: dict,
                              body: AsyncIterator[bytes]) -> DirectWindowWriter:
        """An initial window goes straight into the image (no spool): see DirectWindowWriter.

        Returns the writer with the whole body written and checked, not yet
        durable: the caller calls ``finish`` (fdatasync) and ``close``.
        """
        decoder = BundleDecoder(keep_data=True, lend_data=True, max_bytes=length, expect=expect)
        writer = await finish_in_thread(DirectWindowWriter, disk.path, disk.disk_id, decoder)
        try:
            await feed_pipelined(writer.feed, body)
            _check_body_end(writer.bytes, length, writer.sha.hexdigest(), digest)
            writer.check_complete()
        except BaseException as exc:
            await finish_in_thread(writer.close)
            if isinstance(exc, HvrError):
                raise _as_body_error(exc) from None
            raise
        return writer

    def check_length(self, length: int | None) -> None:
        if length is None:
            raise LengthRequiredError("bundle uploads need a Content-Length header")
        if length > self.max_bundle_bytes:
            raise TooLargeError(f"bundle of {length} bytes exceeds this server's limit of {self.max_bundle_bytes}")


def _check_body_end(received: int, length: int, actual_digest: str, digest: str) -> None:
    """The body is all there and is what was signed; else 400 with the reason."""
    if received != length:
        err = BodyError(f"body ended after {received} of {length} bytes")
        err.code = "body_truncated"
        raise err
    if actual_digest != digest:
        err = BodyError("body does not match its X-Hvr-Content-SHA256 digest")
        err.code = "digest_mismatch"
        raise err


def _as_body_error(exc: HvrError) -> HvrError:
    """Damaged bundle data is the sender's problem (400), whatever layer noticed it."""
    if exc.code in ("bundle_corrupt", "body_truncated", "corrupt", "hrl_corrupt"):
        return BodyError(exc.message, detail={"code": exc.code})
    return exc


FEED_BATCH_BYTES = 4 * 1024 * 1024


async def feed_pipelined(feed, body: AsyncIterator[bytes], batch_bytes: int = FEED_BATCH_BYTES) -> None:
    """``feed(chunks)`` in a worker thread for each batch of received chunks, in order,
    while the next batch arrives.

    The chunks are the pieces the connection received, gathered into a list of
    about ``batch_bytes`` (never joined: that would copy every byte once more);
    a batch goes to the thread as soon as the one before it is done, so the
    sender is not held up by hashing, decoding and writing.  ``feed`` runs for
    one batch at a time; an error from it stops the reading and is raised after
    the thread has ended.
    """
    pending: asyncio.Future | None = None
    batch: list = []
    size = 0
    try:
        async for chunk in body:
            batch.append(chunk)
            size += len(chunk)
            if size < batch_bytes and (size < batch_bytes // 4 or (pending is not None and not pending.done())):
                continue  # gather more while the thread is busy (and never hand it a sliver)
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(finish_in_thread(feed, batch))
            batch, size = [], 0
        if pending is not None:
            await pending
        if batch:
            await finish_in_thread(feed, batch)
    except BaseException:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])  # never leave a thread writing behind the caller
        raise


def _commit_cycle(store: ListenerStore, spool: Path, final: Path, vm_id, sequence, generation, digest,
                  nbytes, created_ns) -> None:
    """Rename the durable spool into place, then record it: the commit point of a received cycle."""
    commit_file(spool, final)
    store.record_cycle(vm_id, sequence, generation, digest, nbytes, final, created_ns)


def _create_images(vm_dir: Path, paths) -> None:
    vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _, _, size, path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    (vm_dir / "cycles").mkdir(exist_ok=True)
    (vm_dir / "incoming").mkdir(exist_ok=True)
    fsync_dir(vm_dir)
    fsync_dir(vm_dir.parent)


def _int_field(body: dict, key: str, minimum: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"field {key!r} must be an integer >= {minimum}")
    return value


def _parse_enable(body: dict):
    unknown = set(body) - {"name", "generation", "frequency_s", "compression", "disks"}
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError("field 'name' must be a VM name (letters, digits, '.', '_', '-')")
    generation = _int_field(body, "generation", 1)
    frequency_s = body.get("frequency_s")
    if frequency_s not in FREQUENCIES:
        raise UsageError(f"field 'frequency_s' must be one of {FREQUENCIES}")
    compression = body.get("compression", True)
    if not isinstance(compression, bool):
        raise UsageError("field 'compression' must be true or false")
    disks_raw = body.get("disks")
    if not isinstance(disks_raw, list) or not 1 <= len(disks_raw) <= 64:
        raise UsageError("field 'disks' must list 1 to 64 disks")
    disks = []
    for d in disks_raw:
        if not isinstance(d, dict) or set(d) != {"disk_id", "name", "size_bytes"}:
            raise UsageError("each disk needs exactly disk_id, name and size_bytes")
        try:
            disk_id = uuid.UUID(d["disk_id"])
        except (ValueError, TypeError, AttributeError):
            raise UsageError(f"disk_id {d.get('disk_id')!r} is not a UUID") from None
        if not isinstance(d["name"], str) or not NAME_RE.match(d["name"]):
            raise UsageError(f"disk name {d['name']!r} is not valid")
        size = d["size_bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_DISK_BYTES:
            raise UsageError(f"disk size {size!r} is not valid")
        disks.append((disk_id, d["name"], size))
    if len({d[0] for d in disks}) != len(disks) or len({d[1] for d in disks}) != len(disks):
        raise UsageError("disk ids and names must be unique")
    return name, generation, frequency_s, compression, disks
