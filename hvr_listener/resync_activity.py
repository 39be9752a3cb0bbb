"""Which replicas a primary is resynchronizing now, as the replica server sees it.

The replica stays ``Replicating`` through a resync (the differences reach it
as an ordinary cycle, ``docs/resync.md``), so its state cannot tell that its
images are being compared because they are not trusted.  A resync's digest
queries say so (``DigestQuery.purpose == "resync"``; a verify's do not): the
replica counts as being resynchronized from such a query until the resync
completes (``resync/complete``), or until no resync query came for
``QUIET_S`` (a primary that cancelled or died).  Kept in memory: after a
restart of the listener the primary's next query marks it again.  The backup
gate refuses a backup meanwhile (``backup_resync_running``).
"""

from __future__ import annotations

import time
import uuid

QUIET_S = 600.0  # no resync query for this long: the resync is over (cancelled, or the primary gone)


class ResyncActivity:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._last: dict[uuid.UUID, float] = {}

    def queried(self, vm_id: uuid.UUID) -> None:
        """A resync's digest query for ``vm_id`` arrived."""
        self._last[vm_id] = self._clock()

    def completed(self, vm_id: uuid.UUID) -> None:
        self._last.pop(vm_id, None)

    def running(self, vm_id: uuid.UUID) -> bool:
        last = self._last.get(vm_id)
        if last is None:
            return False
        if self._clock() - last > QUIET_S:
            del self._last[vm_id]
            return False
        return True
