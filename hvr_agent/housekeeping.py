"""The files replication leaves on the primary: closed logs and spool files, what they hold, deleting them.

Blocking functions (they list, stat and unlink files): run them in worker
threads.  A log is deleted only when its content is on the replica (R1): its
cycle was acknowledged, or it predates the initial cut.  Spool files are
throw-away: they are rebuilt from the logs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hvr_common.pure.errors import HvrError
from hvr_common.pure.hrl import HEADER_SIZE, decode_header
from hvr_common.pure.log_continuity import LogGap, first_gap
from hvr_common.pure.measure import pending_log_bytes
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.files import unlink_if_exists
from hvr_common.shell.logs import event
from hvr_agent import initial_window, shipper
from hvr_agent.journal import list_logs, log_path
from hvr_agent.relationship import Relationship

log = logging.getLogger("hvr.agent.replication")

KEPT_IN_OUTBOX = frozenset({"tracking-switch.json"})  # not a spool file (hvr_agent.tracking_switch)


def clean_leftovers(rel: Relationship, outbox: Path) -> None:
    """At the task's start: spool files are rebuilt from logs; logs older than next_sequence were
    acknowledged (R1)."""
    if outbox.is_dir():
        for p in outbox.iterdir():
            if p.name not in KEPT_IN_OUTBOX:
                unlink_if_exists(p)
    nxt = rel.rec.next_sequence
    if nxt is not None and rel.rec.state is not ReplicationState.READY_FOR_INITIAL_REPLICATION:
        removed = delete_logs_upto(rel.disks(), nxt - 1)
        if removed:
            event(log, "acknowledged_logs_deleted", vm=rel.name, seq=nxt - 1, logs=removed)


def delete_logs_upto(disks: list[shipper.DiskSource], last: int) -> int:
    """Delete every log of these disks up to sequence ``last``; answer how many."""
    removed = 0
    for disk in disks:
        for seq, path in list_logs(disk.logs_at):
            if seq <= last:
                unlink_if_exists(path)
                removed += 1
    return removed


def delete_cycle_files(disks: list[shipper.DiskSource], seq: int, spool: Path) -> None:
    """An acknowledged cycle's logs and spool file."""
    for disk in disks:
        unlink_if_exists(log_path(disk.logs_at, seq))
    unlink_if_exists(spool)


def closed_log_bytes(images: list[Path], next_sequence: int | None, skip: set) -> int:
    """Pending bytes of the closed logs from ``next_sequence`` on (``skip``: the active logs, as (image,
    sequence)): their records, so a log that holds no write counts 0."""
    total = 0
    for image in images:
        for seq, path in list_logs(image):
            if (next_sequence is not None and seq < next_sequence) or (image, seq) in skip:
                continue
            try:
                total += pending_log_bytes(path.stat().st_size, closed=True)
            except FileNotFoundError:
                pass
    return total


def allocated_below(image: Path, end: int) -> int:
    """Bytes of data (not holes) in the image below offset ``end``."""
    if end <= 0:
        return 0
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return initial_window.allocated_bytes(fd, 0, end)
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """A VM's outbox folder and the spool files in it (it holds no folders)."""
    if path.is_dir():
        for p in path.iterdir():
            unlink_if_exists(p)
        path.rmdir()


def pending_log_gap(disks: list[shipper.DiskSource], pending: list[int]) -> LogGap | None:
    """The first pending cycle some disk has no log for, or whose file holds another sequence."""
    headers: dict[str, dict[int, int | None]] = {}
    wanted = set(pending)
    for disk in disks:
        found = headers[disk.name] = {}
        for seq, path in list_logs(disk.logs_at):
            if seq in wanted:
                found[seq] = _header_sequence(path)
    return first_gap(pending, headers)


def _header_sequence(path: Path) -> int | None:
    try:
        with open(path, "rb", buffering=0) as f:
            return decode_header(f.read(HEADER_SIZE)).sequence
    except (OSError, HvrError):
        return None
