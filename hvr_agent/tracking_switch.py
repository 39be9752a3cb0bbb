"""A journal-mode VM whose backlog passed its budget: bitmap tracking until the backlog is shipped.

A VM in journal mode keeps every write in its logs until the replica
acknowledged them; while the link is down the active log grows with every
write (no cut is taken while a cycle waits).  While a closed cycle waits for
the replica (an upload failed or is slow), at every replication step and
every ``POLL_S`` seconds while the task waits for the next cut or for the
retry, the logs not yet acknowledged (closed and active) are measured against
the budget (:mod:`hvr_common.pure.log_backlog`: ``log_budget_percent`` of the
VM's disks' size, agent.toml, default 50).  Past it:

1. the switch is recorded in ``<outbox>/tracking-switch.json`` (durably:
   why, the bytes, the budget, when, the first sequence tracked by bitmap);
2. the VM's tracking mode becomes ``bitmap`` in the agent's store and is
   taken at a cut made at once (:meth:`VmRegistry.plan_tracking`): the log
   that cut closes is the last journal cycle, every write after the cut is
   marked in the dirty map (and its write-intent region, B1/B5);
3. the journal cycles still pending ship first, in sequence order, as they
   were journaled; no later cut is taken while they wait, so nothing freezes
   and nothing is copied aside: while the link stays down the agent keeps the
   logs it had at the switch and one bit per 4 KiB block, and the next cycle
   carries each changed block once, however often the guest rewrote it;
4. once every cycle cut before is acknowledged (the journal backlog shipped),
   the next cut switches back to journal mode: the cycle it closes (the blocks
   changed since the switch) streams as a bitmap cycle, copy-before-write
   armed until it is acknowledged, and the marker file goes.

The VM never goes to ``WaitingForStartResynchronize`` for a backlog.  ``vm
get`` shows the switch (``tracking_switch``) while it lasts; the events are
``log_budget_exceeded``, ``tracking_switched`` and ``tracking_switched_back``.

A crash at any step: before the store changed, the marker is found with the
VM in journal mode and dropped (the next check measures again); after, the
VM opens in bitmap mode and the marker says the mode is temporary; between
the switch back and the marker's deletion, the marker is dropped likewise.
``hvrctl vm set-tracking`` while switched ends the switch: the operator's
mode stands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from hvr_common.pure.log_backlog import DEFAULT_BUDGET_PERCENT, BacklogCheck, check_backlog
from hvr_common.pure.measure import pending_log_bytes
from hvr_common.pure.tracking_mode import TrackingMode
from hvr_common.shell.files import fsync_dir, unlink_if_exists, write_file_durably
from hvr_common.shell.logs import event
from hvr_agent.housekeeping import closed_log_bytes
from hvr_agent.relationship import Relationship

log = logging.getLogger("hvr.agent.replication")

MARKER_NAME = "tracking-switch.json"
POLL_S = 5.0  # how often the backlog is measured while a failed upload waits for its retry


class TrackingSwitch:
    """One VM's temporary bitmap tracking: when it starts, when it ends, what ``vm get`` shows of it."""

    def __init__(self, rel: Relationship, outbox: Path, percent: int = DEFAULT_BUDGET_PERCENT):
        self.rel = rel
        self.path = outbox / MARKER_NAME
        self.percent = percent
        self.switched: dict | None = None  # the marker's contents while the VM is switched
        self.over_budget = False  # the last measure was past the budget (events once per crossing)

    def status(self) -> dict | None:
        return dict(self.switched) if self.switched is not None else None

    async def load(self) -> None:
        """At the task's start: a marker left by a switch; dropped if the VM is not in bitmap mode."""
        data = await asyncio.to_thread(_read_marker, self.path)
        if data is not None and self.rel.vm().record.tracking is not TrackingMode.BITMAP:
            await self.forget("the VM is in journal mode")
            return
        self.switched = data

    async def forget(self, why: str | None) -> None:
        """End the switch without changing the mode (the operator chose one, or a crash left the marker);
        ``why`` None: the switch ended as planned (no event here)."""
        self.switched = None
        if await asyncio.to_thread(_remove_marker, self.path) and why is not None:
            event(log, "tracking_switch_dropped", vm=self.rel.name, reason=why)

    # --- the checks --------------------------------------------------------------------------
    async def measure(self) -> BacklogCheck:
        """The bytes of the logs not yet acknowledged (closed ones and the active one) against the budget."""
        rel = self.rel
        vm = rel.vm()
        disks = rel.disks()
        closed = await asyncio.to_thread(closed_log_bytes, [d.logs_at for d in disks], rel.rec.next_sequence,
                                         {(d.logs_at, vm.sequence) for d in disks})
        active = sum(pending_log_bytes(d.log.encoder.position, closed=False)
                     for d in vm.disks.values() if d.log is not None)
        return check_backlog(closed + active, sum(d.size_bytes for d in disks), self.percent)

    async def check(self, cut: Callable[[], Awaitable[int]]) -> bool:
        """A journal-mode VM past its budget switches to bitmap tracking at a cut made with ``cut``: True then."""
        rel = self.rel
        vm = rel.vm()
        if vm.record.tracking is not TrackingMode.JOURNAL or vm.record.read_only:
            if self.switched is not None and vm.record.tracking is TrackingMode.JOURNAL:
                await self.forget("the VM is in journal mode")
            return False
        if not rel.pending_sequences():
            return False  # nothing waits for the replica: the next cycle ships what the logs hold
        check = await self.measure()
        if check.over and not self.over_budget:
            event(log, "log_budget_exceeded", logging.WARNING, vm=rel.name, bytes=check.pending_bytes,
                  budget_bytes=check.budget_bytes, pending=len(rel.pending_sequences()))
        elif not check.over and self.over_budget:
            event(log, "log_budget_back_within", vm=rel.name, bytes=check.pending_bytes,
                  budget_bytes=check.budget_bytes)
        self.over_budget = check.over
        if check.over:
            await self._switch(check, cut)
        return check.over

    async def _switch(self, check: BacklogCheck, cut: Callable[[], Awaitable[int]]) -> None:
        rel = self.rel
        vm = rel.vm()
        info = {"tracking": TrackingMode.BITMAP.value, "reason": "log_budget_exceeded",
                "detail": f"the journal's backlog of {check.pending_bytes} bytes passed its budget of "
                          f"{check.budget_bytes} bytes ({self.percent} % of the disks): bitmap tracking until "
                          "the backlog is shipped",
                "pending_bytes": check.pending_bytes, "budget_bytes": check.budget_bytes,
                "since_ns": time.time_ns(), "first_bitmap_sequence": vm.sequence + 1}
        await asyncio.to_thread(_write_marker, self.path, info)
        self.switched = info
        await rel.registry.plan_tracking(rel.name, TrackingMode.BITMAP)
        seq = await cut()
        event(log, "tracking_switched", logging.WARNING, vm=rel.name, tracking=TrackingMode.BITMAP.value,
              reason=info["reason"], bytes=check.pending_bytes, budget_bytes=check.budget_bytes, seq=seq,
              hint="nothing to do: the pending logs ship first, then the changed blocks; journal mode "
                   "returns once the backlog is shipped")
        self.over_budget = False

    async def before_cut(self) -> None:
        """Before a due cut: once every cycle cut before is acknowledged, this cut returns to journal mode."""
        rel = self.rel
        if self.switched is None or rel.pending_sequences():
            return
        if rel.vm().record.tracking is not TrackingMode.BITMAP:
            await self.forget("the VM is not in bitmap mode")
            return
        since_ns = self.switched.get("since_ns")
        await rel.registry.plan_tracking(rel.name, TrackingMode.JOURNAL)
        await self.forget(None)
        event(log, "tracking_switched_back", vm=rel.name, tracking=TrackingMode.JOURNAL.value,
              seq=rel.vm().sequence,
              switched_s=round((time.time_ns() - since_ns) / 1e9, 3) if isinstance(since_ns, int) else None)


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        event(log, "tracking_switch_unreadable", logging.WARNING, path=str(path), error=str(exc),
              hint="the switch is treated as ended; the next check measures the backlog again")
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_durably(path, json.dumps(info).encode())


def _remove_marker(path: Path) -> bool:
    """True if there was a marker to remove."""
    if unlink_if_exists(path):
        fsync_dir(path.parent)
        return True
    return False
