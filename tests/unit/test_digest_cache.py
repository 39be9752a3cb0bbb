"""The agent's digest cache (hvr_common.pure.digest_cache): when a cached chunk digest is still its chunk's.

The model: each chunk of a disk holds a version number, bumped by every write;
a digest is the version it was read at.  The intent bitmap file is modelled
as the agent does it: a write to a region not marked in the period marks it
(period and cache), a write to a marked one does not (the fast path), a cut
starts an empty period, an abandoned cycle's regions join the period.  Passes
start, read their chunks at random moments while writes go on, and end.  The
property (C7): every chunk the cache calls fresh holds the version its digest
was taken of.
"""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvr_common.pure import digest_tree as dt
from hvr_common.pure.digest_cache import DigestCache, DigestCacheError, ImageIdentity
from hvr_common.pure.intent_bitmap import IntentBitmap

CHUNK = dt.CHUNK_SIZE
REGION = 2 * CHUNK


def _digest(version: int) -> bytes:
    return version.to_bytes(dt.DIGEST_SIZE, "little")


class Model:
    def __init__(self, chunks: int):
        self.geometry = dt.Geometry(chunks * CHUNK)
        self.cache = DigestCache(self.geometry, REGION)
        self.period = IntentBitmap(self.geometry.size, REGION)
        self.version = [0] * chunks
        self.passes: list = []

    def mark(self, regions: list[int]) -> None:
        self.period.mark(regions)
        self.cache.note_marks(regions)

    def write(self, chunk: int) -> None:
        region = chunk * CHUNK // REGION
        if not self.period.marks[region]:
            self.mark([region])
        self.version[chunk] += 1

    def read(self, p, chunk: int) -> None:
        p.digests[chunk * dt.DIGEST_SIZE:(chunk + 1) * dt.DIGEST_SIZE] = _digest(self.version[chunk])

    def check(self) -> None:
        fresh = self.cache.fresh()
        for chunk, is_fresh in enumerate(fresh):
            if is_fresh:
                got = self.cache.digests[chunk * dt.DIGEST_SIZE:(chunk + 1) * dt.DIGEST_SIZE]
                assert got == _digest(self.version[chunk]), f"chunk {chunk} is fresh but was written since"


