"""The initial-replication media manifest (hvr_common.pure.media_manifest): round trip, digests, the chunk grid."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvr_common.pure import media_manifest as mm
from hvr_common.pure.errors import HvrError

CHUNK = 1 << 20


def manifest(**changes) -> mm.Manifest:
    disk = mm.MediaDisk(uuid.UUID(int=7), "sys", 5 * CHUNK + 4096,
                        (mm.Chunk(0, CHUNK, mm.digest(b"a")), mm.Chunk(3 * CHUNK, CHUNK, mm.digest(b"b")),
                         mm.Chunk(5 * CHUNK, 4096, mm.digest(b"c"))))
    fields = dict(vm_id=uuid.UUID(int=1), vm_name="web", generation=2, base_sequence=41, created_ns=10**18,
                  chunk_bytes=CHUNK, disks=(disk,))
    fields.update(changes)
    return mm.Manifest(**fields)


def test_round_trip():
    m = manifest()
    assert mm.Manifest.decode(m.encode()) == m
    assert m.data_bytes == 2 * CHUNK + 4096


def test_every_flipped_byte_is_refused_or_changes_nothing():
    raw = manifest().encode()
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        try:
            decoded = mm.Manifest.decode(bytes(bad))
        except HvrError:
            continue
        assert decoded == manifest(), f"byte {i} changed the manifest undetected"


def test_a_changed_field_with_the_old_digest_is_refused():
    import json
    doc = json.loads(manifest().encode())
    doc["base_sequence"] = 40
    with pytest.raises(HvrError) as info:
        mm.Manifest.decode(json.dumps(doc).encode())
    assert info.value.code == "media_corrupt"


def test_truncated_manifest_is_refused():
    raw = manifest().encode()
    for n in range(0, len(raw) - 2, 97):
        with pytest.raises(HvrError):
            mm.Manifest.decode(raw[:n])


@pytest.mark.parametrize("chunk", [mm.Chunk(4096, 4096, "x"), mm.Chunk(5 * CHUNK, 8192, "x"),
                                   mm.Chunk(0, CHUNK + 1, "x")], ids=["off grid", "past the end", "too long"])
def test_chunks_off_the_grid_are_refused(chunk):
    disk = mm.MediaDisk(uuid.UUID(int=7), "sys", 5 * CHUNK + 4096, (chunk,))
    with pytest.raises(HvrError) as info:
        mm.Manifest.decode(manifest(disks=(disk,)).encode())
    assert info.value.code == "media_corrupt"


@given(st.integers(1, 64).map(lambda n: n * 4096), st.integers(1, 16).map(lambda n: n * 4096),
       st.lists(st.tuples(st.integers(0, 255), st.integers(1, 64)), max_size=8))
def test_the_grid_covers_every_data_byte_once(size, chunk_bytes, raw_extents):
    extents, pos = [], 0
    for gap, length in raw_extents:  # sorted, disjoint data extents inside the disk
        start = pos + gap * 512
        end = min(size, start + length * 512)
        if start >= size:
            break
        extents.append((start, end - start))
        pos = end
    chunks = mm.grid(size, chunk_bytes, extents)
    assert all(o % chunk_bytes == 0 and 0 < n <= chunk_bytes and o + n <= size for o, n in chunks)
    assert [o for o, _ in chunks] == sorted({o for o, _ in chunks})  # in order, each once
    for start, length in extents:
        for byte in (start, start + length - 1):
            assert any(o <= byte < o + n for o, n in chunks)
