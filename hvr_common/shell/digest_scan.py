"""Reading an image into its digest tree (``hvr_common.pure.digest_tree``), fast, in one pass.

Holes (SEEK_DATA/SEEK_HOLE) are not read: a chunk wholly inside a hole gets
``zero_digest``.  Data is read in large reads (``READ_BYTES``) into two
reusable buffers, the next read running in a worker thread while this one's
chunks are hashed by two threads (this one and a worker: blake3 releases the
GIL), so the pass costs about one read of the allocated bytes and uses both
cores.  A pass may read only some chunks (``only``): the digests of the
others are given (the agent's digest cache).  Blocking: call it in a worker
thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from hvr_common.pure import byte_ranges as br
from hvr_common.pure import digest_tree as dt
from hvr_common.shell import sparse

READ_BYTES = 8 * 1024 * 1024
Runs = list[tuple[int, int]]


def _data_chunks(fd: int, geometry: dt.Geometry, first: int = 0, end: int | None = None) -> Runs:
    """Runs ``(first, end)`` of chunk indices that hold data (touch a data extent), among chunks ``first`` to
    ``end`` (the whole disk by default): only that span's extent map is asked for."""
    unit = geometry.chunk_size
    start, stop = first * unit, geometry.size if end is None else min(end * unit, geometry.size)
    runs: Runs = []
    for offset, length, is_data in sparse.data_extents(fd, start, max(0, stop - start)):
        if not is_data:
            continue
        first, end = offset // unit, -(-(offset + length) // unit)
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
        else:
            runs.append((first, end))
    return runs


def _reads(runs: Iterable[tuple[int, int]], geometry: dt.Geometry, read_bytes: int = READ_BYTES) -> Runs:
    """The byte ranges to read: the data chunks' runs cut into reads of at most ``read_bytes``."""
    per_read = max(1, read_bytes // geometry.chunk_size) * geometry.chunk_size
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


def _hash(view: memoryview, unit: int, helper: ThreadPoolExecutor | None) -> bytes:
    """The units' digests, the first half hashed by ``helper`` while this thread hashes the second."""
    half = len(view) // 2 // unit * unit
    if helper is None or not half:
        return dt.content_digests(view, unit)
    first = helper.submit(dt.content_digests, view[:half], unit)
    second = dt.content_digests(view[half:], unit)
    return first.result() + second


def _bytes_of(runs: Runs, geometry: dt.Geometry) -> int:
    return br.total(br.clip([(a * geometry.chunk_size, b * geometry.chunk_size) for a, b in runs], geometry.size))


def fill(fd: int, geometry: dt.Geometry, digests: bytearray, only: Runs,
         progress: Callable[[int], None] | None = None, threads: int = 2, read_bytes: int = READ_BYTES) -> None:
    """Put the digests of the chunks of ``only`` (runs of chunk indices) into ``digests``: holes as
    ``zero_digest``, data read (``read_bytes`` at a time, two buffers) and hashed by ``threads`` (1 or 2)
    threads; ``progress(bytes)`` as runs are done (holes included)."""
    for first, end in only:  # holes first; data chunks overwrite theirs below
        for index in range(first, end):
            offset, stop = geometry.node_range(1, index)
            digests[index * dt.DIGEST_SIZE:(index + 1) * dt.DIGEST_SIZE] = dt.zero_digest(stop - offset)
    unit = geometry.chunk_size
    span = (min(a for a, _b in only), max(b for _a, b in only)) if only else (0, 0)
    data = br.intersect([(a * unit, b * unit) for a, b in _data_chunks(fd, geometry, *span)],
                        br.normalise((a * unit, b * unit) for a, b in only))
    reads = _reads([(a // unit, b // unit) for a, b in data], geometry, read_bytes)
    if hasattr(os, "posix_fadvise") and geometry.size and reads:
        os.posix_fadvise(fd, 0, geometry.size, os.POSIX_FADV_SEQUENTIAL)
    done_bytes = _bytes_of(only, geometry) - sum(end - offset for offset, end in reads)
    if progress:
        progress(done_bytes)
    if not reads:
        return
    longest = max(end - offset for offset, end in reads)
    buffers = [bytearray(longest) for _ in range(min(2, len(reads)))]
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as helper:
        pending = reader.submit(_read_into, fd, buffers[0], *reads[0])
        for i, (offset, end) in enumerate(reads):
            view = pending.result()
            if i + 1 < len(reads):
                pending = reader.submit(_read_into, fd, buffers[(i + 1) % 2], *reads[i + 1])
            first = offset // unit
            chunk_digests = _hash(view, unit, helper if threads > 1 else None)
            digests[first * dt.DIGEST_SIZE:first * dt.DIGEST_SIZE + len(chunk_digests)] = chunk_digests
            done_bytes += end - offset
            if progress:
                progress(done_bytes)


def scan(fd: int, geometry: dt.Geometry, progress: Callable[[int], None] | None = None, *,
         only: Runs | None = None, digests: bytearray | None = None) -> dt.DigestTree:
    """The image's tree; ``progress(bytes)`` is called as chunks are done (holes included).  With ``only``
    just those chunk runs are read; ``digests`` holds the others' (and receives the new ones)."""
    digests = bytearray(geometry.count(1) * dt.DIGEST_SIZE) if digests is None else digests
    fill(fd, geometry, digests, [(0, geometry.count(1))] if only is None else only, progress)
    return dt.DigestTree.from_chunk_digests(geometry, bytes(digests))


def block_digests(fd: int, geometry: dt.Geometry, indices: Sequence[int]) -> list[bytes]:
    """Digests of blocks (level 0): each run of consecutive chunks they fall in read once, into one reused
    buffer, and every block of those chunks hashed in place (a chunk's last block may be short)."""
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
        size = dt.DIGEST_SIZE
        for chunk in chunks[i:j]:
            blocks = wanted[chunk]
            if 2 * len(blocks) < per:  # a few blocks of the chunk: each on its own
                for index in blocks:
                    block_offset, block_end = geometry.node_range(0, index)
                    digest_of[index] = dt.content_digest(view[block_offset - offset:block_end - offset])
                continue
            # most or all (the descent asks for all 16 of a differing chunk): every block in one pass
            at = chunk * geometry.chunk_size - offset
            first = chunk * per
            digests = dt.content_digests(view[at:at + geometry.chunk_size], geometry.block_size)
            for index in blocks:
                digest_of[index] = digests[(index - first) * size:(index - first + 1) * size]
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
