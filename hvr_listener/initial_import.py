"""Initial replication from external media, on the replica server: ``hvrctl initial import NAME DIR``.

Import-VMInitialReplication.  Every rule that refuses the media does so
before anything changes (replica state and images untouched):

1. the manifest parses and matches its own digest (``media_corrupt``);
2. it is for this replica: VM id, generation, and every disk by id and size
   (``media_wrong_vm``); the replica waits for its initial replication
   (``wrong_state``);
3. every chunk file is read and matches its blake3 digest (``media_corrupt``).

Then, under the VM's lock, the load (crash-safe by repetition):

4. each image is emptied (a hole from 0 to its size) and every chunk written
   at its offset, checked against its digest once more as it is read;
5. each image is fsynced; then the import marker (``initial-import.json``
   in the replica's folder: the replica's ``created_ns``, the media's
   ``base_sequence`` and manifest digest) is written durably;
6. the commit point: one store transaction sets every disk's initial offset
   to its size and the state to ``InitialReplicationInProgress``.

A crash (or a changed chunk found in step 4) before step 6 leaves the state
as it was (the images partly loaded, which nothing reads before the state
says so): the same import run again finishes.  The primary, waiting in
``WaitingForInitialReplication``, sees every offset at its disk's size and
completes the initial replication with ``next_sequence`` S + 1; the
completion is refused (``media_stale``) if the marker's S is another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hvr_common.pure import media_manifest as mm
from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell import sparse
from hvr_common.shell.files import pwrite_all, write_file_durably
from hvr_common.shell.logs import event
from hvr_listener.replica_access import conflict
from hvr_listener.store import Replica

if TYPE_CHECKING:  # the service holds the initial copy, which checks completions here
    from hvr_listener.replicas import ReplicaService

log = logging.getLogger("hvr.listener.replicas")

MARKER_NAME = "initial-import.json"
PROGRESS_EVERY_S = 0.1  # a progress line this often (a local socket: cheap)
_IMPORT_STATES = (ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                  ReplicationState.INITIAL_REPLICATION_IN_PROGRESS)


@dataclass
class ImportProgress:
    phase: str = "verify"  # verify, then load
    total_bytes: int = 0
    done_bytes: int = 0

    def to_json(self) -> dict:
        return {"phase": self.phase, "total_bytes": self.total_bytes, "done_bytes": self.done_bytes}


async def import_media(service: ReplicaService, name: str, directory: Path,
                       report: Callable[[dict], Awaitable[None]]) -> dict:
    if not directory.is_absolute():
        raise UsageError(f"the media folder must be an absolute path, not {str(directory)!r}")
    rep = await _by_name(service, name)
    manifest = await asyncio.to_thread(read_manifest, directory)
    check_media(rep, manifest)
    started = time.monotonic()
    progress = ImportProgress(total_bytes=manifest.data_bytes)
    async with service.lock(rep.vm_id):
        rep = await _by_name(service, name)  # again, under its lock
        check_media(rep, manifest)
        await _in_thread(verify_chunks, directory, manifest, progress, report=report)
        progress.phase, progress.done_bytes = "load", 0
        await _in_thread(load, rep, directory, manifest, progress, report=report)
        if not await asyncio.to_thread(service.states.media_loaded, rep):
            raise NotFoundError(f"replica of VM {name} changed while its media was imported")
    event(log, "initial_imported", vm=name, seq=manifest.base_sequence, bytes=manifest.data_bytes,
          directory=str(directory), latency_s=round(time.monotonic() - started, 3))
    rep = await _by_name(service, name)
    return {"vm": name, "directory": str(directory), "base_sequence": manifest.base_sequence,
            "manifest_blake3": manifest.digest(), "data_bytes": manifest.data_bytes, "state": rep.state.value,
            "disks": [{"disk": d.name, "disk_id": str(d.disk_id), "size_bytes": d.size_bytes,
                       "data_bytes": d.data_bytes, "chunks": len(d.chunks)} for d in manifest.disks]}


async def _by_name(service: ReplicaService, name: str) -> Replica:
    rep = await asyncio.to_thread(service.store.replica_by_name, name)
    if rep is None:
        raise NotFoundError(f"no replica VM named {name!r} on this server",
                            hint="enable replication on the primary first (hvrctl vm enable)")
    return rep


async def _in_thread(fn, *args, report) -> None:
    progress = args[-1]
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    while not job.done():
        await asyncio.wait([job], timeout=PROGRESS_EVERY_S)
        await report(progress.to_json())
    job.result()


def read_manifest(directory: Path) -> mm.Manifest:
    path = directory / mm.MANIFEST_NAME
    try:
        if path.stat().st_size > mm.MAX_MANIFEST_BYTES:
            raise mm.corrupt(f"{path} is too large to be a manifest")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{directory} holds no {mm.MANIFEST_NAME}: it is not (finished) initial-replication media",
                         hint="give the folder hvrctl initial export wrote; an interrupted export has no "
                              "manifest") from None
    return mm.Manifest.decode(raw)


def check_media(rep: Replica, manifest: mm.Manifest) -> None:
    """The media is this replica's, at its generation, with its disks; the replica waits for it."""
    if manifest.vm_id != rep.vm_id:
        raise error("media_wrong_vm", f"the media is of VM {manifest.vm_name} ({manifest.vm_id}), not of "
                    f"{rep.name} ({rep.vm_id})", hint="import it on the replica of the VM it was exported from")
    if manifest.generation != rep.generation:
        raise error("media_wrong_vm", f"the media is of generation {manifest.generation} of VM {rep.name}; the "
                    f"replica is at generation {rep.generation}", hint="export the VM again")
    mine = {d.disk_id: d.size_bytes for d in rep.disks}
    theirs = {d.disk_id: d.size_bytes for d in manifest.disks}
    if mine != theirs:
        raise error("media_wrong_vm", f"the media's disks {_disks(manifest.disks)} are not the replica's "
                    f"{_disks(rep.disks)}", hint="export the VM again")
    if rep.state not in _IMPORT_STATES:
        raise conflict("wrong_state", f"VM {rep.name} is {rep.state}: media can be imported only while it waits "
                       "for initial replication")


