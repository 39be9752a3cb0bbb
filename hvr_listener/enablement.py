"""Enabling replication of a VM on this server (``PUT /v1/replicas/{vm_id}``): its images and its record.

Enabling again with the same settings before anything was received is the
same enabling (200, no change); anything else that finds a replica is
refused before anything changes, so an old copy is never mixed with a new one.
A replica found is first checked against the requesting primary's trust group
(403 ``other_trust_group``).  A new replica's folder is named by its VM id, under
the storage location the primary's grant names (the authorization entry's, or
the default); the replica records it, so a changed storage location affects
only replicas created afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path

from hvr_common.shell.logs import event
from hvr_common.shell.files import fsync_dir, unlink_if_exists
from hvr_common.shell.threads import finish_in_thread
from hvr_common.pure.authorization import Grant, check_same_trust_group
from hvr_listener.adoption import adopted_images, keeps_aside
from hvr_listener.kept_aside import mark_pending
from hvr_listener.replica_access import ReplicaAccess, conflict
from hvr_listener.replica_state import ReplicaStates, enabled_again_unchanged
from hvr_common.pure.wire.messages import EnableRequest
from hvr_listener.store import Replica

log = logging.getLogger("hvr.listener.replicas")


class Enablement:
    def __init__(self, access: ReplicaAccess, states: ReplicaStates):
        self.access = access
        self.states = states

    async def enable(self, vm_id: uuid.UUID, peer: Grant, body: dict) -> tuple[Replica, bool]:
        """Returns (replica, created)."""
        req = EnableRequest.from_json(body)
        name, generation, frequency_s, compression = req.name, req.generation, req.frequency_s, req.compression
        disks = [(d.disk_id, d.name, d.size_bytes) for d in req.disks]
        store = self.access.store
        async with self.access.lock(vm_id):
            existing = await asyncio.to_thread(store.replica, vm_id)
            if existing is not None:
                check_same_trust_group(existing.name, existing.trust_group, peer)
                same = (existing.name == name and existing.generation == generation and
                        [(d.disk_id, d.name, d.size_bytes) for d in existing.disks] == disks)
                if same and not enabled_again_unchanged(existing):
                    raise conflict("replica_conflict",
                                   f"VM {existing.name} already has a replica here ({existing.state}); enabling "
                                   f"again would mix an old copy with a new one",
                                   hint=f"on the replica server: hvrctl replica remove {existing.name} "
                                        f"--delete-storage, then enable again")
                if not same:
                    raise conflict("replica_conflict",
                                   f"a replica of VM {vm_id} exists with other settings (name, disks or generation)",
                                   hint="remove the old replica first")
                return existing, False
            namesake = await asyncio.to_thread(store.replica_by_name, name)
            if namesake is not None:  # perhaps in another storage location: its name is still taken
                raise conflict("replica_conflict", f"a replica named {name} exists already (VM {namesake.vm_id})",
                               hint="give the VM another name, or remove the old replica first")
            vm_dir = Path(peer.storage) / str(vm_id)
            # an existing copy adopted under the VM's name (hvrctl replica adopt) in the same storage location
            adopted = await asyncio.to_thread(adopted_images, Path(peer.storage) / name, vm_id, disks)
            if adopted is None and vm_dir.exists() and any(vm_dir.iterdir()):
                raise conflict("replica_conflict", f"replica storage {vm_dir} is already in use",
                               hint="move the old files away (left by a replica of this VM removed without "
                                    "--delete-storage)")
            created_dir = not vm_dir.exists()
            if adopted is None:
                paths = [(d_id, d_name, size, vm_dir / f"{d_name}.img") for d_id, d_name, size in disks]
            else:  # an existing copy: every disk is there to its end, the primary compares instead of copying
                paths = [(d_id, d_name, size, path) for (d_id, d_name, size), path in zip(disks, adopted)]
            try:  # finish_in_thread: a cancelled request still waits for its thread before cleaning up
                if adopted is None:
                    await finish_in_thread(_create_images, vm_dir, paths)
                else:
                    await finish_in_thread(_create_folders, vm_dir)
                    if await asyncio.to_thread(keeps_aside, Path(peer.storage) / name):
                        await finish_in_thread(mark_pending, vm_dir)  # before the record: see kept_aside
                await finish_in_thread(self.states.enable, vm_id, name, peer.principal, generation, frequency_s,
                                       compression, vm_dir, paths, peer.trust_group)
            except BaseException:
                # no record, no files: a failed enable must not leave images that block the name
                if adopted is None:
                    await finish_in_thread(_remove_images, vm_dir, paths, created_dir)
                raise
            if adopted is not None:
                rep = await self.access.get(vm_id)
                for d_id, _, size, _ in paths:
                    await asyncio.to_thread(self.states.window_stored, rep, d_id, generation, 0, size)
        event(log, "replica_enabled", vm=name, vm_id=str(vm_id), principal=peer.principal,
              trust_group=peer.trust_group, storage=str(vm_dir), disks=len(disks), adopted=adopted is not None)
        return await self.access.get(vm_id), True


def _create_images(vm_dir: Path, paths) -> None:
    vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _, _, size, path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    _create_folders(vm_dir)


def _create_folders(vm_dir: Path) -> None:
    vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (vm_dir / "cycles").mkdir(exist_ok=True)
    (vm_dir / "incoming").mkdir(exist_ok=True)
    fsync_dir(vm_dir)
    fsync_dir(vm_dir.parent)


def _remove_images(vm_dir: Path, paths, created_dir: bool) -> None:
    """Undo :func:`_create_images` (as far as it got): only what it creates, and the folder if it made it."""
    for _, _, _, path in paths:
        unlink_if_exists(path)
    for sub in ("cycles", "incoming"):
        with contextlib.suppress(FileNotFoundError, OSError):
            (vm_dir / sub).rmdir()
    if created_dir:
        with contextlib.suppress(FileNotFoundError, OSError):
            vm_dir.rmdir()
