"""Start-up recovery of a VM's logs after a crash or a stop.

For every disk:

1. A log without its END record was active when the agent stopped.  Its
   valid prefix is kept (a torn tail is the end of the log, not corruption):
   the file is truncated there and closed with an END record.
2. The write-intent bitmap names the regions whose image contents may not
   match the logs (writes applied but not journaled before the crash).  The
   current contents of exactly those regions are journaled as the first
   records of the new log (data as WRITE, holes as TRIM), so that replaying
   every log in order reproduces the image again.  If the bitmap is missing
   or unreadable while a log was left open, every region is uncertain.
3. Once the new log and the image are durable the bitmap is cleared.

A disk in bitmap mode (docs/bitmap-tracking.md) re-journals nothing: the
marked regions become changed blocks of the new cycle
(:func:`carry_marked_regions`), and the marks stay until it is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvr_common.pure.hrl import HEADER_SIZE, HrlCorruptError, HrlEncoder, HrlHeader, encode_header
from hvr_common.shell.hrl_file import read_hrl_summary
from hvr_common.pure.intent_bitmap import IntentBitmap
from hvr_common.pure.log_continuity import unfinished_cut_holes
from hvr_common.shell import sparse
from hvr_common.shell.files import unlink_if_exists, write_file_durably
from hvr_common.shell.logs import event
from hvr_agent.cut_snapshot import list_side_files
from hvr_agent.journal import list_logs, log_path

log = logging.getLogger("hvr.agent.recovery")

RESYNC_CHUNK = 4 * 1024 * 1024


@dataclass
class LogRepair:
    path: Path
    sequence: int
    valid_bytes: int
    torn_bytes: int
    records: int
    reason: str | None


@dataclass
class DiskScan:
    max_sequence: int = 0
    repaired: list[LogRepair] = field(default_factory=list)
    left_open: bool = False
    records: dict[int, int] = field(default_factory=dict)  # sequence -> records its log holds


def close_open_logs(image_path: Path, fallback_header: HrlHeader) -> DiskScan:
    """Close every log of a disk that lacks its END record (blocking; run in a thread)."""
    scan = DiskScan()
    for seq, path in list_logs(image_path):
        scan.max_sequence = max(scan.max_sequence, seq)
        try:
            header, summary = read_hrl_summary(path)
        except HrlCorruptError as exc:
            if exc.detail.get("part") != "header":
                raise HrlCorruptError(f"log {path} is damaged after its header: {exc.message}",
                                      hint="move it aside after saving a copy for analysis "
                                           "(hvrctl hrl inspect shows where), then restart the agent",
                                      detail=exc.detail) from None
            # The header itself never became durable: nothing in this file was
            # valid.  Start it again as an empty log with the known identity.
            header = HrlHeader(fallback_header.vm_id, fallback_header.disk_id, fallback_header.generation,
                               seq, fallback_header.disk_size, time.time_ns())
            enc = HrlEncoder(header)
            write_file_durably(path, encode_header(header) + enc.end(time.time_ns()))
            scan.records[seq] = 0
            scan.repaired.append(LogRepair(path, seq, HEADER_SIZE, 0, 0, str(exc)))
            scan.left_open = True
            continue
        scan.records[seq] = summary.record_count
        if summary.clean:
            continue
        scan.left_open = True
        enc = HrlEncoder(header)
        enc.crc = summary.final_crc
        enc.record_count = summary.record_count
        enc.write_bytes = summary.write_bytes
        enc.position = summary.valid_length
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, summary.valid_length)
            os.pwrite(fd, enc.end(time.time_ns()), summary.valid_length)
            os.fsync(fd)
        finally:
            os.close(fd)
        scan.repaired.append(LogRepair(path, seq, summary.valid_length, summary.torn_bytes,
                                       summary.record_count, summary.reason))
    return scan


def fill_unfinished_cut(image_path: Path, header: HrlHeader, sequences: list[int]) -> list[Path]:
    """Give a disk the empty, closed logs of ``sequences`` that a cut which never finished left it without
    (:func:`hvr_common.pure.log_continuity.unfinished_cut_holes`), so that a missing log is a loss from now on."""
    made = []
    for seq in sequences:
        path = log_path(image_path, seq)
        if path.exists():
            continue
        at = time.time_ns()
        hole = HrlHeader(header.vm_id, header.disk_id, header.generation, seq, header.disk_size, at)
        write_file_durably(path, encode_header(hole) + HrlEncoder(hole).end(at))
        made.append(path)
    return made


async def rejournal_ranges(disk, ranges: list[tuple[int, int]]) -> int:
    """Journal mode at open: the current contents of the uncertain ranges become the first records of
    the new log (data as WRITE, holes as TRIM); answers the data bytes journaled."""
    fd = disk.device.fd
    total = 0
    for offset, length in ranges:
        pieces = await asyncio.to_thread(lambda o=offset, n=length: list(read_region_runs(fd, o, n)))
        for off, data, n in pieces:
            if data is None:
                disk.log.append_trim(off, n, 0)
            else:
                disk.log.append_write(off, data, 0)
                total += n
    return total


def uncertain_ranges(found: IntentBitmap | None, disk_size: int, region_bytes: int,
                     left_open: bool) -> list[tuple[int, int]]:
    """Byte ranges whose contents must be re-journaled."""
    if found is None:
        if not left_open:
            return []
        everything = IntentBitmap(disk_size, region_bytes)
        everything.mark(range(len(everything.marks)))
        return everything.marked_ranges()
    return found.marked_ranges()


def read_region_runs(fd: int, offset: int, length: int):
    """Yield ``(offset, data | None, length)`` pieces of a range: data pieces, or holes (None)."""
    for run_off, run_len, is_data in sparse.data_extents(fd, offset, length):
        if not is_data:
            yield run_off, None, run_len
            continue
        pos = run_off
        end = run_off + run_len
        while pos < end:
            n = min(RESYNC_CHUNK, end - pos)
            yield pos, os.pread(fd, n, pos), n
            pos += n


def remove_side_files(log_base: Path) -> None:
    """Copy-before-write files a stop or crash left behind: their cycles are gone with the agent's memory."""
    for path in list_side_files(log_base):
        unlink_if_exists(path)


