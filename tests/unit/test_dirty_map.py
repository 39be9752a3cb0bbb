"""Dirty maps and copy-before-write snapshots of bitmap tracking, against simple models."""

from __future__ import annotations

import os
import random

import pytest

from hvr_common.pure.dirty_map import BLOCK_BYTES, DirtyMap
from hvr_agent.cut_snapshot import CutSnapshot, SnapshotAbandoned
from hvr_agent.dirty_tracking import DirtyTracking
from hvr_agent.intent import IntentBitmapFile
from hvr_common.pure import digest_tree as dt
from hvr_common.pure.digest_cache import DigestCache
from hvr_common.pure.intent_bitmap import IntentBitmap


def blocks_of(offset: int, length: int) -> set[int]:
    return set(range(offset // BLOCK_BYTES, (offset + length - 1) // BLOCK_BYTES + 1))


@pytest.mark.parametrize("seed", range(40))
def test_marks_runs_and_counts_match_a_set_of_blocks(seed):
    rng = random.Random(seed)
    size = rng.randint(1, 6 << 20)
    dirty, model = DirtyMap(size), set()
    for _ in range(rng.randint(0, 30)):
        offset = rng.randrange(size)
        length = rng.randint(1, min(size - offset, 700_000))
        dirty.mark(offset, length)
        model |= blocks_of(offset, length)
    runs = list(dirty.runs())
    assert set().union(*[blocks_of(o, n) for o, n in runs]) == model if runs else not model
    assert all(o + n <= size for o, n in runs) and runs == sorted(runs)
    assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:])), "runs must not touch"
    assert dirty.count == len(model) and bool(dirty) == bool(model)
    for _ in range(30):
        offset = rng.randrange(size)
        length = rng.randint(1, min(size - offset, 700_000))
        assert dirty.any_in(offset, length) == bool(model & blocks_of(offset, length))
    other = DirtyMap(size)
    other.mark(0, 1)
    dirty.merge(other)
    assert dirty.is_marked(0) and dirty.count == len(model | {0})


def test_runs_of_a_range_are_clipped_to_it():
    dirty = DirtyMap(1 << 20)
    dirty.mark(0, 1 << 20)
    assert list(dirty.runs(5000, 10000)) == [(5000, 10000)]
    assert list(dirty.runs((1 << 20) - 10, 100)) == [((1 << 20) - 10, 10)]


def _image(tmp_path, size: int, seed: int) -> tuple[int, bytearray]:
    data = bytearray(random.Random(seed).randbytes(size))
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return os.open(path, os.O_RDWR), data


@pytest.mark.parametrize("seed", range(12))
def test_a_snapshot_reads_cut_time_contents_whatever_is_written_meanwhile(tmp_path, seed):
    """Changes (before_change, then the image write) interleaved with the build's reads: every
    frozen block reads as it was at the cut, and reads so again after more changes (copy-before-write
    stays armed after a read, until the cycle is acknowledged: a re-sent cycle is the same bytes)."""
    rng = random.Random(seed)
    size = 3 << 20
    fd, at_cut = _image(tmp_path, size, seed)
    frozen = DirtyMap(size)
    for _ in range(20):
        offset = rng.randrange(size)
        frozen.mark(offset, rng.randint(1, min(size - offset, 200_000)))
    snap = CutSnapshot(7, frozen, fd, tmp_path / "disk.img.0000000007.cbw", 0)
    try:
        runs = list(snap.runs())
        got = {}
        pieces = [(o + d, min(65536, n - d)) for o, n in runs for d in range(0, n, 65536)]
        rng.shuffle(pieces)
        for offset, length in pieces:
            for _ in range(rng.randint(0, 3)):  # the guest writes anywhere meanwhile
                w_off = rng.randrange(size)
                w_len = rng.randint(1, min(size - w_off, 100_000))
                snap.before_change(w_off, w_len)
                os.pwrite(fd, rng.randbytes(w_len), w_off)
            got[offset] = snap.read_range(offset, length)
        for offset, length in pieces:
            assert got[offset] == bytes(at_cut[offset:offset + length]), f"block at {offset} is not its cut-time contents"
        assert snap.copied_bytes <= frozen.count * BLOCK_BYTES
        snap.before_change(0, size)  # every block read, still copied before it changes
        os.pwrite(fd, bytes(size), 0)
        assert snap.copied_bytes <= frozen.count * BLOCK_BYTES
        for offset, length in pieces:
            assert snap.read_range(offset, length) == bytes(at_cut[offset:offset + length]), \
                f"block at {offset} read again is not its cut-time contents"
        before = snap.copied_bytes
        snap.before_change(0, size)  # every block copied: nothing more to copy
        assert snap.copied_bytes == before
    finally:
        snap.close()
        os.close(fd)
    assert not (tmp_path / "disk.img.0000000007.cbw").exists()


