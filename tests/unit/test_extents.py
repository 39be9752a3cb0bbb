"""Coalescing (hvr_common.pure.extents) against a byte-by-byte model of replaying in order."""

from __future__ import annotations

import random
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvr_common.pure.extents import Extent, coalesce, total_bytes
from hvr_common.pure.hrl import (
    RECORD_FLAG_FUA,
    RECORD_FLAG_NO_HOLE,
    HrlEncoder,
    HrlHeader,
    Record,
    RecordKind,
)
from hvr_common.pure.hrl_decoder import decode_bytes

W, T, Z = RecordKind.WRITE, RecordKind.TRIM, RecordKind.ZERO


# --- the model ----------------------------------------------------------------------------------

def model(ops, size: int):
    """Per byte, what the last operation touching it left: (kind, source of that byte, flags) or None."""
    cells: list = [None] * size
    for kind, offset, length, source, *rest in ops:
        flags = (rest[0] if rest else 0) & (RECORD_FLAG_NO_HOLE if kind is Z else 0)
        for i in range(length):
            cells[offset + i] = (kind, source + i if kind is W else None, flags)
    return cells


def expand(extents, size: int):
    cells: list = [None] * size
    for e in extents:
        for i in range(e.length):
            assert cells[e.offset + i] is None, "extents overlap"
            cells[e.offset + i] = (e.kind, e.source + i if e.kind is W else None, e.flags)
    return cells


def materialise(extents, base: bytes, source: bytes) -> bytes:
    image = bytearray(base)
    for e in extents:
        if e.kind is W:
            image[e.offset:e.end] = source[e.source:e.source + e.length]
        else:
            image[e.offset:e.end] = bytes(e.length)
    return bytes(image)


def replay_in_order(ops, base: bytes, source: bytes) -> bytes:
    image = bytearray(base)
    for kind, offset, length, src, *_ in ops:
        image[offset:offset + length] = source[src:src + length] if kind is W else bytes(length)
    return bytes(image)


def assert_well_formed(extents):
    for e in extents:
        assert e.length > 0 and e.offset >= 0
        assert (e.source is not None) == (e.kind is W)
    for a, b in zip(extents, extents[1:]):
        assert a.end <= b.offset, "not sorted or overlapping"
        mergeable = (a.end == b.offset and a.kind is b.kind and a.flags == b.flags
                     and (a.kind is not W or a.source + a.length == b.source))
        assert not mergeable, f"{a} and {b} should have been merged"


# --- strategies ---------------------------------------------------------------------------------

@st.composite
def workloads(draw):
    """(ops, disk size, source length): overlapping, misaligned writes/trims/zeroes.

    WRITE sources advance like positions in a log (a record header between
    payloads), or without gaps, which lets neighbouring writes merge.
    """
    size = draw(st.integers(1, 300))
    gap = draw(st.sampled_from([0, 32]))
    ops = []
    source = 0
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from([W, W, T, Z]))
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, size - offset))
        flags = draw(st.sampled_from([0, RECORD_FLAG_FUA, RECORD_FLAG_NO_HOLE, 3] if kind is Z
                                     else [0, RECORD_FLAG_FUA]))
        if kind is W:
            source += gap
            ops.append((kind, offset, length, source, flags))
            source += length
        else:
            ops.append((kind, offset, length, None, flags))
    return ops, size, source


# --- properties ---------------------------------------------------------------------------------

@settings(max_examples=250, deadline=None)
@given(workloads(), st.randoms(use_true_random=False))
def test_coalesce_equals_replaying_in_order(workload, rnd):
    ops, size, source_length = workload
    extents = coalesce(ops)
    assert_well_formed(extents)
    assert expand(extents, size) == model(ops, size)
    base = rnd.randbytes(size)
    source = rnd.randbytes(source_length)
    assert materialise(extents, base, source) == replay_in_order(ops, base, source)
    assert total_bytes(extents) == sum(1 for c in model(ops, size) if c and c[0] is W)


