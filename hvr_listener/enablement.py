"""Enabling replication of a VM on this server (``PUT /v1/replicas/{vm_id}``): its images and its record.

Enabling again with the same settings before anything was received is the
same enabling (200, no change); anything else that finds a replica is
refused before anything changes, so an old copy is never mixed with a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from hvr_common.shell.logs import event
from hvr_common.shell.files import fsync_dir
from hvr_listener.adoption import adopted_images
from hvr_listener.replica_access import ForbiddenError, ReplicaAccess, conflict
from hvr_listener.replica_state import ReplicaStates, enabled_again_unchanged
from hvr_common.pure.wire.messages import EnableRequest
from hvr_listener.store import Replica

log = logging.getLogger("hvr.listener.replicas")


class Enablement:
    def __init__(self, access: ReplicaAccess, states: ReplicaStates, storage: Callable[[], str]):
        self.access = access
        self.states = states
        self.storage = storage  # the current default storage location (a setting)

    async def enable(self, vm_id: uuid.UUID, principal: str, body: dict) -> tuple[Replica, bool]:
        """Returns (replica, created)."""
        req = EnableRequest.from_json(body)
        name, generation, frequency_s, compression = req.name, req.generation, req.frequency_s, req.compression
        disks = [(d.disk_id, d.name, d.size_bytes) for d in req.disks]
        store = self.access.store
        async with self.access.lock(vm_id):
            existing = await asyncio.to_thread(store.replica, vm_id)
            if existing is not None:
                if existing.principal != principal:
                    raise ForbiddenError(f"VM {existing.name} is replicated from another primary")
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
            vm_dir = Path(self.storage()) / name
            adopted = await asyncio.to_thread(adopted_images, vm_dir, vm_id, disks)
            if adopted is None and vm_dir.exists() and any(vm_dir.iterdir()):
                raise conflict("replica_conflict", f"replica storage {vm_dir} is already in use",
                               hint="move the old files away or use another VM name")
            if adopted is None:
                paths = [(d_id, d_name, size, vm_dir / f"{d_name}.img") for d_id, d_name, size in disks]
                await asyncio.to_thread(_create_images, vm_dir, paths)
            else:  # an existing copy: every disk is there to its end, the primary compares instead of copying
                paths = [(d_id, d_name, size, path) for (d_id, d_name, size), path in zip(disks, adopted)]
                await asyncio.to_thread(_create_folders, vm_dir)
            await asyncio.to_thread(self.states.enable, vm_id, name, principal, generation, frequency_s,
                                    compression, vm_dir, paths)
            if adopted is not None:
                rep = await self.access.get(vm_id)
                for d_id, _, size, _ in paths:
                    await asyncio.to_thread(self.states.window_stored, rep, d_id, generation, 0, size)
        event(log, "replica_enabled", vm=name, vm_id=str(vm_id), principal=principal, disks=len(disks),
              adopted=adopted is not None)
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
