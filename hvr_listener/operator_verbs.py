"""The operator's verbs on a replica VM (the admin API): remove, suspend and resume.

Both find the replica by name, then take its locks through the
:class:`ReplicaService` in the documented order (per-VM lock, then image lock;
see "Lock order" in :mod:`hvr_listener.replica_access`) and look again under
them, so they never race a request of the primary or the applier.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

from hvr_common.pure.errors import NotFoundError
from hvr_common.pure.replication_state import InvalidTransition, ReplicationState
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.logs import event
from hvr_listener.replicas import ReplicaService
from hvr_listener.store import Replica

log = logging.getLogger("hvr.listener.admin")


async def _by_name(service: ReplicaService, name: str) -> Replica:
    rep = await asyncio.to_thread(service.store.replica_by_name, name)
    if rep is None:
        raise NotFoundError(f"no replica VM named {name!r} on this server")
    return rep


async def remove_replica(service: ReplicaService, name: str, delete_storage: bool) -> Replica:
    """Remove-VMReplication on the replica: forget the VM (and with ``delete_storage``, its files).

    Its record and cycle history go; the primary's requests get 404 from then
    on. The per-VM lock keeps requests of the primary out, the image lock the
    applier. Returns the replica as it was.
    """
    rep = await _by_name(service, name)
    async with service.lock(rep.vm_id), service.image_lock(rep.vm_id):
        if await asyncio.to_thread(service.store.test_failover, rep.vm_id) is not None:
            raise error("test_failover_running", f"a test failover of VM {name} is running",
                        hint=f"stop it first: hvrctl failover stop {name} --as-test")
        rep = await _by_name(service, name)  # again, under the locks
        if rep.state is ReplicationState.FAILED_OVER_WAITING_COMPLETION:
            raise error("failover_in_progress", f"VM {name} is failed over, waiting completion",
                        hint=f"cancel or complete it first: hvrctl failover stop|complete {name}")
        if rep.state is ReplicationState.FAILED_OVER and delete_storage:
            raise error("failover_completed", f"VM {name} was failed over: its storage holds the VM's disks now "
                        f"({rep.storage_dir / 'failover'})", hint=f"remove it without --delete-storage")
        await asyncio.to_thread(service.store.delete_replica, rep.vm_id)
        if delete_storage:
            await asyncio.to_thread(shutil.rmtree, rep.storage_dir, True)
    event(log, "replica_removed", vm=name, vm_id=str(rep.vm_id), storage_deleted=delete_storage)
    return rep


async def suspend_replica(service: ReplicaService, name: str) -> Replica:
    """Suspend-VMReplication on the replica: cycles are still received and stored, none is applied (its health
    is Critical: paused on the replica). 409 ``wrong_state`` unless Replicating."""
    rep = await _by_name(service, name)
    async with service.lock(rep.vm_id), service.image_lock(rep.vm_id):  # no apply runs meanwhile
        rep = await asyncio.to_thread(service.store.replica, rep.vm_id)  # again, under its locks
        if rep is None:
            raise NotFoundError(f"no replica VM named {name!r} on this server")
        if not await asyncio.to_thread(service.states.suspend, rep):
            raise InvalidTransition(f"the replication state of VM {name} changed while it was suspended")
    event(log, "replica_suspended", vm=name)
    return await _by_name(service, name)


async def resume_replica(service: ReplicaService, name: str) -> Replica:
    """Leave Error once the cause is fixed (``recover``), or a pause on the replica (``resume``): the applier
    applies the stored cycles (again).

    409 ``wrong_state`` unless the replica is in Error or Suspended. Returns the replica afterwards.
    """
    rep = await _by_name(service, name)
    async with service.lock(rep.vm_id):
        rep = await asyncio.to_thread(service.store.replica, rep.vm_id)  # again, under its lock
        if rep is None:
            raise NotFoundError(f"no replica VM named {name!r} on this server")
        verb = service.states.resume if rep.state is ReplicationState.SUSPENDED else service.states.recover
        if not await asyncio.to_thread(verb, rep):
            raise InvalidTransition(f"the replication state of VM {name} changed while it was resumed")
    service.wake_applier.set()
    event(log, "replica_resumed", vm=name)
    return await _by_name(service, name)