OPS = st.lists(st.tuples(st.sampled_from(["write", "write", "write", "cut", "carry", "ahead", "begin", "begin_new",
                                          "read", "finish", "abandon", "forget"]),
                         st.integers(0, 1 << 30)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(chunks=st.integers(1, 24), ops=OPS)
def test_a_chunk_called_fresh_was_never_written_since_its_digest_was_taken(chunks, ops):
    m = Model(chunks)
    regions = len(m.period.marks)
    for op, arg in ops:
        rnd = random.Random(arg)
        if op == "write":
            m.write(arg % chunks)
        elif op == "cut":
            m.period = IntentBitmap(m.geometry.size, REGION)
        elif op in ("carry", "ahead"):  # an abandoned cycle's regions, or marks ahead of a stream
            m.mark(rnd.sample(range(regions), rnd.randint(1, regions)))
        elif op in ("begin", "begin_new"):
            p = m.cache.begin(m.period, reuse=op == "begin")
            for first, end in p.to_read:  # the fresh ones are known and current at the start
                assert not any(p.known[first:end])
            for chunk in range(chunks):
                if p.known[chunk]:
                    assert p.digests[chunk * dt.DIGEST_SIZE:(chunk + 1) * dt.DIGEST_SIZE] == _digest(m.version[chunk])
            m.passes.append((p, [c for a, b in p.to_read for c in range(a, b)]))
        elif op == "read" and m.passes:
            p, left = m.passes[arg % len(m.passes)]
            if left:
                m.read(p, left.pop(rnd.randrange(len(left))))
        elif op == "finish" and m.passes:
            p, left = m.passes.pop(arg % len(m.passes))
            for chunk in left:
                m.read(p, chunk)
            p.read_all()
            m.cache.finish(p)
        elif op == "abandon" and m.passes:
            p, _left = m.passes.pop(arg % len(m.passes))
            m.cache.end(p)
        elif op == "forget":
            m.cache.forget()
        m.check()


def test_a_pass_reads_only_chunks_whose_region_was_written_or_never_hashed():
    m = Model(8)  # 4 regions of 2 chunks
    p = m.cache.begin(m.period)
    assert p.to_read == [(0, 8)]
    for chunk in range(8):
        m.read(p, chunk)
    p.read_all()
    m.cache.finish(p)
    m.write(5)  # region 2
    m.period = IntentBitmap(m.geometry.size, REGION)  # a cut: region 2 still counts as written for the cache
    p = m.cache.begin(m.period)
    assert p.to_read == [(4, 6)]
    m.cache.finish(p)  # ended before it read them: chunks 4 and 5 are not known, the rest still fresh
    assert m.cache.fresh_bytes() == 6 * CHUNK


def test_a_region_marked_in_the_period_when_a_pass_starts_stays_written_for_the_next():
    m = Model(4)
    m.write(0)  # region 0 marked in the period: later writes to it are not marked again
    p = m.cache.begin(m.period)
    for chunk in range(4):
        m.read(p, chunk)
    p.read_all()
    m.cache.finish(p)
    m.write(1)  # the fast path: region 0 is in the period, no mark
    assert m.cache.fresh()[:2] == bytearray(2)
    m.check()


def test_a_forgotten_cache_keeps_nothing_of_the_passes_running():
    m = Model(4)
    p = m.cache.begin(m.period)
    m.cache.forget()
    p.read_all()
    m.cache.finish(p)
    assert not any(m.cache.fresh())


def _full_cache(chunks: int = 6) -> DigestCache:
    m = Model(chunks)
    p = m.cache.begin(m.period)
    for chunk in range(chunks):
        m.read(p, chunk)
    p.read_all()
    m.cache.finish(p)
    m.write(chunks // 2)
    return m.cache


VM, DISK = uuid.uuid4(), uuid.uuid4()
IDENTITY = ImageIdentity(6 * CHUNK, 123, 456, 7, 8)


def test_the_file_round_trips():
    cache = _full_cache()
    raw = cache.encode(VM, DISK, IDENTITY)
    back = DigestCache.decode(raw, cache.geometry, REGION, VM, DISK, IDENTITY)
    assert back.digests == cache.digests and back.known == cache.known
    assert back.written.marked_regions() == cache.written.marked_regions() == [1]
    assert back.fresh() == cache.fresh()


@pytest.mark.parametrize("change", ["vm", "disk", "identity", "geometry", "region"])
def test_a_file_for_another_vm_disk_image_or_geometry_is_refused(change):
    cache = _full_cache()
    raw = cache.encode(VM, DISK, IDENTITY)
    args = dict(geometry=cache.geometry, region_bytes=REGION, vm_id=VM, disk_id=DISK, identity=IDENTITY)
    if change == "vm":
        args["vm_id"] = uuid.uuid4()
    elif change == "disk":
        args["disk_id"] = uuid.uuid4()
    elif change == "identity":
        args["identity"] = ImageIdentity(6 * CHUNK, 124, 456, 7, 8)
    elif change == "geometry":
        args["geometry"] = dt.Geometry(7 * CHUNK)
    else:
        args["region_bytes"] = 4 * CHUNK
    with pytest.raises(DigestCacheError):
        DigestCache.decode(raw, **args)


def test_every_flipped_byte_and_every_truncation_is_refused():
    cache = _full_cache(3)
    raw = cache.encode(VM, DISK, IDENTITY)
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        with pytest.raises(DigestCacheError):
            DigestCache.decode(bytes(flipped), cache.geometry, REGION, VM, DISK, IDENTITY)
    for n in range(len(raw)):
        with pytest.raises(DigestCacheError):
            DigestCache.decode(raw[:n], cache.geometry, REGION, VM, DISK, IDENTITY)


def test_fresh_bytes_counts_a_short_last_chunk_by_its_length():
    size = 3 * dt.CHUNK_SIZE + 100  # four chunks, the last 100 bytes long; one 4 MiB region
    cache = DigestCache(dt.Geometry(size), 4 * 1024 * 1024)
    cache.known[:] = b"\x01\x00\x01\x01"
    assert cache.fresh() == bytearray(b"\x01\x00\x01\x01")
    assert cache.fresh_bytes() == dt.CHUNK_SIZE + dt.CHUNK_SIZE + 100
    cache.note_marks([0])
    assert cache.fresh_bytes() == 0 and not any(cache.fresh())
