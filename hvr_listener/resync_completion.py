"""The end of a primary's resync (``POST /v1/replicas/{vm_id}/resync/complete``): the replica is rebased.

The primary compared the disks with this replica while no cycle was shipped
and every stored cycle was applied (or could not be: the replica is in
``Error``), and re-journaled what differs into logs from ``next_sequence`` on.
The cycles before that sequence are replaced by the compare: stored ones not
applied are dropped (rows and files), and the replica expects
``next_sequence`` next, as if ``next_sequence - 1`` had been received and
applied.  The images do not change here; they reach the primary's state when
the cycle ``next_sequence`` (with the re-journaled blocks) is applied,
crash-safely like every cycle.  Under the per-VM lock and the image lock, so
no cycle is received or applied meanwhile.  Fenced by generation; idempotent
(the same ``next_sequence`` again changes nothing).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from hvr_common.pure.authorization import Grant
from hvr_common.pure.errors import UsageError
from hvr_common.pure.input_limits import MAX_INT64, is_int_in
from hvr_common.shell.files import unlink_if_exists
from hvr_common.shell.logs import event
from hvr_listener.replica_access import ReplicaAccess, check_generation, conflict
from hvr_listener.replica_state import ReplicaStates
from hvr_listener.store import Replica

log = logging.getLogger("hvr.listener.replicas")


class ResyncCompletion:
    def __init__(self, access: ReplicaAccess, states: ReplicaStates):
        self.access = access
        self.states = states

    async def complete(self, vm_id: uuid.UUID, peer: Grant, body: dict) -> Replica:
        generation, next_sequence = body.get("generation"), body.get("next_sequence")
        for key, value in (("generation", generation), ("next_sequence", next_sequence)):
            if not is_int_in(value, 1):  # SQLite's range: 2^80 overflowed the store (a 500)
                raise UsageError(f"field {key!r} must be an integer from 1 to {MAX_INT64}")
        if set(body) - {"generation", "next_sequence"}:
            raise UsageError(f"unknown field(s): {', '.join(sorted(set(body) - {'generation', 'next_sequence'}))}")
        async with await self.access.locked(vm_id, peer):
            async with self.access.image_lock(vm_id):
                rep = await self.access.get(vm_id, peer)
                check_generation(rep, generation)
                if rep.next_sequence == next_sequence and rep.last_applied_sequence == next_sequence - 1:
                    return rep  # done already (the primary asks again after a crash)
                if next_sequence <= rep.last_applied_sequence:
                    raise conflict("out_of_order", f"a resync of VM {rep.name} cannot go back to cycle "
                                   f"{next_sequence}: cycle {rep.last_applied_sequence} is applied",
                                   expected=rep.next_sequence)
                dropped = await asyncio.to_thread(self.states.complete_resync, rep, next_sequence)
                if dropped is None:
                    raise conflict("wrong_state", f"VM {rep.name} changed while its resync completed; try again")
                for path in dropped:
                    await asyncio.to_thread(unlink_if_exists, path)
        event(log, "replica_resynchronized", vm=rep.name, next_sequence=next_sequence, dropped_cycles=len(dropped),
              old_next_sequence=rep.next_sequence)
        return await self.access.get(vm_id)