async def carry_marked_regions(disk, found: IntentBitmap | None, ranges: list[tuple[int, int]], vm: str,
                               seq: int) -> None:
    """Bitmap mode at open: the regions still marked (cycles not acknowledged, writes of the last
    period) are changed blocks of cycle ``seq``, so the next cycle ships their current contents.  The
    marks stay on disk until that cycle is acknowledged."""
    if found is None:  # unreadable: every region is uncertain
        ranges = uncertain_ranges(None, disk.size, disk.intent.region_bytes, True)
    disk.dirty.seed(ranges)
    if ranges:
        size = disk.intent.region_bytes
        await disk.intent.mark(sorted({r for off, n in ranges for r in range(off // size, (off + n - 1) // size + 1)}))
        event(log, "regions_carried", logging.WARNING, vm=vm, disk=disk.identity.disk, seq=seq, ranges=len(ranges),
              bytes=sum(n for _, n in ranges), bitmap_lost=found is None)
    await disk.flush(force=True)


async def recover_vm(vm, store, log: logging.Logger) -> None:
    """Open a VM's disks after a stop or a crash: close the logs left open, fill an unfinished cut's holes,
    re-journal (journal mode) or carry (bitmap mode) the regions the write-intent bitmap still marks."""
    scans = {}
    for dname, disk in vm.disks.items():
        ident = disk.identity
        fallback = HrlHeader(ident.vm_id, ident.disk_id, ident.generation, 0, disk.size, 0)
        scans[dname] = await asyncio.to_thread(close_open_logs, disk.log_base, fallback)
        for rep in scans[dname].repaired:
            event(log, "log_recovered", logging.WARNING, vm=vm.name, disk=dname, seq=rep.sequence,
                  valid_bytes=rep.valid_bytes, torn_bytes=rep.torn_bytes, records=rep.records,
                  reason=rep.reason)
    holes = unfinished_cut_holes(vm.record.next_sequence, {d: s.records for d, s in scans.items()})
    for dname, missing in holes.items():  # a cut that never finished: from now on a missing log is a loss
        ident = vm.disks[dname].identity
        fallback = HrlHeader(ident.vm_id, ident.disk_id, ident.generation, 0, vm.disks[dname].size, 0)
        await asyncio.to_thread(fill_unfinished_cut, vm.disks[dname].log_base, fallback, missing)
        event(log, "unfinished_cut_filled", logging.WARNING, vm=vm.name, disk=dname, sequences=missing)
    seq = max([vm.record.next_sequence] + [s.max_sequence + 1 for s in scans.values()])
    for dname, disk in vm.disks.items():
        await asyncio.to_thread(remove_side_files, disk.log_base)  # (any mode: it may have just switched)
        found = await asyncio.to_thread(disk.intent.load)
        ranges = uncertain_ranges(found, disk.size, disk.intent.region_bytes, scans[dname].left_open)
        disk.open_log(seq)
        if disk.dirty is not None:
            await carry_marked_regions(disk, found, ranges, vm.name, seq)
            continue
        if ranges:
            resynced = await rejournal_ranges(disk, ranges)
            event(log, "regions_rejournaled", logging.WARNING, vm=vm.name, disk=dname, seq=seq,
                  ranges=len(ranges), bytes=resynced, bitmap_lost=found is None)
        await disk.flush(force=True)
        await disk.intent.reset_to_period(seq)
    vm.sequence = seq
    await asyncio.to_thread(store.set_next_sequence, vm.name, seq + 1)
    event(log, "vm_opened", vm=vm.name, seq=seq, disks=list(vm.disks))
