"""The compare engine's digest tree: blake3 digests of a disk, coarse above, 4 KiB blocks below.

Levels (``Geometry``), bottom up:

* level 0: **blocks** of ``block_size`` (4 KiB): ``blake3(block)``, computed on
  demand, only inside chunks found different;
* level 1: **chunks** of ``chunk_size`` (64 KiB): ``blake3(chunk)``, computed in
  the one pass over the disk (large reads, one hash call per chunk);
* level 2 and up: **regions**, each the digest of ``fanout`` (16) children:
  ``blake3(PARENT_PREFIX + child digests)``; the top level has one node.

A node's content digest depends only on its bytes, so a hole (known from
SEEK_DATA/SEEK_HOLE) needs no reading: its digest is ``zero_digest(length)``,
the digest its zeros would have had, and a hole compares equal to written
zeros.  The last block and chunk of a disk may be short; their digests cover
the bytes that exist.  Digests are 32 bytes (full blake3 output), so a guest
cannot craft two different blocks with one digest.

``Descent`` is the comparison, sans I/O: it names the nodes whose digests it
needs (a ``Query``: one level, a batch of indices), is given both sides'
digests for them, and descends only below the nodes that differ, so the
digests exchanged grow with the differences, not with the disk.  It ends with
exactly the blocks whose contents differ.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from hvr_common.pure import byte_ranges
from hvr_common.pure.errors import CorruptError

DIGEST_SIZE = 32
BLOCK_SIZE = 4096
CHUNK_SIZE = 64 * 1024
FANOUT = 16
PARENT_PREFIX = b"hvr-digest-parent\x00"
MAX_QUERY_NODES = 8192  # indices per query: bounds a request and its answer (256 KiB of digests)


def content_digest(data) -> bytes:
    """The digest of a block's or a chunk's bytes."""
    return blake3.blake3(data).digest()


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes: what a hole of that length hashes to, without reading it."""
    return content_digest(bytes(length))


def content_digests(data, unit: int) -> bytes:
    """The digests of ``data`` cut into units (the last may be short), concatenated (``content_digest`` of
    each, inlined: this loop hashes every byte of a compare)."""
    view = memoryview(data)
    hasher = blake3.blake3
    return b"".join([hasher(view[i:i + unit]).digest() for i in range(0, len(view), unit)])


def parent_digest(children: bytes) -> bytes:
    return blake3.blake3(PARENT_PREFIX + children).digest()


