"""Dirty maps of bitmap tracking: which 4 KiB blocks of a disk changed in a cycle.

One bit per block (bit ``b % 8`` of byte ``b // 8``, LSB first), in memory
only: a 1 TiB disk costs 32 MiB.  The write path marks with :meth:`mark`
(one or two byte operations for a small write, slice assignment for long
runs); the cycle builder walks :meth:`runs`, which skips clean stretches a
page at a time.  Maps of one disk merge with :meth:`merge` (an abandoned
cycle's blocks go into the next one).  See docs/bitmap-tracking.md.
"""

from __future__ import annotations

BLOCK_BYTES = 4096
BLOCK_SHIFT = 12
_SCAN_BYTES = 4096  # clean stretches are skipped this many map bytes at a time
_ZERO_SCAN = bytes(_SCAN_BYTES)
_LOW_MASKS = tuple((1 << n) - 1 for n in range(9))  # the n lowest bits of a byte


class DirtyMap:
    """The changed blocks of one disk."""

    __slots__ = ("disk_size", "blocks", "bits")

    def __init__(self, disk_size: int):
        self.disk_size = disk_size
        self.blocks = (disk_size + BLOCK_BYTES - 1) >> BLOCK_SHIFT
        self.bits = bytearray((self.blocks + 7) >> 3)

    def mark(self, offset: int, length: int) -> None:
        """Mark every block that ``[offset, offset + length)`` touches (``length`` > 0)."""
        first = offset >> BLOCK_SHIFT
        last = (offset + length - 1) >> BLOCK_SHIFT
        bits = self.bits
        fb, lb = first >> 3, last >> 3
        if fb == lb:
            bits[fb] |= _LOW_MASKS[(last & 7) + 1] & ~_LOW_MASKS[first & 7] & 0xFF
            return
        bits[fb] |= 0xFF & ~_LOW_MASKS[first & 7]
        if lb > fb + 1:
            bits[fb + 1:lb] = b"\xff" * (lb - fb - 1)
        bits[lb] |= _LOW_MASKS[(last & 7) + 1]

    def any_in(self, offset: int, length: int) -> bool:
        """True if a block that ``[offset, offset + length)`` touches is marked."""
        first = offset >> BLOCK_SHIFT
        last = (offset + length - 1) >> BLOCK_SHIFT
        bits = self.bits
        fb, lb = first >> 3, last >> 3
        if fb == lb:
            return bool(bits[fb] & _LOW_MASKS[(last & 7) + 1] & ~_LOW_MASKS[first & 7])
        if bits[fb] & ~_LOW_MASKS[first & 7] & 0xFF or bits[lb] & _LOW_MASKS[(last & 7) + 1]:
            return True
        return lb > fb + 1 and bits.count(0, fb + 1, lb) != lb - fb - 1

    def is_marked(self, block: int) -> bool:
        return bool(self.bits[block >> 3] >> (block & 7) & 1)

    def merge(self, other: DirtyMap) -> None:
        """Add ``other``'s blocks (a map of the same disk)."""
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        self.bits[:] = merged.to_bytes(len(self.bits), "little")

    def runs(self, offset: int = 0, length: int | None = None):
        """Yield ``(offset, length)`` of each run of marked blocks in a range, clipped to the disk."""
        end = self.disk_size if length is None else min(self.disk_size, offset + length)
        if end <= offset:
            return
        block = offset >> BLOCK_SHIFT
        last = (end - 1) >> BLOCK_SHIFT
        bits = self.bits
        run_start = None
        while block <= last:
            byte = block >> 3
            if run_start is None and not block & 7 and not bits[byte]:
                stop = min(len(bits), byte + _SCAN_BYTES)
                if bits[byte:stop] == _ZERO_SCAN[:stop - byte]:
                    block = stop << 3
                    continue
                while not bits[byte]:
                    byte += 1
                block = byte << 3
                continue
            if bits[byte] >> (block & 7) & 1:
                if run_start is None:
                    run_start = block
            elif run_start is not None:
                yield _clip(run_start, block, offset, end)
                run_start = None
            block += 1
        if run_start is not None:
            yield _clip(run_start, last + 1, offset, end)

    @property
    def count(self) -> int:
        """Marked blocks."""
        return sum(bin(b).count("1") for b in self.bits if b) if len(self.bits) < 65536 else \
            int.from_bytes(self.bits, "little").bit_count()

    def __bool__(self) -> bool:
        return self.bits.count(0) != len(self.bits)


def _clip(first_block: int, stop_block: int, offset: int, end: int) -> tuple[int, int]:
    start = max(first_block << BLOCK_SHIFT, offset)
    stop = min(stop_block << BLOCK_SHIFT, end)
    return start, stop - start
