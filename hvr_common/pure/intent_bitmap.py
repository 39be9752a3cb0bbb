"""Write-intent bitmap: which coarse regions of a disk may differ from its log.

The agent marks a region durable *before* the first write to it after a cut
(DRBD's activity-log idea).  After a crash, only marked regions can hold
writes the log does not describe, so recovery re-journals just those regions
instead of comparing the whole disk.  See ``docs/write-intent-bitmap.md``.

This module is pure: it keeps the marks and encodes/decodes the on-disk
slots.  The file holds two slots written alternately; each slot carries an
update counter and a CRC, and the reader takes the valid slot with the
highest counter, so a torn slot write falls back to the previous slot (a
subset of the marks the torn write was adding, which never had a write
depend on it, because writes wait for the slot to be durable).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from hvr_common.pure.errors import CorruptError

MAGIC = b"HVR-WIB\n"
VERSION = 1
SLOT_HEADER = struct.Struct("<8sHHIQQQII")  # magic, version, reserved, region_size, disk_size,
#                                              counter, log_sequence, nbytes, crc
assert SLOT_HEADER.size == 48
SLOT_ALIGN = 4096
DEFAULT_REGION_BYTES = 4 * 1024 * 1024
MIN_REGION_BYTES = 64 * 1024
MAX_REGION_BYTES = 1024 * 1024 * 1024


class BitmapCorruptError(CorruptError):
    code = "bitmap_corrupt"


def slot_size(disk_size: int, region_bytes: int) -> int:
    nbytes = (region_count(disk_size, region_bytes) + 7) // 8
    raw = SLOT_HEADER.size + nbytes
    return (raw + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


def region_count(disk_size: int, region_bytes: int) -> int:
    return max(1, (disk_size + region_bytes - 1) // region_bytes)


def validate_region_bytes(region_bytes: int) -> None:
    if region_bytes & (region_bytes - 1) or not MIN_REGION_BYTES <= region_bytes <= MAX_REGION_BYTES:
        raise ValueError(f"region size must be a power of two between {MIN_REGION_BYTES} and "
                         f"{MAX_REGION_BYTES} bytes, not {region_bytes}")


class IntentBitmap:
    """In-memory marks, one byte per region for a fast hot-path test."""

    __slots__ = ("disk_size", "region_bytes", "shift", "marks", "count")

    def __init__(self, disk_size: int, region_bytes: int = DEFAULT_REGION_BYTES):
        validate_region_bytes(region_bytes)
        self.disk_size = disk_size
        self.region_bytes = region_bytes
        self.shift = region_bytes.bit_length() - 1
        self.marks = bytearray(region_count(disk_size, region_bytes))
        self.count = 0

    def unmarked(self, offset: int, length: int) -> list[int]:
        """Regions touched by ``[offset, offset+length)`` that are not marked yet."""
        if length <= 0:
            return []
        first = offset >> self.shift
        last = (offset + length - 1) >> self.shift
        marks = self.marks
        if first == last:
            return [] if marks[first] else [first]
        return [r for r in range(first, last + 1) if not marks[r]]

    def covers(self, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        first = offset >> self.shift
        last = (offset + length - 1) >> self.shift
        if first == last:
            return bool(self.marks[first])
        return all(self.marks[first:last + 1])

    def mark(self, regions) -> None:
        marks = self.marks
        for r in regions:
            if not marks[r]:
                marks[r] = 1
                self.count += 1

    def copy(self) -> "IntentBitmap":
        out = IntentBitmap(self.disk_size, self.region_bytes)
        out.marks[:] = self.marks
        out.count = self.count
        return out

    def marked_regions(self) -> list[int]:
        return [i for i, m in enumerate(self.marks) if m]

    def marked_ranges(self) -> list[tuple[int, int]]:
        """Marked byte ranges ``(offset, length)``, adjacent regions merged, clipped to the disk."""
        ranges: list[tuple[int, int]] = []
        for r in self.marked_regions():
            start = r * self.region_bytes
            end = min(start + self.region_bytes, self.disk_size)
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
            else:
                ranges.append((start, end - start))
        return ranges

    # --- on-disk slots ----------------------------------------------------
    def _packed(self) -> bytes:
        bits = bytearray((len(self.marks) + 7) // 8)
        for i, m in enumerate(self.marks):
            if m:
                bits[i >> 3] |= 1 << (i & 7)
        return bytes(bits)

    def encode_slot(self, counter: int, log_sequence: int) -> bytes:
        bits = self._packed()
        header = SLOT_HEADER.pack(MAGIC, VERSION, 0, self.region_bytes, self.disk_size, counter,
                                  log_sequence, len(bits), 0)
        crc = zlib.crc32(bits, zlib.crc32(header))
        header = header[:-4] + struct.pack("<I", crc)
        raw = header + bits
        return raw + bytes(slot_size(self.disk_size, self.region_bytes) - len(raw))


@dataclass(frozen=True, slots=True)
class BitmapState:
    bitmap: IntentBitmap
    counter: int
    log_sequence: int
    slot: int  # which slot (0 or 1) held it


def _decode_slot(raw: bytes) -> BitmapState | None:
    if len(raw) < SLOT_HEADER.size:
        return None
    magic, version, _res, region_bytes, disk_size, counter, log_sequence, nbytes, crc = \
        SLOT_HEADER.unpack_from(raw, 0)
    if magic != MAGIC or version != VERSION:
        return None
    if len(raw) < SLOT_HEADER.size + nbytes:
        return None
    try:
        validate_region_bytes(region_bytes)
    except ValueError:
        return None
    bits = raw[SLOT_HEADER.size:SLOT_HEADER.size + nbytes]
    header = raw[:SLOT_HEADER.size - 4] + b"\0\0\0\0"
    if zlib.crc32(bits, zlib.crc32(header)) != crc:
        return None
    bm = IntentBitmap(disk_size, region_bytes)
    if nbytes != (len(bm.marks) + 7) // 8:
        return None
    bm.mark(i for i in range(len(bm.marks)) if bits[i >> 3] & (1 << (i & 7)))
    return BitmapState(bm, counter, log_sequence, 0)


def decode_file(raw: bytes, disk_size: int, region_bytes: int) -> BitmapState:
    """Pick the newest valid slot of a bitmap file's contents.

    Raises :class:`BitmapCorruptError` if neither slot is valid or the
    geometry does not match the disk (the caller then treats the whole disk
    as uncertain).
    """
    size = slot_size(disk_size, region_bytes)
    best: BitmapState | None = None
    for idx in (0, 1):
        st = _decode_slot(raw[idx * size:(idx + 1) * size])
        if st is None:
            continue
        if (st.bitmap.disk_size, st.bitmap.region_bytes) != (disk_size, region_bytes):
            continue
        if best is None or st.counter > best.counter:
            best = BitmapState(st.bitmap, st.counter, st.log_sequence, idx)
    if best is None:
        raise BitmapCorruptError("write-intent bitmap has no valid slot",
                                 hint="recovery will treat the whole disk as possibly changed")
    return best
