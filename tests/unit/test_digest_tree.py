"""The compare engine (hvr_common.pure.digest_tree, byte_ranges) and its image reader (shell.digest_scan).

The model: two images in memory; the blocks that differ are found by comparing
them byte by byte.  The descent must find exactly those blocks, whatever the
geometry, and never ask for a node below one that was equal.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvr_common.pure import byte_ranges as br
from hvr_common.pure import digest_tree as dt
from hvr_common.pure.errors import CorruptError
from hvr_common.shell import digest_scan

SMALL = dict(block_size=16, chunk_size=64, fanout=2)  # tiny geometry: deep trees from small images


def differing_blocks_model(a: bytes, b: bytes, block: int) -> list[int]:
    return [i for i in range(-(-len(a) // block)) if a[i * block:(i + 1) * block] != b[i * block:(i + 1) * block]]


def run_descent(geometry, a: bytes, b: bytes, descent=None):
    tree_a, tree_b = dt.tree_of_bytes(geometry, a), dt.tree_of_bytes(geometry, b)
    descent = descent or dt.Descent(geometry)
    asked: list[dt.Query] = []
    while (query := descent.next_query()) is not None:
        asked.append(query)
        descent.answer(query, dt.node_digests_of_bytes(geometry, a, query.level, query.indices, tree_a),
                       dt.node_digests_of_bytes(geometry, b, query.level, query.indices, tree_b))
    return descent, asked


@st.composite
def image_pairs(draw):
    fanout = draw(st.integers(2, 5))
    blocks_per_chunk = draw(st.integers(1, 4))
    block = draw(st.sampled_from([1, 4, 16]))
    geometry_args = dict(block_size=block, chunk_size=block * blocks_per_chunk, fanout=fanout)
    size = draw(st.integers(0, 600))
    a = draw(st.binary(min_size=size, max_size=size))
    b = bytearray(a)
    for pos in draw(st.lists(st.integers(0, max(size - 1, 0)), max_size=12)) if size else []:
        b[pos] = draw(st.integers(0, 255))
    return dt.Geometry(size, **geometry_args), a, bytes(b)


@settings(max_examples=300, deadline=None)
@given(image_pairs())
def test_descent_finds_exactly_the_differing_blocks(pair):
    geometry, a, b = pair
    descent, asked = run_descent(geometry, a, b)
    assert descent.done
    assert sorted(descent.differing_blocks) == differing_blocks_model(a, b, geometry.block_size)
    assert descent.compared_bytes == geometry.size
    assert descent.differing_ranges() == br.from_indices(
        differing_blocks_model(a, b, geometry.block_size), geometry.block_size, geometry.size)
    # never below an equal node: every node asked has a parent that differed (or is the top)
    tree_a, tree_b = dt.tree_of_bytes(geometry, a), dt.tree_of_bytes(geometry, b)
    for query in asked:
        if query.level == geometry.top:
            continue
        for index in query.indices:
            parent = next(p for p in range(geometry.count(query.level + 1))
                          if index in geometry.children(query.level + 1, p))
            assert tree_a.digest(query.level + 1, parent) != tree_b.digest(query.level + 1, parent)


def test_identical_images_need_one_question():
    geometry = dt.Geometry(1 << 20, **SMALL)
    data = random.Random(1).randbytes(1 << 20)
    descent, asked = run_descent(geometry, data, data)
    assert len(asked) == 1 and asked[0].level == geometry.top and descent.differing_blocks == []


def test_digest_traffic_grows_with_the_differences_not_the_disk():
    geometry = dt.Geometry(64 << 20)
    a = bytearray(64 << 20)
    b = bytearray(a)
    b[12345678] = 1
    descent, asked = run_descent(geometry, bytes(a), bytes(b))
    assert descent.differing_ranges() == [(12345678 // 4096 * 4096, 12345678 // 4096 * 4096 + 4096)]
    assert sum(len(q.indices) for q in asked) <= geometry.top * geometry.fanout + 1


def test_a_hole_digest_equals_its_zeros():
    assert dt.zero_digest(4096) == dt.content_digest(bytes(4096))
    assert dt.zero_digest(100) != dt.zero_digest(101)


def test_descent_over_a_subset_and_decoding():
    geometry = dt.Geometry(10 * 4096, block_size=4096, chunk_size=8192, fanout=2)
    a, b = bytes(10 * 4096), bytearray(10 * 4096)
    b[0] = b[9 * 4096] = 7
    descent, _ = run_descent(geometry, a, bytes(b), dt.Descent(geometry, 1, [4]))  # chunk 4: blocks 8, 9
    assert descent.differing_blocks == [9] and descent.compared_bytes == 8192
    assert dt.decode_digests(dt.encode_digests([b"x" * 32, b"y" * 32]), 2) == [b"x" * 32, b"y" * 32]
    with pytest.raises(CorruptError):
        dt.decode_digests(b"x" * 33, 1)
    with pytest.raises(CorruptError):
        dt.Descent(geometry).answer(dt.Query(geometry.top, (0,)), [], [])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=8),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=8))
def test_range_arithmetic_against_sets(raw_a, raw_b):
    a = br.normalise((o, o + n) for o, n in raw_a)
    b = br.normalise((o, o + n) for o, n in raw_b)
    set_a = {x for o, e in a for x in range(o, e)}
    set_b = {x for o, e in b for x in range(o, e)}

    def as_set(ranges):
        return {x for o, e in ranges for x in range(o, e)}

    assert as_set(br.subtract(a, b)) == set_a - set_b
    assert as_set(br.intersect(a, b)) == set_a & set_b
    assert as_set(br.union(a, b)) == set_a | set_b
    assert br.total(a) == len(set_a)
    for result in (br.subtract(a, b), br.intersect(a, b), br.union(a, b)):
        assert result == br.normalise(result)
    assert as_set(br.split(a, 7)) == set_a and all(e - o <= 7 for o, e in br.split(a, 7))
    assert as_set(br.clip(a, 100)) == {x for x in set_a if x < 100}
    aligned = as_set(br.align_out(a, 16, 230))
    assert {x for x in set_a if x < 230} <= aligned and all(x < 230 for x in aligned)


# --- the reader: a sparse file hashes like its bytes ----------------------------------------------

def write_sparse(path, size: int, writes: list[tuple[int, bytes]]) -> bytes:
    image = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            data = data[:size - offset]
            f.seek(offset)
            f.write(data)
            image[offset:offset + len(data)] = data
    return bytes(image)


@pytest.mark.parametrize("size", [0, 4096, 3 * 65536 + 1000, 40 << 20])
def test_scan_of_a_sparse_file_equals_the_tree_of_its_bytes(tmp_path, size, monkeypatch):
    monkeypatch.setattr(digest_scan, "READ_BYTES", 1 << 20)  # several reads even for small files
    rng = random.Random(size)
    writes = [(rng.randrange(max(size - 5000, 1)), rng.randbytes(rng.randrange(1, 5000))) for _ in range(20)] \
        if size else []
    writes += [(0, bytes(4096))] if size else []  # explicit zeros: must equal a hole
    image = write_sparse(tmp_path / "disk.img", size, writes)
    geometry = dt.Geometry(size)
    seen = []
    fd = os.open(tmp_path / "disk.img", os.O_RDONLY)
    try:
        tree = digest_scan.scan(fd, geometry, seen.append)
        expected = dt.tree_of_bytes(geometry, image)
        assert tree.root() == expected.root()
        for level in range(1, geometry.top + 1):
            indices = range(geometry.count(level))
            assert tree.digests(level, indices) == expected.digests(level, indices)
        blocks = list(range(0, geometry.count(0), 7))
        assert digest_scan.node_digests(fd, tree, 0, blocks) == dt.node_digests_of_bytes(geometry, image, 0, blocks)
    finally:
        os.close(fd)
    assert seen[-1] == size if size else seen == [0]


# --- a compare continued from a checkpoint (pending_runs / resumed / reopen) -------------------------

@settings(max_examples=200, deadline=None)
@given(image_pairs(), st.integers(0, 30), st.integers(0, 2))
def test_a_descent_stopped_anywhere_and_resumed_finds_exactly_the_differing_blocks(pair, stop_after, out):
    geometry, a, b = pair
    tree_a, tree_b = dt.tree_of_bytes(geometry, a), dt.tree_of_bytes(geometry, b)

    def digests(data, tree, query):
        return dt.node_digests_of_bytes(geometry, data, query.level, query.indices, tree)

    first = dt.Descent(geometry)
    for _ in range(stop_after):
        if (query := first.next_query()) is None:
            break
        first.answer(query, digests(a, tree_a, query), digests(b, tree_b, query))
    unanswered = [q for q in (first.next_query() for _ in range(out)) if q is not None]  # out when it stopped
    runs = first.pending_runs(unanswered)
    second = dt.Descent.resumed(geometry, [list(r) for r in runs], first.compared_bytes)
    finished, _ = run_descent(geometry, a, b, second)
    assert finished.compared_bytes == geometry.size
    assert sorted(first.differing_blocks + finished.differing_blocks) == \
        differing_blocks_model(a, b, geometry.block_size)


def test_a_checkpoint_outside_the_tree_is_refused():
    geometry = dt.Geometry(10 * 4096, block_size=4096, chunk_size=8192, fanout=2)
    for runs, compared in (([[0, 9, 11]], 0), ([[geometry.top + 1, 0, 1]], 0), ([[1, 2]], 0), ([[0, 3, 3]], 0),
                           ([], geometry.size + 1), ([[0, True, 2]], 0)):
        with pytest.raises(CorruptError):
            dt.Descent.resumed(geometry, runs, compared)


def test_blocks_found_but_not_acted_on_are_asked_again():
    geometry = dt.Geometry(4 * 4096, block_size=4096, chunk_size=8192, fanout=2)
    a, b = bytes(4 * 4096), bytearray(4 * 4096)
    b[4096] = b[3 * 4096] = 1
    descent, _ = run_descent(geometry, a, bytes(b))
    assert descent.differing_blocks == [1, 3] and descent.compared_bytes == geometry.size
    descent.reopen([3])
    assert descent.differing_blocks == [1] and descent.compared_bytes == geometry.size - 4096
    assert descent.next_query() == dt.Query(0, (3,))


def test_fill_of_some_chunks_asks_only_their_span_of_the_extent_map(tmp_path, monkeypatch):
    """The initial copy fills each window's chunks: the whole disk's extent map per window would grow
    with the disk for every window."""
    geometry = dt.Geometry(64 * dt.CHUNK_SIZE)
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(geometry.size)
        f.seek(5 * dt.CHUNK_SIZE)
        f.write(os.urandom(dt.CHUNK_SIZE))  # chunk 5 holds data
        f.seek(40 * dt.CHUNK_SIZE)
        f.write(os.urandom(100))  # and part of chunk 40
    asked, real = [], digest_scan.sparse.data_extents
    monkeypatch.setattr(digest_scan.sparse, "data_extents",
                        lambda fd, offset, length: asked.append((offset, length)) or real(fd, offset, length))
    image = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        digests = bytearray(geometry.count(1) * dt.DIGEST_SIZE)
        digest_scan.fill(fd, geometry, digests, [(4, 8)], threads=1)
    finally:
        os.close(fd)
    assert asked == [(4 * dt.CHUNK_SIZE, 4 * dt.CHUNK_SIZE)]
    for index in range(4, 8):
        chunk = image[index * dt.CHUNK_SIZE:(index + 1) * dt.CHUNK_SIZE]
        assert digests[index * dt.DIGEST_SIZE:(index + 1) * dt.DIGEST_SIZE] == dt.content_digest(chunk)
