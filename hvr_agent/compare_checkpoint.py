"""A resync's checkpoint: where a compare in progress stopped, so a restart of the agent continues it.

Two files per VM beside its first disk's logs (``docs/resync.md``, "A restart
continues the compare"):

* ``<log base>.resync``: JSON, written durably (temp, fsync, rename, fsync of
  the folder) after an answer when ``INTERVAL_S`` passed or ``STEP_BYTES``
  more were compared since the last one, after each disk's image was read,
  and when the resync is suspended: the cut the compare started after
  (``base``), the replica's applied sequence it compared against, the counters shown by ``vm get``, and per disk
  its id and size, whether its tree is saved, and the nodes still to compare
  (runs of ``(level, first, end)``);
* ``<log base of the disk>.resync-tree``: that disk's chunk digests (32 bytes
  per 64 KiB), written durably once the image was read, so a continuing
  compare does not read the image again.

Write order: the re-journaled records are made durable first (the caller
flushes every disk), then the checkpoint; a node is recorded as compared only
when what was found below it is durable in a log after ``base``.  A crash
before the rename leaves the previous checkpoint, which is behind, never
ahead.  Anything that does not match (another VM, disk or size, an unreadable
file, a tree of the wrong length) is no checkpoint: the compare starts again
from a new cut.  The files are removed when the resync completes, is
cancelled or must start again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hvr_common.pure import digest_tree as dt
from hvr_common.shell.files import unlink_if_exists, write_file_durably

VERSION = 1
INTERVAL_S = 1.0  # after an answer, when this long passed since the last checkpoint (each costs a flush
STEP_BYTES = 256 * 1024 * 1024  # of the logs and an fsync), or this many more bytes were compared
COUNTERS = ("total_bytes", "scanned_bytes", "compared_bytes", "differing_bytes", "sent_bytes", "started_ns")


def checkpoint_path(log_base: Path) -> Path:
    return log_base.with_name(log_base.name + ".resync")


def tree_path(log_base: Path) -> Path:
    return log_base.with_name(log_base.name + ".resync-tree")


@dataclass
class DiskCheckpoint:
    disk_id: str
    size: int
    pending: list[tuple[int, int, int]]
    compared_bytes: int  # by this disk's descent
    differing_ranges: int
    tree_saved: bool

    def to_json(self) -> dict:
        return {"disk_id": self.disk_id, "size": self.size, "pending": [list(r) for r in self.pending],
                "compared_bytes": self.compared_bytes, "differing_ranges": self.differing_ranges,
                "tree_saved": self.tree_saved}


@dataclass
class ResyncCheckpoint:
    vm_id: str
    base: int
    replica_applied: int
    counters: dict[str, int]
    disks: dict[str, DiskCheckpoint] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": VERSION, "vm_id": self.vm_id, "base": self.base, "replica_applied": self.replica_applied,
                "counters": self.counters, "disks": {name: d.to_json() for name, d in self.disks.items()}}

    @classmethod
    def from_json(cls, obj) -> ResyncCheckpoint:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) on anything malformed: no checkpoint then."""
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise ValueError("not a resync checkpoint of this version")
        counters = {k: _int(obj["counters"][k]) for k in COUNTERS}
        disks = {}
        for name, d in obj["disks"].items():
            pending = [tuple(_int(v) for v in run) for run in d["pending"]]
            if any(len(run) != 3 for run in pending):
                raise ValueError("a pending run is not (level, first, end)")
            disks[name] = DiskCheckpoint(str(d["disk_id"]), _int(d["size"]), pending, _int(d["compared_bytes"]),
                                         _int(d["differing_ranges"]), bool(d["tree_saved"]))
        return cls(str(obj["vm_id"]), _int(obj["base"]), _int(obj["replica_applied"]), counters, disks)


def _int(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def save(log_base: Path, checkpoint: ResyncCheckpoint) -> None:
    """Blocking: the checkpoint, durably (the caller made the re-journaled records durable first)."""
    write_file_durably(checkpoint_path(log_base), json.dumps(checkpoint.to_json(), sort_keys=True).encode())


def load(log_base: Path) -> ResyncCheckpoint | None:
    """Blocking: the checkpoint, or None (none, or unreadable: start again)."""
    try:
        return ResyncCheckpoint.from_json(json.loads(checkpoint_path(log_base).read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save_tree(log_base: Path, tree: dt.DigestTree) -> None:
    """Blocking: a disk's chunk digests, durably."""
    write_file_durably(tree_path(log_base), tree.chunk_digests())


def load_tree(log_base: Path, geometry: dt.Geometry) -> dt.DigestTree | None:
    """Blocking: a saved tree of that geometry, or None."""
    try:
        data = tree_path(log_base).read_bytes()
    except OSError:
        return None
    if len(data) != geometry.count(1) * dt.DIGEST_SIZE:
        return None
    return dt.DigestTree.from_chunk_digests(geometry, data)


def remove(vm_log_base: Path, disk_log_bases: list[Path]) -> None:
    """Blocking: the checkpoint first (without it the trees are never read), then the trees."""
    unlink_if_exists(checkpoint_path(vm_log_base))
    for base in disk_log_bases:
        unlink_if_exists(tree_path(base))
