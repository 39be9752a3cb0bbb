"""Range arithmetic over byte offsets: sorted, disjoint, non-adjacent ``(offset, end)`` pairs.

The compare engine speaks in ranges: the blocks found different, the ranges a
verify reports, the ranges written since a cut (which a verify skips), the
windows a resync sends.  Every function here takes and returns *normal* range
lists (sorted by offset, no empty range, no two ranges touching or
overlapping), so results can be compared with ``==``.
"""

from __future__ import annotations

from collections.abc import Iterable

Range = tuple[int, int]  # (offset, end), end exclusive


def normalise(ranges: Iterable[Range]) -> list[Range]:
    """Sort and merge overlapping or touching ranges; drop empty ones."""
    out: list[Range] = []
    for offset, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and offset <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((offset, end))
    return out


def union(a: Iterable[Range], b: Iterable[Range]) -> list[Range]:
    return normalise([*a, *b])


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """The bytes of ``a`` not in ``b`` (both normal)."""
    out: list[Range] = []
    j = 0
    for offset, end in a:
        pos = offset
        while j < len(b) and b[j][1] <= pos:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            if b[k][1] > end:
                break
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    """The bytes in both ``a`` and ``b`` (both normal)."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        offset = max(a[i][0], b[j][0])
        end = min(a[i][1], b[j][1])
        if offset < end:
            out.append((offset, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def total(ranges: Iterable[Range]) -> int:
    """The number of bytes the (normal) ranges cover."""
    return sum(end - offset for offset, end in ranges)


def clip(ranges: Iterable[Range], size: int) -> list[Range]:
    """The ranges cut at ``size`` (the disk's end)."""
    return normalise((offset, min(end, size)) for offset, end in ranges if offset < size)


def from_indices(indices: Iterable[int], unit: int, size: int) -> list[Range]:
    """Unit indices (blocks, chunks) as byte ranges, the last unit cut at ``size``."""
    out: list[Range] = []
    for index in sorted(set(indices)):
        offset, end = index * unit, min((index + 1) * unit, size)
        if offset >= end:
            continue
        if out and out[-1][1] == offset:
            out[-1] = (out[-1][0], end)
        else:
            out.append((offset, end))
    return out


def align_out(ranges: Iterable[Range], unit: int, size: int) -> list[Range]:
    """Each range widened to whole units (never past ``size``)."""
    return normalise((offset - offset % unit, min(-(-end // unit) * unit, size)) for offset, end in ranges)


def split(ranges: Iterable[Range], max_length: int) -> list[Range]:
    """Ranges no longer than ``max_length`` (for windows of bounded size)."""
    out: list[Range] = []
    for offset, end in ranges:
        while offset < end:
            out.append((offset, min(end, offset + max_length)))
            offset = out[-1][1]
    return out
