"""Reading an image into its digest tree (``hvr_common.pure.digest_tree``), fast, in one pass.

Holes (SEEK_DATA/SEEK_HOLE) are not read: a chunk wholly inside a hole gets
``zero_digest``.  Data is read in large reads (``READ_BYTES``) into two
reusable buffers, the next read running in a worker thread while this one's
chunks are hashed (blake3 releases the GIL), so the pass costs about one read
of the allocated bytes.  Blocking: call it in a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from hvr_common.pure import digest_tree as dt
from hvr_common.shell import sparse

READ_BYTES = 8 * 1024 * 1024


def _data_chunks(fd: int, geometry: dt.Geometry) -> list[tuple[int, int]]:
    """Runs ``(first, end)`` of chunk indices that hold data (touch a data extent)."""
    unit = geometry.chunk_size
    runs: list[tuple[int, int]] = []
    for offset, length, is_data in sparse.data_extents(fd, 0, geometry.size):
        if not is_data:
            continue
        first, end = offset // unit, -(-(offset + length) // unit)
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
        else:
            runs.append((first, end))
    return runs


def _reads(runs: Iterable[tuple[int, int]], geometry: dt.Geometry) -> list[tuple[int, int]]:
    """The byte ranges to read: the data chunks' runs cut into reads of at most READ_BYTES."""
    per_read = max(1, READ_BYTES // geometry.chunk_size) * geometry.chunk_size
    reads = []
    for first, end in runs:
        offset, stop = first * geometry.chunk_size, min(end * geometry.chunk_size, geometry.size)
        for pos in range(offset, stop, per_read):
            reads.append((pos, min(stop, pos + per_read)))
    return reads


def _read_into(fd: int, buffer: bytearray, offset: int, end: int) -> memoryview:
    view = memoryview(buffer)[:end - offset]
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:  # the file is shorter than the disk: the rest reads as zeros
            view[done:] = bytes(len(view) - done)
            break
        done += n
    return view


def scan(fd: int, geometry: dt.Geometry, progress: Callable[[int], None] | None = None) -> dt.DigestTree:
    """The image's tree; ``progress(bytes)`` is called as chunks are done (holes included)."""
    count = geometry.count(1)
    digests = bytearray(count * dt.DIGEST_SIZE)
    for index in range(count):  # holes first; data chunks overwrite theirs below
        offset, end = geometry.node_range(1, index)
        digests[index * dt.DIGEST_SIZE:(index + 1) * dt.DIGEST_SIZE] = dt.zero_digest(end - offset)
    reads = _reads(_data_chunks(fd, geometry), geometry)
    if hasattr(os, "posix_fadvise") and geometry.size:
        os.posix_fadvise(fd, 0, geometry.size, os.POSIX_FADV_SEQUENTIAL)
    buffers = [bytearray(READ_BYTES), bytearray(READ_BYTES)]
    done_bytes = geometry.size - sum(end - offset for offset, end in reads)
    if progress:
        progress(done_bytes)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_into, fd, buffers[0], *reads[0]) if reads else None
        for i, (offset, end) in enumerate(reads):
            view = pending.result()
            if i + 1 < len(reads):
                pending = pool.submit(_read_into, fd, buffers[(i + 1) % 2], *reads[i + 1])
            first = offset // geometry.chunk_size
            chunk_digests = dt.content_digests(view, geometry.chunk_size)
            digests[first * dt.DIGEST_SIZE:first * dt.DIGEST_SIZE + len(chunk_digests)] = chunk_digests
            done_bytes += end - offset
            if progress:
                progress(done_bytes)
    return dt.DigestTree.from_chunk_digests(geometry, bytes(digests))


def block_digests(fd: int, geometry: dt.Geometry, indices: Sequence[int]) -> list[bytes]:
    """Digests of blocks (level 0): each run of consecutive chunks they fall in read once, into one reused
    buffer, and hashed in place."""
    per = geometry.blocks_per_chunk
    wanted: dict[int, list[int]] = {}
    for index in indices:
        wanted.setdefault(index // per, []).append(index)
    per_read = max(1, READ_BYTES // geometry.chunk_size)
    buffer = bytearray(min(READ_BYTES, per_read * geometry.chunk_size))
    digest_of: dict[int, bytes] = {}
    chunks = sorted(wanted)
    i = 0
    while i < len(chunks):
        j = i + 1
        while j < len(chunks) and chunks[j] == chunks[j - 1] + 1 and j - i < per_read:
            j += 1
        offset = chunks[i] * geometry.chunk_size
        end = min(chunks[j - 1] * geometry.chunk_size + geometry.chunk_size, geometry.size)
        view = _read_into(fd, buffer, offset, end)
        for chunk in chunks[i:j]:
            for index in wanted[chunk]:
                block_offset, block_end = geometry.node_range(0, index)
                digest_of[index] = dt.content_digest(view[block_offset - offset:block_end - offset])
        i = j
    return [digest_of[index] for index in indices]


def node_digests(fd: int, tree: dt.DigestTree, level: int, indices: Sequence[int]) -> list[bytes]:
    """Digests of any level: blocks read from the image, the rest from the tree."""
    if level == 0:
        count = tree.geometry.count(0)
        if any(not 0 <= i < count for i in indices):
            raise ValueError(f"block outside the disk ({count} blocks)")
        return block_digests(fd, tree.geometry, indices)
    return tree.digests(level, indices)