@settings(max_examples=50, deadline=None)
@given(workloads())
def test_coalesce_is_idempotent(workload):
    ops, _, _ = workload
    extents = coalesce(ops)
    again = coalesce([(e.kind, e.offset, e.length, e.source, e.flags) for e in extents])
    assert again == extents


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([W, T, Z]), st.integers(0, 1000), st.integers(1, 64),
                          st.sampled_from([0, 1, 2, 3])), max_size=30),
       st.randoms(use_true_random=False))
def test_coalescing_a_real_log_reads_payloads_from_it(ops, rnd):
    size = 1100
    enc = HrlEncoder(HrlHeader(uuid.uuid4(), uuid.uuid4(), 1, 1, size, 0))
    log = bytearray(enc.header_bytes())
    for kind, offset, length, flags in ops:
        if kind is W:
            data = rnd.randbytes(length)
            log += enc.write(offset, data, flags & RECORD_FLAG_FUA) + data
        elif kind is T:
            log += enc.trim(offset, length, flags & RECORD_FLAG_FUA)
        else:
            log += enc.zero(offset, length, flags)
    log += enc.end(0)
    _, records, _ = decode_bytes(bytes(log))
    extents = coalesce(records)
    base = rnd.randbytes(size)
    image = bytearray(base)
    for r in records:
        image[r.offset:r.offset + r.length] = r.data if r.kind is W else bytes(r.length)
    assert materialise(extents, base, bytes(log)) == bytes(image)
    assert expand(extents, size) == model(
        [(r.kind, r.offset, r.length, r.data_position, r.flags) for r in records], size)


# --- cases --------------------------------------------------------------------------------------

def test_later_write_splits_an_earlier_one_and_adjusts_its_source():
    extents = coalesce([(W, 0, 100, 1000), (Z, 40, 10, None)])
    assert extents == [Extent(0, 40, W, 1000), Extent(40, 10, Z, None), Extent(50, 50, W, 1050)]


def test_later_write_covering_an_earlier_one_removes_it():
    assert coalesce([(W, 10, 5, 0), (T, 0, 100, None)]) == [Extent(0, 100, T, None)]
    assert coalesce([(W, 10, 5, 0), (W, 10, 5, 99)]) == [Extent(10, 5, W, 99)]


def test_equal_offsets_keep_log_order():
    assert coalesce([(W, 0, 8, 0), (W, 0, 4, 50), (W, 0, 2, 90)]) == [
        Extent(0, 2, W, 90), Extent(2, 2, W, 52), Extent(4, 4, W, 4)]


def test_neighbours_merge_only_when_they_continue_each_other():
    assert coalesce([(W, 0, 10, 100), (W, 10, 10, 110)]) == [Extent(0, 20, W, 100)]
    assert coalesce([(W, 0, 10, 100), (W, 10, 10, 142)]) == [Extent(0, 10, W, 100), Extent(10, 10, W, 142)]
    assert coalesce([(T, 0, 10, None), (T, 10, 10, None), (Z, 20, 5, None)]) == [
        Extent(0, 20, T, None), Extent(20, 5, Z, None)]
    assert coalesce([(T, 0, 10, None), (T, 11, 10, None)]) == [Extent(0, 10, T, None), Extent(11, 10, T, None)]


def test_flags_fua_is_dropped_and_no_hole_kept():
    assert coalesce([(Z, 0, 10, None, RECORD_FLAG_FUA | RECORD_FLAG_NO_HOLE), (Z, 10, 10, None, 0),
                     (W, 20, 5, 0, RECORD_FLAG_FUA), (T, 25, 5, None, RECORD_FLAG_FUA)]) == [
        Extent(0, 10, Z, None, RECORD_FLAG_NO_HOLE), Extent(10, 10, Z, None, 0),
        Extent(20, 5, W, 0, 0), Extent(25, 5, T, None, 0)]


