"""Bitmap tracking of one disk: the cycle's dirty map, the frozen cycles, their write-intent regions.

Owned by a :class:`~hvr_agent.tracker.TrackedDisk` in bitmap mode.  All of
it runs on the event loop except the snapshots' ``read_range`` (build
threads, under the snapshot's lock).

* ``current``: the blocks written since the last cut (marked after the
  write-intent marking of their region, before the image changes).
* ``snapshots``: the frozen cycles not yet acknowledged, each with
  copy-before-write armed (:mod:`hvr_agent.cut_snapshot`); ``frozen``: the
  dirty map of every cycle cut and not yet acknowledged (a cycle whose
  snapshot is closed before it is acknowledged is abandoned with them).
* ``cycle_regions``: the write-intent regions of every cycle cut and not yet
  acknowledged: the on-disk bitmap keeps them until the replica holds the
  cycle, so a crash at any step leaves them marked and the next cycle
  carries their blocks.
"""

from __future__ import annotations

import time
from pathlib import Path

from hvr_common.pure.dirty_map import BLOCK_BYTES, DirtyMap
from hvr_common.pure.intent_bitmap import IntentBitmap
from hvr_agent.cut_snapshot import CutSnapshot, side_path
from hvr_agent.intent import IntentBitmapFile


class DirtyTracking:
    def __init__(self, disk_size: int, image_fd: int, log_base: Path, *, cbw_budget_bytes: int = 1 << 62,
                 cbw_max_age_s: float = float("inf")):
        self.disk_size = disk_size
        self.cbw_budget_bytes = cbw_budget_bytes
        self.cbw_max_age_s = cbw_max_age_s
        self.image_fd = image_fd
        self.log_base = log_base
        self.current = DirtyMap(disk_size)
        self.snapshots: dict[int, CutSnapshot] = {}
        self.frozen: dict[int, DirtyMap] = {}
        self.cycle_regions: dict[int, IntentBitmap] = {}
        self.carried: IntentBitmap | None = None  # regions of abandoned cycles, now the current cycle's
        self.copied_bytes = 0  # copy-before-write bytes made so far (monotonic)

    def before_change(self, offset: int, length: int) -> None:
        """Copy-before-write for every armed cycle (called only while ``snapshots`` is not empty)."""
        for snap in list(self.snapshots.values()):
            self.copied_bytes += snap.before_change(offset, length)

    def freeze(self, sequence: int, regions: IntentBitmap) -> None:
        """The cut of ``sequence`` (synchronous, with every other disk of the VM): freeze and arm."""
        if self.carried is not None:
            regions = regions.copy()
            regions.mark(self.carried.marked_regions())
            self.carried = None
        self.cycle_regions[sequence] = regions
        self.frozen[sequence] = self.current
        self.snapshots[sequence] = CutSnapshot(sequence, self.current, self.image_fd,
                                               side_path(self.log_base, sequence), time.time_ns(),
                                               self.cbw_budget_bytes, self.cbw_max_age_s)
        self.current = DirtyMap(self.disk_size)

    def built(self, sequence: int) -> None:
        """Cycle ``sequence`` was acknowledged (or abandoned): disarm and drop the copies."""
        snap = self.snapshots.pop(sequence, None)
        if snap is not None:
            snap.close()

    def abandon_from(self, sequence: int, intent: IntentBitmapFile) -> list[int]:
        """Abandon every frozen cycle from ``sequence`` on: their blocks go into the current cycle
        (whose regions stay marked until it is acknowledged); they ship empty.  Returns them."""
        gone = sorted(s for s in self.frozen if s >= sequence)
        carried = IntentBitmap(intent.disk_size, intent.region_bytes)
        for seq in gone:
            self.current.merge(self.frozen.pop(seq))
            self.built(seq)
        for seq, regions in self.cycle_regions.items():
            if seq >= sequence:
                carried.mark(regions.marked_regions())
        intent.mark_carried(carried.marked_regions())  # the period's marks, and the digest cache's
        if self.carried is not None:
            carried.mark(self.carried.marked_regions())
        self.carried = carried
        return gone

    def discard_upto(self, sequence: int) -> None:
        """A cut no cycle ships (no replication yet, or the initial copy's: the images carry it):
        forget every frozen cycle up to ``sequence`` and disarm them."""
        for seq in [s for s in self.frozen if s <= sequence]:
            del self.frozen[seq]
            self.built(seq)
        for seq in [s for s in self.cycle_regions if s <= sequence]:
            del self.cycle_regions[seq]
        self.carried = None

    def seed(self, ranges: list[tuple[int, int]]) -> None:
        """After a restart: the write-intent regions left marked are changed blocks of this cycle."""
        for offset, length in ranges:
            if length:
                self.current.mark(offset, length)

    def acknowledged(self, sequence: int) -> IntentBitmap | None:
        """Forget the regions of cycles up to ``sequence``; the union of those still unacknowledged."""
        for seq in [s for s in self.cycle_regions if s <= sequence]:
            del self.cycle_regions[seq]
        for seq in [s for s in self.frozen if s <= sequence]:
            del self.frozen[seq]
        keep = None
        for regions in list(self.cycle_regions.values()) + ([self.carried] if self.carried else []):
            if keep is None:
                keep = regions.copy()
            else:
                keep.mark(regions.marked_regions())
        return keep

    def pending_bytes(self) -> int:
        """The bytes the cycles not yet acknowledged ship: the dirty blocks of the current cycle and of
        every frozen one (a block dirty in two cycles ships in each)."""
        blocks = self.current.count + sum(m.count for m in self.frozen.values())
        return blocks * BLOCK_BYTES

    def settled(self) -> bool:
        """Nothing frozen, armed or unacknowledged is left (after a switch back to journal mode)."""
        return not (self.frozen or self.snapshots or self.cycle_regions or self.carried)

    def close(self) -> None:
        for snap in self.snapshots.values():
            snap.close()
        self.snapshots.clear()

    def status(self) -> dict:
        return {"dirty_blocks": self.current.count, "frozen_cycles": sorted(self.snapshots),
                "cbw_bytes": sum(s.copied_bytes for s in self.snapshots.values())}
