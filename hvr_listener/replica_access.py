"""Reaching a replica for a request: lookup, trust group, generation, and the per-VM locks.

Lock order
----------
The listener's locks, outermost first; a holder of one lock may take only
locks below it, never one above:

1. **state folder lock** (``StateLock``, ``flock`` on
   ``<state_dir>/hvr-listener.lock``): taken by the daemon at start, held for
   its whole life.
2. **per-VM lock** (:meth:`ReplicaAccess.lock`, an ``asyncio.Lock``): taken by
   enabling, the admission of an initial window (not while its body is
   received), the initial copy's completion (which also waits for the windows
   in progress), cycle receipt (for the whole body) and the operator verbs
   remove and resume.
3. **image lock** (:meth:`ReplicaAccess.image_lock`, an ``asyncio.Lock``):
   taken by the applier around applying one cycle and marking it applied, and
   by remove (inside the per-VM lock) so a replica's files are never deleted
   under an apply. Initial windows write the images without it: they write
   only above the durable offset, before any cycle can be applied.
4. **store lock** (the ``threading.Lock`` of ``StateDatabase``): taken inside
   every store method, in a worker thread, and released before it returns;
   nothing is awaited while it is held.

No lock is taken while holding a lower one: the applier, which holds the
image lock, never takes a per-VM lock. Locks are made only for replicas that
exist (:meth:`ReplicaAccess.locked`), so random ids make none.
"""

from __future__ import annotations

import asyncio
import uuid

from hvr_common.pure.authorization import Grant, check_same_trust_group
from hvr_common.pure.errors import ConflictError
from hvr_common.pure.wire.error_catalogue import error
from hvr_listener.store import ListenerStore, Replica


def conflict(code: str, message: str, **detail) -> ConflictError:
    """A 409 with its own ``code`` (``hint`` and other keywords go to the detail)."""
    return error(code, message, detail=detail or None)


def check_generation(rep: Replica, generation: int) -> None:
    if generation != rep.generation:
        raise conflict("stale_generation", f"request is for generation {generation} of VM {rep.name}; "
                       f"the replica is at generation {rep.generation}", generation=rep.generation)


class ReplicaAccess:
    """Finds a request's replica and owns the per-VM and image locks (see "Lock order" above)."""

    def __init__(self, store: ListenerStore):
        self.store = store
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._image_locks: dict[uuid.UUID, asyncio.Lock] = {}

    async def get(self, vm_id: uuid.UUID, peer: Grant | None = None) -> Replica:
        """The replica, or 404 ``unknown_vm``; with ``peer``, 403 ``other_trust_group`` unless the
        primary is of the trust group that created the replica."""
        rep = await asyncio.to_thread(self.store.replica, vm_id)
        if rep is None:
            raise error("unknown_vm", f"this replica server has no VM {vm_id}",
                        hint="enable replication first (hvrctl vm enable)")
        if peer is not None:
            check_same_trust_group(rep.name, rep.trust_group, peer)
        return rep

    async def locked(self, vm_id: uuid.UUID, peer: Grant | None = None) -> asyncio.Lock:
        """The VM's lock, made only for a replica that exists (random ids make no locks)."""
        await self.get(vm_id, peer)
        return self.lock(vm_id)

    def lock(self, vm_id: uuid.UUID) -> asyncio.Lock:
        """The per-VM lock (2 in the lock order)."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def image_lock(self, vm_id: uuid.UUID) -> asyncio.Lock:
        """The image lock (3 in the lock order): held while a cycle is applied to the images."""
        return self._image_locks.setdefault(vm_id, asyncio.Lock())
