"""A replica disk's digest tree, for the primary's compare (resync, verify): ``POST .../digests/{disk_id}``.

The tree is read from the replica image as it is (its last applied point, or
a cycle being applied: the compare is correct against any state between the
last applied point and the newest received cycle, see ``docs/resync.md``),
in one pass, in worker threads (two hash while a third reads ahead), and kept while the image stays the same: the
cache is keyed by the applied sequence, the image's size, mtime and ctime, so
a cycle applied meanwhile or a change made behind the listener's back
(anything that writes the file) makes the next query read it again.  Blocks
(level 0) are read on demand.  Nothing here writes anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass

from hvr_common.pure.authorization import Grant
from hvr_common.pure import digest_tree as dt
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.pure.wire.messages import DigestQuery
from hvr_common.shell import digest_scan
from hvr_common.shell.logs import event
from hvr_common.shell.threads import finish_in_thread
from hvr_listener.replica_access import ReplicaAccess
from hvr_listener.resync_activity import ResyncActivity

log = logging.getLogger("hvr.listener.digests")

ANSWERING = (ReplicationState.REPLICATING, ReplicationState.ERROR)


@dataclass(frozen=True, slots=True)
class _Key:
    applied: int
    size: int
    mtime_ns: int
    ctime_ns: int


class ReplicaDigests:
    def __init__(self, access: ReplicaAccess, activity: ResyncActivity | None = None):
        self.access = access
        self.activity = activity if activity is not None else ResyncActivity()
        self._trees: dict[tuple[uuid.UUID, uuid.UUID], tuple[_Key, dt.DigestTree]] = {}
        self._locks: dict[tuple[uuid.UUID, uuid.UUID], asyncio.Lock] = {}

    async def answer(self, vm_id: uuid.UUID, disk_id: uuid.UUID, peer: Grant,
                     query: DigestQuery) -> tuple[bytes, int]:
        """The digests asked for, concatenated, and the replica's last applied sequence."""
        rep = await self.access.get(vm_id, peer)
        if rep.state not in ANSWERING:
            raise error("wrong_state", f"VM {rep.name} is {rep.state}: its replica cannot be compared yet")
        if query.purpose == "resync":
            self.activity.queried(vm_id)
        disk = rep.disk(disk_id)
        if disk.size_bytes != query.size_bytes:
            raise error("compare_mismatch", f"disk {disk_id} of VM {rep.name} is {disk.size_bytes} bytes on this "
                        f"replica, not {query.size_bytes}")
        geometry = dt.Geometry(disk.size_bytes)
        if not 0 <= query.level <= geometry.top or any(i >= geometry.count(query.level) for i in query.indices):
            raise error("compare_mismatch", f"nodes outside level {query.level} of disk {disk_id}'s tree "
                        f"(levels 0..{geometry.top})")
        key = (vm_id, disk_id)
        async with self._locks.setdefault(key, asyncio.Lock()):
            fd = await asyncio.to_thread(os.open, disk.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                tree = await self._tree(key, rep, fd, geometry)
                digests = await finish_in_thread(digest_scan.node_digests, fd, tree, query.level, query.indices)
            finally:
                os.close(fd)
        return dt.encode_digests(digests), rep.last_applied_sequence

    async def _tree(self, key, rep, fd: int, geometry: dt.Geometry) -> dt.DigestTree:
        st = os.fstat(fd)
        stamp = _Key(rep.last_applied_sequence, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._trees.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        started = time.monotonic()
        tree = await finish_in_thread(digest_scan.scan, fd, geometry)
        self._trees[key] = (stamp, tree)
        event(log, "replica_digests_read", vm=rep.name, disk=str(key[1]), bytes=geometry.size,
              applied_seq=rep.last_applied_sequence, latency_s=round(time.monotonic() - started, 3))
        return tree

    def forget(self, vm_id: uuid.UUID) -> None:
        for key in [k for k in self._trees if k[0] == vm_id]:
            del self._trees[key]