def split_digests(data: bytes) -> list[bytes]:
    return [data[i:i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)]


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape of one disk's tree."""

    size: int
    block_size: int = BLOCK_SIZE
    chunk_size: int = CHUNK_SIZE
    fanout: int = FANOUT

    def __post_init__(self) -> None:
        if self.size < 0 or self.block_size <= 0 or self.chunk_size % self.block_size or self.fanout < 2:
            raise ValueError(f"bad digest geometry {self!r}")

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // self.block_size

    def unit(self, level: int) -> int:
        """The bytes one node of ``level`` covers (the last node of a level may cover fewer)."""
        if level == 0:
            return self.block_size
        return self.chunk_size * self.fanout ** (level - 1)

    def count(self, level: int) -> int:
        return -(-self.size // self.unit(level))

    @property
    def top(self) -> int:
        """The top level: the lowest level (at least 1) with at most one node."""
        level = 1
        while self.count(level) > 1:
            level += 1
        return level

    def node_range(self, level: int, index: int) -> tuple[int, int]:
        unit = self.unit(level)
        return index * unit, min((index + 1) * unit, self.size)

    def children(self, level: int, index: int) -> range:
        """The indices, one level down, of a node's children."""
        if level <= 0:
            raise ValueError("blocks have no children")
        per = self.blocks_per_chunk if level == 1 else self.fanout
        return range(index * per, min((index + 1) * per, self.count(level - 1)))

    def nodes_over(self, level: int, offset: int, end: int) -> range:
        """The nodes of ``level`` that cover ``[offset, end)``."""
        unit = self.unit(level)
        return range(offset // unit, min(-(-end // unit), self.count(level)))


class DigestTree:
    """A disk's digests from level 1 (chunks) up; level 0 (blocks) is computed on demand by its reader."""

    def __init__(self, geometry: Geometry, levels: list[bytes]):
        self.geometry = geometry
        self._levels = levels  # _levels[k] holds level k + 1, digests concatenated

    @classmethod
    def from_chunk_digests(cls, geometry: Geometry, chunks: bytes) -> DigestTree:
        if len(chunks) != geometry.count(1) * DIGEST_SIZE:
            raise ValueError(f"{len(chunks) // DIGEST_SIZE} chunk digests for {geometry.count(1)} chunks")
        levels = [chunks]
        step = geometry.fanout * DIGEST_SIZE
        for _level in range(2, geometry.top + 1):
            below = levels[-1]
            levels.append(b"".join(parent_digest(below[i:i + step]) for i in range(0, len(below), step)))
        return cls(geometry, levels)

    def digest(self, level: int, index: int) -> bytes:
        data = self._levels[level - 1]
        return data[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]

    def digests(self, level: int, indices: Sequence[int]) -> list[bytes]:
        if not 1 <= level <= self.geometry.top:
            raise ValueError(f"level {level} outside 1..{self.geometry.top}")
        count = self.geometry.count(level)
        for index in indices:
            if not 0 <= index < count:
                raise ValueError(f"node {index} outside level {level} ({count} nodes)")
        return [self.digest(level, i) for i in indices]

    def chunk_digests(self) -> bytes:
        """Level 1, concatenated: all a tree needs to be rebuilt (``from_chunk_digests``)."""
        return self._levels[0]

    def root(self) -> bytes:
        return self.digest(self.geometry.top, 0) if self.geometry.size else zero_digest(0)


def encode_digests(digests: Sequence[bytes]) -> bytes:
    """Digests on the wire: concatenated, 32 bytes each, in the order asked."""
    return b"".join(digests)


def decode_digests(data: bytes, count: int) -> list[bytes]:
    if len(data) != count * DIGEST_SIZE:
        raise CorruptError(f"a digest answer of {len(data)} bytes for {count} digests of {DIGEST_SIZE} bytes")
    return split_digests(data)


@dataclass(frozen=True, slots=True)
class Query:
    """The digests a descent needs next, of both sides: nodes ``indices`` of ``level``."""

    level: int
    indices: tuple[int, ...]


class Descent:
    """Compare two trees top down, descending only below nodes whose digests differ.

    ``next_query()`` -> a ``Query`` (or None when done); ``answer(query, ours,
    theirs)`` with both sides' digests in the query's order.  Deeper levels are
    asked first, so differing blocks are found (and can be sent) early and the
    pending work stays small.  ``compared_bytes`` counts bytes proven equal or
    found different; it reaches the size of the compared nodes when done.
    """

    def __init__(self, geometry: Geometry, level: int | None = None, indices: Sequence[int] | None = None):
        self.geometry = geometry
        top = geometry.top if level is None else level
        start = list(range(geometry.count(top))) if indices is None else list(indices)
        self._pending: dict[int, list[int]] = {top: start} if start and geometry.size else {}
        self.differing_blocks: list[int] = []
        self.compared_bytes = 0

    def next_query(self) -> Query | None:
        for level in sorted(self._pending):
            waiting = self._pending[level]
            batch, rest = waiting[:MAX_QUERY_NODES], waiting[MAX_QUERY_NODES:]
            if rest:
                self._pending[level] = rest
            else:
                del self._pending[level]
            return Query(level, tuple(batch))
        return None

    def requeue(self, query: Query) -> None:
        """A query that got no answer (the link failed, the compare was suspended): ask it again later."""
        self._pending.setdefault(query.level, [])[:0] = query.indices

    def answer(self, query: Query, ours: Sequence[bytes], theirs: Sequence[bytes]) -> None:
        if len(ours) != len(query.indices) or len(theirs) != len(query.indices):
            raise CorruptError(f"{len(ours)} and {len(theirs)} digests answer a query of {len(query.indices)}")
        geometry = self.geometry
        below: list[int] = []
        for index, mine, other in zip(query.indices, ours, theirs, strict=True):
            offset, end = geometry.node_range(query.level, index)
            if mine == other:
                self.compared_bytes += end - offset
            elif query.level == 0:
                self.differing_blocks.append(index)
                self.compared_bytes += end - offset
            else:
                below.extend(geometry.children(query.level, index))
        if below:
            self._pending.setdefault(query.level - 1, []).extend(below)

    def pending_runs(self, also: Sequence[Query] = ()) -> list[tuple[int, int, int]]:
        """The nodes still to compare (with the queries ``also`` out unanswered) as runs ``(level, first, end)``:
        what a checkpoint records, so a compare continues where it stopped (:meth:`resumed`)."""
        by_level: dict[int, list[int]] = {level: list(indices) for level, indices in self._pending.items()}
        for query in also:
            by_level.setdefault(query.level, []).extend(query.indices)
        runs: list[tuple[int, int, int]] = []
        for level in sorted(by_level, reverse=True):
            for index in sorted(set(by_level[level])):
                if runs and runs[-1][0] == level and runs[-1][2] == index:
                    runs[-1] = (level, runs[-1][1], index + 1)
                else:
                    runs.append((level, index, index + 1))
        return runs

    @classmethod
    def resumed(cls, geometry: Geometry, runs: Sequence[Sequence[int]], compared_bytes: int) -> Descent:
        """A descent continuing from :meth:`pending_runs`; a run outside the tree raises ``CorruptError``."""
        descent = cls(geometry, indices=())
        top = geometry.top
        for run in runs:
            if len(run) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in run):
                raise CorruptError(f"a pending run {run!r} is not (level, first, end)")
            level, first, end = run
            if not 0 <= level <= top or not 0 <= first < end <= geometry.count(level):
                raise CorruptError(f"pending nodes {first}..{end} of level {level} are outside the tree")
            descent._pending.setdefault(level, []).extend(range(first, end))
        if not 0 <= compared_bytes <= geometry.size:
            raise CorruptError(f"{compared_bytes} bytes compared of a disk of {geometry.size}")
        descent.compared_bytes = compared_bytes
        return descent

    def reopen(self, blocks: Sequence[int]) -> None:
        """Blocks found different whose difference was not acted on: ask them again later."""
        taken = set(blocks)
        self.differing_blocks = [b for b in self.differing_blocks if b not in taken]
        self.compared_bytes -= sum(end - offset for offset, end in map(self._block_range, taken))
        self._pending.setdefault(0, [])[:0] = sorted(taken)

    def _block_range(self, index: int) -> tuple[int, int]:
        return self.geometry.node_range(0, index)

    @property
    def done(self) -> bool:
        return not self._pending

    def differing_ranges(self) -> list[byte_ranges.Range]:
        return byte_ranges.from_indices(self.differing_blocks, self.geometry.block_size, self.geometry.size)


def tree_of_bytes(geometry: Geometry, data) -> DigestTree:
    """The tree of an image held in memory (tests, small images)."""
    return DigestTree.from_chunk_digests(geometry, content_digests(data, geometry.chunk_size))


def node_digests_of_bytes(geometry: Geometry, data, level: int, indices: Sequence[int],
                          tree: DigestTree | None = None) -> list[bytes]:
    """Digests of nodes of an in-memory image: blocks hashed from ``data``, higher levels from ``tree``."""
    if level == 0:
        view = memoryview(data)
        return [content_digest(view[slice(*geometry.node_range(0, i))]) for i in indices]
    return (tree or tree_of_bytes(geometry, data)).digests(level, indices)
