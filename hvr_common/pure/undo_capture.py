"""Captured ranges: which bytes of each disk already have a pre-image in a point's undo log (pure).

Before a cycle overwrites a range of the replica, the listener asks
:meth:`CapturedSet.uncaptured` which parts of it have no pre-image yet in the
current point's undo log, captures exactly those, and marks them with
:meth:`CapturedSet.add`.  After a restart the set is rebuilt from the log's
valid records (:meth:`CapturedSet.from_records`), so a cycle applied again
never captures a byte twice.  Ranges are exact byte ranges; why this is safe
across crashes is in ``docs/undo-format.md`` (section "Capture").
"""

from __future__ import annotations

import uuid
from bisect import bisect_right
from collections.abc import Iterable, Iterator

from hvr_common.pure.undo import UndoCorruptError, UndoRecord


class CapturedRanges:
    """The captured byte ranges of one disk: sorted, disjoint, touching ranges joined."""

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The captured ranges as (offset, length), in offset order."""
        return ((s, e - s) for s, e in zip(self._starts, self._ends))

    @property
    def captured_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def uncaptured(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The parts of ``[offset, offset+length)`` not captured yet, as (offset, length) in offset order."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        end = offset + length
        starts, ends = self._starts, self._ends
        i = max(bisect_right(starts, offset) - 1, 0)
        out: list[tuple[int, int]] = []
        cursor = offset
        while cursor < end and i < len(starts) and starts[i] < end:
            if ends[i] > cursor:
                if starts[i] > cursor:
                    out.append((cursor, starts[i] - cursor))
                cursor = ends[i]
            i += 1
        if cursor < end:
            out.append((cursor, end - cursor))
        return out

    def add(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` captured; ``ValueError`` if any byte of it already is."""
        if offset < 0 or length <= 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        end = offset + length
        starts, ends = self._starts, self._ends
        i = bisect_right(starts, offset)  # ranges [0, i) start at or before offset
        if (i and ends[i - 1] > offset) or (i < len(starts) and starts[i] < end):
            raise ValueError(f"range [{offset}, {end}) is already partly captured")
        join_left = i > 0 and ends[i - 1] == offset
        join_right = i < len(starts) and starts[i] == end
        if join_left and join_right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif join_left:
            ends[i - 1] = end
        elif join_right:
            starts[i] = offset
        else:
            starts.insert(i, offset)
            ends.insert(i, end)


class CapturedSet:
    """Captured ranges of every disk of a VM, for one recovery point."""

    __slots__ = ("_disks",)

    def __init__(self) -> None:
        self._disks: dict[uuid.UUID, CapturedRanges] = {}

    @classmethod
    def from_records(cls, records: Iterable[UndoRecord]) -> CapturedSet:
        """The set a log's valid records describe; a log whose records overlap is corrupt."""
        captured = cls()
        for record in records:
            try:
                captured.add(record.disk_id, record.offset, record.length)
            except ValueError:
                raise UndoCorruptError(
                    f"undo record at {record.position} overlaps an earlier record of disk {record.disk_id}",
                    detail={"part": "records", "offset": record.position}) from None
        return captured

    def disks(self) -> list[uuid.UUID]:
        return sorted(self._disks, key=lambda d: d.bytes)

    def ranges(self, disk_id: uuid.UUID) -> CapturedRanges:
        return self._disks.get(disk_id) or CapturedRanges()

    def uncaptured(self, disk_id: uuid.UUID, offset: int, length: int) -> list[tuple[int, int]]:
        return self.ranges(disk_id).uncaptured(offset, length)

    def add(self, disk_id: uuid.UUID, offset: int, length: int) -> None:
        ranges = self._disks.get(disk_id)
        if ranges is None:
            ranges = self._disks[disk_id] = CapturedRanges()
        ranges.add(offset, length)
