"""Log continuity: which closed logs a VM must hold, and telling a lost log from an unfinished cut.

Every cut creates the next log of every disk of the VM before it ends the
current ones, and the agent's store records the VM's next sequence once the
cut settled (and at every open).  So every sequence below the recorded
``settled_next`` has a log on every disk until its cycle is acknowledged
(invariant C1, docs/resync.md).  The one legitimate exception is a cut that
never finished: a crash between two disks' log creations leaves sequences at
or past ``settled_next`` that some disks hold and others lack, all of them
without a record (writes reach a new log only once every disk switched).  At
the next open the agent gives the disks lacking them an empty log
(:func:`unfinished_cut_holes`), so that from then on a log missing from the
pending range, or a file whose header names another sequence, is always a
loss (:func:`first_gap`): the replica can no longer be brought up to date by
cycles, and the disks are compared instead (a resync, never a copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LogGap:
    """A pending cycle that cannot be shipped as it was journaled."""

    disk: str
    sequence: int
    reason: str

    def describe(self) -> str:
        return f"log {self.sequence} of disk {self.disk} {self.reason}"


def unfinished_cut_holes(settled_next: int, records: Mapping[str, Mapping[int, int]]) -> dict[str, list[int]]:
    """The sequences each disk lacks that an unfinished cut left: at or past ``settled_next``, held by some
    disk, and without a record in any disk's log.  ``records``: disk -> {sequence: record count}."""
    holes: dict[str, list[int]] = {}
    sequences = sorted({seq for logs in records.values() for seq in logs if seq >= settled_next})
    for seq in sequences:
        if any(logs.get(seq, 0) for logs in records.values()):
            continue  # a record: that cut switched every disk, so a disk lacking the log lost it
        for disk, logs in records.items():
            if seq not in logs:
                holes.setdefault(disk, []).append(seq)
    return holes


def first_gap(pending: Iterable[int], headers: Mapping[str, Mapping[int, int | None]]) -> LogGap | None:
    """The first pending sequence some disk cannot ship: its log is missing, or the file holds another
    sequence (renamed), or its header cannot be read.  ``headers``: disk -> {file's sequence: the header's
    sequence, None if unreadable}."""
    for seq in pending:
        for disk, logs in headers.items():
            if seq not in logs:
                return LogGap(disk, seq, "is missing")
            found = logs[seq]
            if found is None:
                return LogGap(disk, seq, "has no readable header")
            if found != seq:
                return LogGap(disk, seq, f"is out of sequence: the file holds log {found}")
    return None
