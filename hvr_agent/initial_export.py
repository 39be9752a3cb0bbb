"""Initial replication from external media, on the primary: the export, and the wait for the import.

``hvrctl initial export NAME DIR`` (Start-VMInitialReplication -DestinationPath):

1. the state goes to ``WaitingForInitialReplication`` (``export_initial``;
   refused unless the VM is ``ReadyForInitialReplication`` or exported
   already);
2. the VM is cut once, as the network initial copy does: the closed logs up
   to that sequence S are contained in the images and deleted (R1),
   ``next_sequence = S + 1`` is recorded.  An export repeated later keeps S:
   the logs after S are kept while the VM waits, so media of either export
   converge the same way;
3. every disk is read in a grid of chunks from the live image while the VM
   writes on (writes after S are in logs S + 1, ...); a chunk holding data
   goes to its own file, fsynced, with its blake3 digest in the manifest;
4. the manifest is written last (temp, fsync, rename, directory fsync): the
   commit point of the media.  Media without a manifest is not media.

While it waits, the VM's task asks the replica every ``IMPORT_POLL_S``
whether every disk is loaded (its initial offset at the disk's size, which
only an import sets).  Then it completes the initial replication with
``next_sequence`` S + 1, exactly as after a network copy, and the cycles
from S + 1 on bring the replica to the primary's present.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hvr_common.pure import media_manifest as mm
from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.pure.measure import NS
from hvr_common.pure.replication_state import Action, ReplicationState, transition
from hvr_common.shell import sparse
from hvr_common.shell.files import fsync_dir, pread_padded, pwrite_all, write_file_durably
from hvr_common.shell.logs import event
from hvr_agent.housekeeping import delete_logs_upto
from hvr_agent.relationship import ROLE, Relationship
from hvr_agent.replica_client import ReplicaClient, ReplicaConflictError
from hvr_agent.shipper import DiskSource

log = logging.getLogger("hvr.agent.replication")

S = ReplicationState
IMPORT_POLL_S = 2.0  # how often a VM waiting for the import asks the replica
PROGRESS_EVERY_S = 0.5


@dataclass
class ExportProgress:
    """Counters the writer thread moves and the admin route reports."""

    total_bytes: int = 0  # allocated bytes of every disk at the start
    done_bytes: int = 0  # of those, read so far
    written_bytes: int = 0  # chunk bytes written to the media
    chunks: int = 0

    def to_json(self) -> dict:
        return {"total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
                "written_bytes": self.written_bytes, "chunks": self.chunks}


async def export(rel: Relationship, directory: Path, chunk_bytes: int,
                 report: Callable[[dict], Awaitable[None]]) -> dict:
    """Export the VM of ``rel`` to ``directory`` (absent or empty); ``report`` gets progress now and then."""
    if not directory.is_absolute():
        raise UsageError(f"the media folder must be an absolute path, not {str(directory)!r}")
    transition(ROLE, rel.rec.state, Action.EXPORT_INITIAL)  # refused before the folder is touched
    await asyncio.to_thread(_prepare_directory, directory)
    await rel.set_state(Action.EXPORT_INITIAL, "exporting the initial copy to media", initial_at_ns=None)
    vm = rel.vm()
    disks = rel.disks()
    if rel.rec.base_sequence is None:
        closed = await rel.registry.cut(rel.name)
        base = closed[0].sequence if closed else vm.sequence - 1
        await rel.update(base_sequence=base, next_sequence=base + 1, initial_started_ns=time.time_ns())
        removed = await asyncio.to_thread(delete_logs_upto, disks, base)
        event(log, "initial_export_cut", vm=rel.name, seq=base, logs_deleted=removed)
    base = rel.rec.base_sequence
    started = time.time_ns()
    progress = ExportProgress()
    job = asyncio.ensure_future(asyncio.to_thread(
        _write_media, directory, disks, chunk_bytes, progress,
        lambda media_disks: mm.Manifest(vm.record.vm_id, rel.name, rel.rec.generation, base, started, chunk_bytes,
                                        media_disks)))
    while not job.done():
        await asyncio.wait([job], timeout=PROGRESS_EVERY_S)
        await report(progress.to_json())
    try:
        manifest = job.result()
    except (HvrError, OSError) as exc:
        await rel.update(state_detail=f"the export to {directory} failed: {exc}; export again to an empty folder")
        raise
    await rel.update(state_detail=f"exported to media at sequence {base}; waiting for hvrctl initial import on "
                                  "the replica server")
    event(log, "initial_exported", vm=rel.name, seq=base, directory=str(directory), bytes=progress.written_bytes,
          chunks=progress.chunks, latency_s=round((time.time_ns() - started) / NS, 3))
    return {"vm": rel.name, "directory": str(directory), "base_sequence": base,
            "manifest_blake3": manifest.digest(), "data_bytes": manifest.data_bytes, "chunks": progress.chunks,
            "disks": [{"disk": d.name, "disk_id": str(d.disk_id), "size_bytes": d.size_bytes,
                       "data_bytes": d.data_bytes, "chunks": len(d.chunks)} for d in manifest.disks],
            "state": rel.rec.state.value}


def _prepare_directory(directory: Path) -> None:
    if directory.exists():
        if not directory.is_dir():
            raise UsageError(f"{directory} exists and is not a folder")
        if any(directory.iterdir()):
            raise UsageError(f"the media folder {directory} is not empty",
                             hint="give an empty or new folder (remove an earlier export first)")
    directory.mkdir(parents=True, exist_ok=True)


def _write_media(directory: Path, disks: list[DiskSource], chunk_bytes: int, progress: ExportProgress,
                 make_manifest: Callable[[tuple[mm.MediaDisk, ...]], mm.Manifest]) -> mm.Manifest:
    """Blocking: every disk's chunks, then the manifest (the commit point)."""
    fds = {d.disk_id: os.open(d.image_path, os.O_RDONLY | os.O_CLOEXEC) for d in disks}
    try:
        plans = {}
        for d in disks:
            extents = [(o, n) for o, n, is_data in sparse.data_extents(fds[d.disk_id], 0, d.size_bytes) if is_data]
            plans[d.disk_id] = mm.grid(d.size_bytes, chunk_bytes, extents)
            progress.total_bytes += sum(n for _, n in plans[d.disk_id])
        media_disks = tuple(_write_disk(directory, d, fds[d.disk_id], plans[d.disk_id], progress) for d in disks)
    finally:
        for fd in fds.values():
            os.close(fd)
    manifest = make_manifest(media_disks)
    write_file_durably(directory / mm.MANIFEST_NAME, manifest.encode())
    return manifest