def _disks(disks) -> str:
    return ", ".join(f"{d.disk_id}:{d.size_bytes}" for d in disks)


def _read_chunk(directory: Path, disk: mm.MediaDisk, chunk: mm.Chunk) -> bytes:
    path = directory / mm.chunk_name(disk.disk_id, chunk.offset)
    try:
        with open(path, "rb") as fh:
            data = fh.read(chunk.length + 1)
    except FileNotFoundError:
        raise mm.corrupt(f"chunk file {path} is missing") from None
    if len(data) != chunk.length or mm.digest(data) != chunk.blake3:
        raise mm.corrupt(f"chunk at offset {chunk.offset} of disk {disk.name} ({path}) does not match its digest: "
                         "it was changed or damaged")
    return data


def verify_chunks(directory: Path, manifest: mm.Manifest, progress: ImportProgress) -> None:
    """Blocking: read every chunk and check its digest (nothing is written)."""
    for disk in manifest.disks:
        for chunk in disk.chunks:
            _read_chunk(directory, disk, chunk)
            progress.done_bytes += chunk.length


def load(rep: Replica, directory: Path, manifest: mm.Manifest, progress: ImportProgress) -> None:
    """Blocking: empty each image, write its chunks, fsync it; then the marker, durably."""
    by_id = {d.disk_id: d for d in rep.disks}
    for disk in manifest.disks:
        fd = os.open(by_id[disk.disk_id].path, os.O_RDWR | os.O_CLOEXEC)
        try:
            sparse.punch_hole(fd, 0, disk.size_bytes)
            for chunk in disk.chunks:
                pwrite_all(fd, _read_chunk(directory, disk, chunk), chunk.offset)
                progress.done_bytes += chunk.length
            os.fsync(fd)
        finally:
            os.close(fd)
    marker = {"created_ns": rep.created_ns, "base_sequence": manifest.base_sequence,
              "manifest_blake3": manifest.digest()}
    write_file_durably(rep.storage_dir / MARKER_NAME, json.dumps(marker).encode())


def check_completion(rep: Replica, next_sequence: int) -> None:
    """Blocking: a replica loaded from media completes only at the media's point (``media_stale`` if not)."""
    try:
        marker = json.loads((rep.storage_dir / MARKER_NAME).read_bytes())
    except FileNotFoundError:
        return  # loaded by the network initial copy
    if marker.get("created_ns") != rep.created_ns:
        return  # left by an earlier replica of the VM
    if marker.get("base_sequence") + 1 != next_sequence:
        raise error("media_stale", f"the replica was loaded from media of sequence {marker.get('base_sequence')}; "
                    f"the primary continues from sequence {next_sequence}",
                    hint="the media is not of the primary's export: export the VM again and import that media")
