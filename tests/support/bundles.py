"""Building bundles by hand for listener tests (from records, not from the agent's shipper)."""

from __future__ import annotations

import time
import uuid

from hvr_common.pure.bundle import END_FRAME, BundleHeader, BundleKind, DiskEntry, FrameEncoder
from hvr_common.pure.hrl import HrlEncoder, HrlHeader


def hrl_bytes(vm_id: uuid.UUID, disk_id: uuid.UUID, generation: int, sequence: int, disk_size: int,
              ops: list[tuple]) -> bytes:
    """ops: ("write", offset, data) | ("trim", offset, length) | ("zero", offset, length)."""
    enc = HrlEncoder(HrlHeader(vm_id, disk_id, generation, sequence, disk_size, time.time_ns()))
    out = bytearray(enc.header_bytes())
    for op in ops:
        if op[0] == "write":
            out += enc.write(op[1], op[2])
            out += op[2]
        elif op[0] == "trim":
            out += enc.trim(op[1], op[2])
        else:
            out += enc.zero(op[1], op[2])
    out += enc.end(time.time_ns())
    return bytes(out)


def bundle(kind: BundleKind, vm_id: uuid.UUID, generation: int, sequence: int,
           disks: list[tuple[uuid.UUID, int, int, int, bytes]], *, compress: bool = True,
           created_ns: int | None = None, streamed: bool = False) -> bytes:
    """disks: (disk_id, disk_size, range_start, range_end, hrl bytes); ``created_ns``: the cut time (now);
    ``streamed``: the streamed form (version 2: no totals, an end-of-disk frame after each disk's frames)."""
    entries, payloads = [], []
    for disk_id, _size, start, end, log in disks:
        fe = FrameEncoder(compress)
        parts = fe.feed(log) + fe.finish()
        payloads.append(b"".join(parts) + (END_FRAME if streamed else b""))
        entries.append(DiskEntry(disk_id, 0, 0, start, end, 0) if streamed
                       else DiskEntry(disk_id, fe.stored_bytes, fe.raw_bytes, start, end, fe.frames))
    header = BundleHeader(kind, vm_id, generation, sequence, created_ns or time.time_ns(), tuple(entries), streamed)
    return header.encode() + b"".join(payloads)