def test_abandoned_cycles_merge_into_the_current_one_and_their_regions_stay(tmp_path):
    size = 8 << 20
    fd, _ = _image(tmp_path, size, 1)
    tracking = DirtyTracking(size, fd, tmp_path / "disk.img")
    try:
        region = 1 << 20
        period = IntentBitmap(size, region)
        period.mark([1])
        tracking.current.mark(region + 5, 10)
        tracking.freeze(4, period)
        new_period = IntentBitmap(size, region)
        new_period.mark([6])
        tracking.current.mark(6 * region, 4096)
        tracking.freeze(5, new_period)
        intent = IntentBitmapFile(tmp_path / "disk.img.wib", size, region)
        intent.digests = DigestCache(dt.Geometry(size), region)
        assert tracking.abandon_from(4, intent) == [4, 5]
        assert not tracking.snapshots and not tracking.frozen
        assert [o // BLOCK_BYTES for o, _ in tracking.current.runs()] == [region // BLOCK_BYTES, 6 * region // BLOCK_BYTES]
        assert intent.period.marked_regions() == [1, 6]
        # the fast path takes writes to them unmarked from now on: the digest cache counts them as written
        assert intent.digests.written.marked_regions() == [1, 6]
        # acknowledging the (empty) stand-ins keeps the regions: the current cycle carries the blocks
        assert tracking.acknowledged(5).marked_regions() == [1, 6]
        tracking.freeze(6, IntentBitmap(size, region))
        assert tracking.cycle_regions[6].marked_regions() == [1, 6]
        assert tracking.acknowledged(6) is None
    finally:
        tracking.close()
        os.close(fd)


def test_pending_bytes_are_the_dirty_blocks_of_every_cycle_not_yet_acknowledged(tmp_path):
    size = 8 << 20
    fd, _ = _image(tmp_path, size, 3)
    tracking = DirtyTracking(size, fd, tmp_path / "disk.img")
    try:
        region = 1 << 20
        assert tracking.pending_bytes() == 0
        tracking.current.mark(100, 5000)  # blocks 0 and 1
        tracking.freeze(4, IntentBitmap(size, region))
        tracking.current.mark(0, 3 * BLOCK_BYTES)  # blocks 0-2: shipped again by cycle 5
        assert tracking.pending_bytes() == 5 * BLOCK_BYTES
        tracking.acknowledged(4)
        assert tracking.pending_bytes() == 3 * BLOCK_BYTES
        tracking.freeze(5, IntentBitmap(size, region))
        tracking.abandon_from(5, IntentBitmapFile(tmp_path / "disk.img.wib", size, region))  # merged back into the current cycle
        assert tracking.pending_bytes() == 3 * BLOCK_BYTES
    finally:
        tracking.close()
        os.close(fd)


def test_a_snapshot_past_its_budget_stops_copying_and_its_build_is_abandoned(tmp_path):
    size = 1 << 20
    fd, at_cut = _image(tmp_path, size, 2)
    frozen = DirtyMap(size)
    frozen.mark(0, size)
    side = tmp_path / "disk.img.0000000003.cbw"
    snap = CutSnapshot(3, frozen, fd, side, 0, budget_bytes=3 * BLOCK_BYTES)
    try:
        assert snap.read_range(0, BLOCK_BYTES) == bytes(at_cut[:BLOCK_BYTES])  # read before the budget trips
        snap.before_change(BLOCK_BYTES, 2 * BLOCK_BYTES)
        assert snap.copied_bytes == 2 * BLOCK_BYTES and side.exists() and snap.gave_up is None
        snap.before_change(8 * BLOCK_BYTES, 2 * BLOCK_BYTES)
        assert snap.gave_up and "budget" in snap.gave_up and not side.exists()
        before = snap.copied_bytes
        snap.before_change(20 * BLOCK_BYTES, BLOCK_BYTES)
        assert snap.copied_bytes == before  # no more copies
        with pytest.raises(SnapshotAbandoned, match="budget"):
            snap.read_range(BLOCK_BYTES, BLOCK_BYTES)
    finally:
        snap.close()
        os.close(fd)


def test_a_snapshot_past_its_time_bound_stops_copying(tmp_path):
    size = 64 * 1024
    fd, _ = _image(tmp_path, size, 3)
    frozen = DirtyMap(size)
    frozen.mark(0, size)
    snap = CutSnapshot(3, frozen, fd, tmp_path / "disk.img.0000000003.cbw", 0, max_age_s=-1)
    try:
        assert snap.before_change(0, 4096) == 0 and "time bound" in snap.gave_up
        with pytest.raises(SnapshotAbandoned):
            snap.read_range(0, 4096)
    finally:
        snap.close()
        os.close(fd)