def _write_disk(directory: Path, disk: DiskSource, fd: int, plan: list[tuple[int, int]],
                progress: ExportProgress) -> mm.MediaDisk:
    folder = directory / str(disk.disk_id)
    folder.mkdir()
    chunks = []
    for offset, length in plan:
        data = pread_padded(fd, length, offset)
        progress.done_bytes += length
        if data.count(0) != length:  # a chunk of zeroes is a hole on the media
            path = directory / mm.chunk_name(disk.disk_id, offset)
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                pwrite_all(out, data, 0)
                os.fsync(out)
            finally:
                os.close(out)
            chunks.append(mm.Chunk(offset, length, mm.digest(data)))
            progress.written_bytes += length
            progress.chunks += 1
    fsync_dir(folder)
    fsync_dir(directory)
    return mm.MediaDisk(disk.disk_id, disk.name, disk.size_bytes, tuple(chunks))


async def complete_if_imported(rel: Relationship, client: ReplicaClient) -> bool:
    """The step of a VM waiting for its import: complete the initial replication once the replica is loaded.

    True if it completed (the VM replicates now), False if the import has not happened yet.
    """
    base = rel.rec.base_sequence
    if base is None:
        return False  # the export has not cut yet
    vm = rel.vm()
    remote = await client.replica_state(vm.record.vm_id)
    offsets = remote.get("initial") or {}
    if not all(int(offsets.get(str(d.disk_id), -1)) == d.size_bytes for d in rel.disks()):
        return False
    rel.check_state(S.WAITING_FOR_INITIAL_REPLICATION)
    next_sequence = base + 1
    try:
        await client.complete_initial(vm.record.vm_id, rel.rec.generation, next_sequence)
    except ReplicaConflictError as exc:
        if exc.code != "media_stale":
            raise
        # media of another export was imported: wait (asking again) until the right media is imported
        detail = f"{exc.message}; import the media of sequence {base} on the replica server"
        if rel.rec.state_detail != detail:
            event(log, "initial_import_stale", logging.WARNING, vm=rel.name, seq=base, error=exc.message)
            await rel.update(state_detail=detail)
        return False
    now = time.time_ns()
    await rel.set_state(Action.COMPLETE_INITIAL, initial_completed_ns=now, next_sequence=next_sequence)
    event(log, "initial_completed", vm=rel.name, seq=next_sequence, method="media",
          latency_s=round((now - (rel.rec.initial_started_ns or now)) / NS, 3))
    return True