def test_records_are_accepted_directly():
    records = [Record(W, 0, 0, 10, 128, 160, None), Record(T, 0, 5, 10, 170, 202, None)]
    assert coalesce(records) == [Extent(0, 5, W, 160), Extent(5, 10, T, None)]
    assert coalesce(iter(records)) == coalesce(records)
    assert coalesce([]) == []


@pytest.mark.parametrize("op, message", [
    ((W, 0, 0, 0), "#0"),
    ((T, 0, -5, None), "#0"),
    ((Z, -1, 5, None), "#0"),
    ((W, 0, 5, None), "WRITE without source"),
    ((RecordKind.END, 0, 5, None), "#0"),
    ((99, 0, 5, None), "#0"),
])
def test_invalid_operations_are_refused(op, message):
    with pytest.raises(ValueError, match=message):
        coalesce([op])


def test_plain_ints_work_as_kinds():
    assert coalesce([(1, 0, 4, 0), (3, 2, 4, None)]) == [Extent(0, 2, W, 0), Extent(2, 4, Z, None)]


def test_total_bytes():
    assert total_bytes([Extent(0, 10, W, 0), Extent(10, 5, T, None), Extent(20, 7, W, 50)]) == 17


# --- scale --------------------------------------------------------------------------------------

def busy_disk_log(count: int, seed: int):
    """A log of a busy 100 GiB disk: random 4 KiB I/O, a hot database region, a
    sequentially appended journal, and some discards; WRITE sources as in a real log."""
    rnd = random.Random(seed).random  # (randrange is too slow for 300k records)
    disk = 100 << 30
    ops = []
    source = 128
    journal = 50 << 30
    for _ in range(count):
        r = rnd()
        if r < 0.45:
            kind, offset, length = W, int(rnd() * (disk >> 12)) << 12, 4096 * (1 + int(rnd() * 4) ** 2)
        elif r < 0.75:
            kind, offset, length = W, (1 << 30) + (int(rnd() * 16384) << 12), 4096
        elif r < 0.9:
            kind, offset, length = W, journal, 512 << int(rnd() * 8)
            journal += length
        elif r < 0.95:
            kind, offset, length = T, int(rnd() * (disk >> 20)) << 20, 1 << 20
        else:
            kind, offset, length = Z, int(rnd() * (disk - 70000)), 1 + int(rnd() * 65536)
        if kind is W:
            ops.append((kind, offset, length, source + 32))
            source += 32 + length
        else:
            ops.append((kind, offset, length, None))
            source += 32
    return ops


def test_300k_records_coalesce_fast():
    ops = busy_disk_log(300_000, seed=7)
    started = time.process_time()  # CPU time: other processes on the machine do not count
    extents = coalesce(ops)
    elapsed_s = time.process_time() - started
    assert_well_formed(extents)
    assert 100_000 < len(extents) < 300_000
    # 1.5 to 2 s of CPU on a slow shared test VM; splicing a flat sorted list would be quadratic
    assert elapsed_s < 5, f"coalescing 300k records took {elapsed_s:.2f} s"
    # exactly the union of all operations is covered ...
    union = []
    for kind, offset, length, _ in sorted(ops, key=lambda op: op[1]):
        if union and offset <= union[-1][1]:
            union[-1][1] = max(union[-1][1], offset + length)
        else:
            union.append([offset, offset + length])
    covered = []
    for e in extents:
        if covered and e.offset == covered[-1][1]:
            covered[-1][1] = e.end
        else:
            covered.append([e.offset, e.end])
    assert covered == union
    # ... and the newest operation survives whole
    kind, offset, length, source = ops[-1]
    index = next(i for i, e in enumerate(extents) if e.end > offset)
    assert extents[index].offset <= offset and extents[index].end >= offset + length
    assert extents[index].kind is kind
    if kind is W:
        assert extents[index].source + (offset - extents[index].offset) == source
