"""Bundles built by the shipper from real HRL logs and images decode, and carry the right content."""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path

import pytest

from hvr_common.pure.errors import CorruptError

from hvr_common.pure.bundle import FRAME, FRAME_RAW_BYTES, BundleHeader, BundleKind, decode_header
from hvr_common.pure.bundle_decoder import BundleDecoder, BundleDone, DiskDone
from hvr_common.pure.hrl import RECORD_FLAG_NO_HOLE, HrlEncoder, HrlHeader, Record, RecordKind
from hvr_common.pure.stream_decoder import NEED_DATA
from hvr_common.pure.extents import coalesce
from hvr_common.shell.hrl_file import scan_hrl_file
from hvr_agent import initial_window, shipper
from hvr_agent.journal import log_path

DISK_SIZE = 16 * 1024 * 1024
VM_ID = uuid.UUID(int=1)
GENERATION = 3


def _write_log(image: Path, disk_id: uuid.UUID, sequence: int, ops: list, *, size: int = DISK_SIZE,
               closed_ns: int = 1_700_000_000_000_000_000) -> Path:
    path = log_path(image, sequence)
    enc = HrlEncoder(HrlHeader(VM_ID, disk_id, GENERATION, sequence, size, 1_600_000_000_000_000_000))
    with open(path, "wb") as f:
        f.write(enc.header_bytes())
        for op in ops:
            kind, offset = op[0], op[1]
            if kind is RecordKind.WRITE:
                f.write(enc.write(offset, op[2]))
                f.write(op[2])
            elif kind is RecordKind.TRIM:
                f.write(enc.trim(offset, op[2]))
            else:
                f.write(enc.zero(offset, op[2], op[3]))
        f.write(enc.end(closed_ns))
    return path


def _replay(model: bytearray, ops: list) -> None:
    for op in ops:
        kind, offset = op[0], op[1]
        if kind is RecordKind.WRITE:
            model[offset:offset + len(op[2])] = op[2]
        else:
            model[offset:offset + op[2]] = bytes(op[2])


def _random_ops(rng: random.Random, count: int, *, compressible: bool) -> list:
    ops = []
    for _ in range(count):
        r = rng.random()
        offset = rng.randrange(0, DISK_SIZE - 1024 * 1024) // 512 * 512
        length = rng.choice([512, 4096, 65536, 300_000 // 512 * 512, 1024 * 1024])
        if r < 0.75:
            data = (bytes([rng.randrange(256)]) * length if compressible else rng.randbytes(length))
            ops.append((RecordKind.WRITE, offset, data))
        elif r < 0.9:
            ops.append((RecordKind.TRIM, offset, length))
        else:
            ops.append((RecordKind.ZERO, offset, length, rng.choice([0, RECORD_FLAG_NO_HOLE])))
    return ops


def decode_file(path: Path, **expect) -> tuple[BundleHeader, dict[uuid.UUID, list[Record]], list[DiskDone]]:
    dec = BundleDecoder(keep_data=True, expect=expect)
    records: dict[uuid.UUID, list[Record]] = {}
    done: list[DiskDone] = []
    with open(path, "rb") as f:
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                chunk = f.read(256 * 1024)
                if not chunk:
                    dec.finish()
                    break
                dec.receive_data(chunk)
            elif isinstance(ev, BundleDone):
                break
            elif isinstance(ev, DiskDone):
                done.append(ev)
            elif isinstance(ev, tuple):
                index, rec = ev
                records.setdefault(dec.header.disks[index].disk_id, []).append(rec)
    return dec.header, records, done


def _apply(model: bytearray, records: list[Record]) -> None:
    for r in records:
        if r.kind is RecordKind.WRITE:
            model[r.offset:r.offset + r.length] = r.data
        else:
            model[r.offset:r.offset + r.length] = bytes(r.length)


def _frames(path: Path, header: BundleHeader) -> list[list[tuple[int, int]]]:
    """(codec, raw length) of every frame, per disk."""
    per_disk = []
    with open(path, "rb") as f:
        f.seek(header.size)
        for entry in header.disks:
            frames = []
            left = entry.stored_bytes
            while left:
                codec, stored, raw = FRAME.unpack(f.read(FRAME.size))
                f.seek(stored, os.SEEK_CUR)
                left -= FRAME.size + stored
                frames.append((codec, raw))
            per_disk.append(frames)
    return per_disk


def _frame_codecs(path: Path, header: BundleHeader) -> list[int]:
    return [codec for frames in _frames(path, header) for codec, _raw in frames]


def _disk(tmp_path: Path, name: str, size: int = DISK_SIZE) -> shipper.DiskSource:
    image = tmp_path / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    return shipper.DiskSource(name, uuid.uuid4(), image, size)


def _write_sources(log: Path, recs: list[Record]) -> list[int]:
    """Where in ``log`` each WRITE record's bytes come from (through the log's coalesced extents)."""
    _, logged, _ = scan_hrl_file(log)
    sources = []
    for r in recs:
        if r.kind is not RecordKind.WRITE:
            continue
        ext = next(e for e in coalesce(logged) if e.offset <= r.offset < e.end)
        sources.append(ext.source + r.offset - ext.offset)
    return sources


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cycle_bundle_decodes_and_equals_replay_of_every_disk(tmp_path, seed):
    rng = random.Random(seed)
    disks = [_disk(tmp_path, "a"), _disk(tmp_path, "b")]
    ops = {d.disk_id: _random_ops(rng, 200, compressible=seed % 2 == 0) for d in disks}
    for d in disks:
        _write_log(d.image_path, d.disk_id, 7, ops[d.disk_id])
    bundle = shipper.build_cycle_bundle(tmp_path / "outbox", vm_id=VM_ID, generation=GENERATION, sequence=7,
                                        disks=disks, compress=True)
    assert bundle.path == tmp_path / "outbox" / "0000000007.bundle"
    assert bundle.wire_bytes == bundle.path.stat().st_size
    assert bundle.sha256 == hashlib.sha256(bundle.path.read_bytes()).hexdigest()
    header, records, done = decode_file(bundle.path, vm_id=VM_ID, generation=GENERATION, sequence=7,
                                        kind=BundleKind.CYCLE,
                                        disks={d.disk_id: d.size_bytes for d in disks})
    assert [e.disk_id for e in header.disks] == [d.disk_id for d in disks]
    assert all((e.range_start, e.range_end) == (0, DISK_SIZE) for e in header.disks)
    assert bundle.raw_bytes == sum(e.raw_bytes for e in header.disks)
    assert len(done) == 2
    for d in disks:
        recs = records.get(d.disk_id, [])
        # coalesced: no overlaps, WRITEs of at most 4 MiB
        by_offset = sorted(recs, key=lambda r: r.offset)
        for a, b in zip(by_offset, by_offset[1:]):
            assert a.offset + a.length <= b.offset
        assert all(r.length <= shipper.RECORD_BYTES for r in recs if r.kind is RecordKind.WRITE)
        # TRIM and ZERO first, then WRITEs in the order their bytes lie in the log (read front to back)
        kinds = [r.kind is RecordKind.WRITE for r in recs]
        assert kinds == sorted(kinds)
        sources = _write_sources(log_path(d.image_path, 7), recs)
        assert sources == sorted(sources) and len(set(sources)) == len(sources)
        expected = bytearray(DISK_SIZE)
        _replay(expected, ops[d.disk_id])
        got = bytearray(DISK_SIZE)
        _apply(got, recs)
        assert got == expected


def test_cycle_frames_cut_the_stream_every_frame_size_whatever_the_records(tmp_path):
    """Records of every size (up to 4 MiB, past the builder's buffer) land in frames of exactly
    FRAME_RAW_BYTES, the last of each disk shorter: the layout depends on the bytes alone."""
    rng = random.Random(21)
    disks = [_disk(tmp_path, "a"), _disk(tmp_path, "b")]
    ops = [(RecordKind.WRITE, rng.randrange(0, DISK_SIZE // 2) // 512 * 512,
            rng.randbytes(rng.choice([512, 70_000, FRAME_RAW_BYTES - 1, 3 * 1024 * 1024 + 7]))) for _ in range(12)]
    ops += [(RecordKind.TRIM, 15 * 1024 * 1024, 4096), (RecordKind.ZERO, 14 * 1024 * 1024, 8192, 0)]
    for d in disks:
        _write_log(d.image_path, d.disk_id, 3, ops)
    bundle = shipper.build_cycle_bundle(tmp_path / "out", vm_id=VM_ID, generation=GENERATION, sequence=3,
                                        disks=disks, compress=False)
    header = decode_header(bundle.path.read_bytes())
    for entry, frames in zip(header.disks, _frames(bundle.path, header)):
        raws = [raw for _codec, raw in frames]
        assert sum(raws) == entry.raw_bytes > 4 * FRAME_RAW_BYTES
        assert all(r == FRAME_RAW_BYTES for r in raws[:-1]) and 0 < raws[-1] <= FRAME_RAW_BYTES
    _, records, _ = decode_file(bundle.path, kind=BundleKind.CYCLE, vm_id=VM_ID)
    for d in disks:
        expected = bytearray(DISK_SIZE)
        _replay(expected, ops)
        got = bytearray(DISK_SIZE)
        _apply(got, records[d.disk_id])
        assert got == expected


def test_rebuilding_a_cycle_gives_the_same_bytes(tmp_path):
    rng = random.Random(9)
    d = _disk(tmp_path, "a")
    _write_log(d.image_path, d.disk_id, 4, _random_ops(rng, 50, compressible=True))
    first = shipper.build_cycle_bundle(tmp_path / "o1", vm_id=VM_ID, generation=GENERATION, sequence=4, disks=[d],
                                       compress=True)
    second = shipper.build_cycle_bundle(tmp_path / "o2", vm_id=VM_ID, generation=GENERATION, sequence=4,
                                        disks=[d], compress=True)
    assert first.sha256 == second.sha256
    assert first.cut_ns == 1_700_000_000_000_000_000
    assert decode_header(first.path.read_bytes()).created_ns == first.cut_ns


def test_incompressible_frames_are_stored_raw_and_compressible_ones_zstd(tmp_path):
    rng = random.Random(5)
    d = _disk(tmp_path, "a")
    ops = [(RecordKind.WRITE, 0, rng.randbytes(3 * 1024 * 1024)),
           (RecordKind.WRITE, 8 * 1024 * 1024, b"\x5a" * (8 * 1024 * 1024))]
    _write_log(d.image_path, d.disk_id, 1, ops)
    bundle = shipper.build_cycle_bundle(tmp_path / "out", vm_id=VM_ID, generation=GENERATION, sequence=1,
                                        disks=[d], compress=True)
    header, records, _ = decode_file(bundle.path)
    codecs = _frame_codecs(bundle.path, header)
    assert 0 in codecs and 1 in codecs
    assert bundle.compressed_frames == codecs.count(1)
    # random megabytes travel raw (and, after one that did not shrink, the next few frames are not even
    # tried: SKIP_AFTER_INCOMPRESSIBLE); then the repeated byte compresses to almost nothing again
    from hvr_common.pure.bundle import SKIP_AFTER_INCOMPRESSIBLE
    raw_frames = codecs.count(0)
    assert raw_frames <= 3 + SKIP_AFTER_INCOMPRESSIBLE + 1
    assert bundle.wire_bytes < (raw_frames + 0.2) * 1024 * 1024
    plain = shipper.build_cycle_bundle(tmp_path / "plain", vm_id=VM_ID, generation=GENERATION, sequence=1,
                                       disks=[d], compress=False)
    header, _, _ = decode_file(plain.path)
    assert set(_frame_codecs(plain.path, header)) == {0}
    assert plain.wire_bytes > 11 * 1024 * 1024


def test_a_disk_without_a_log_of_the_sequence_is_refused_as_a_lost_log(tmp_path):
    """A missing log is a loss (an unfinished cut's holes are filled at open): the cycle is not shipped,
    the error is one a resynchronization cures, and nothing is left in the outbox."""
    a, b = _disk(tmp_path, "a"), _disk(tmp_path, "b")
    _write_log(a.image_path, a.disk_id, 12, [(RecordKind.WRITE, 4096, b"x" * 4096)])
    with pytest.raises(CorruptError, match="log 12 of disk b is missing") as caught:
        shipper.build_cycle_bundle(tmp_path / "out", vm_id=VM_ID, generation=GENERATION, sequence=12,
                                   disks=[a, b], compress=True)
    assert caught.value.code == "corrupt" and not caught.value.transient
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_log_of_another_disk_is_refused(tmp_path):
    d = _disk(tmp_path, "a")
    _write_log(d.image_path, uuid.uuid4(), 2, [(RecordKind.WRITE, 0, b"y" * 512)])
    with pytest.raises(Exception, match="another VM or disk"):
        shipper.build_cycle_bundle(tmp_path / "out", vm_id=VM_ID, generation=GENERATION, sequence=2, disks=[d],
                                   compress=True)
    assert not any((tmp_path / "out").iterdir())  # no spool (nor temporary file) left behind


def test_initial_windows_carry_only_allocated_data_and_rebuild_the_image(tmp_path):
    rng = random.Random(11)
    size = 40 * 1024 * 1024
    d = _disk(tmp_path, "big", size)
    content = bytearray(size)
    with open(d.image_path, "r+b") as f:
        for offset, length in [(0, 4096), (3 * 1024 * 1024, 5 * 1024 * 1024 + 512), (20 * 1024 * 1024, 65536),
                               (size - 8192, 8192)]:
            data = rng.randbytes(length)
            f.seek(offset)
            f.write(data)
            content[offset:offset + length] = data
        f.seek(30 * 1024 * 1024)  # allocated zeroes: need not travel
        f.write(bytes(1024 * 1024))
    fd = os.open(d.image_path, os.O_RDONLY)
    try:
        allocated = initial_window.allocated_bytes(fd, 0, size)
        assert allocated < size // 2
        got = bytearray(size)
        offset = 0
        windows = 0
        sent_allocated = 0
        buffer = None
        while offset < size:
            end = initial_window.plan_window(fd, offset, size, 4 * 1024 * 1024)
            assert end > offset
            # every window after the first reuses the buffer of the one before (as the agent does)
            w = initial_window.build_initial_bundle(vm_id=VM_ID, generation=GENERATION, disk=d, image_fd=fd,
                                                    start=offset, end=end, compress=True, created_ns=5, buffer=buffer)
            assert buffer is None or w.buffer is buffer or len(buffer) < len(w.buffer)
            buffer = w.buffer
            body = b"".join(w.bundle.pieces)
            assert len(body) == w.bundle.wire_bytes and hashlib.sha256(body).hexdigest() == w.bundle.sha256
            path = tmp_path / f"w{windows}.bundle"
            path.write_bytes(body)
            header, records, _ = decode_file(path, kind=BundleKind.INITIAL, vm_id=VM_ID)
            assert (header.disks[0].range_start, header.disks[0].range_end) == (offset, end)
            recs = records.get(d.disk_id, [])
            assert all(r.kind is RecordKind.WRITE and r.length <= 4 * 1024 * 1024 for r in recs)
            assert all(any(r.data) for r in recs)  # zero pieces are left out
            _apply(got, recs)
            sent_allocated += w.allocated_bytes
            offset = end
            windows += 1
    finally:
        os.close(fd)
    assert got == content
    assert sent_allocated == allocated
    assert windows == -(-allocated // (4 * 1024 * 1024))  # holes cost no window


def test_initial_window_reads_straight_into_its_buffer_and_frames_slice_it(tmp_path):
    """Incompressible data travels in frames that are views of the window buffer (no copies),
    compressible data in zstd frames; a buffer too small for the window is replaced, never overrun."""
    size = 16 * 1024 * 1024
    d = _disk(tmp_path, "views", size)
    noise = random.Random(5).randbytes(3 * 1024 * 1024)
    with open(d.image_path, "r+b") as f:
        f.write(noise)
        f.seek(8 * 1024 * 1024)
        f.write(b"compressible " * 100_000)
    fd = os.open(d.image_path, os.O_RDONLY)
    try:
        small = bytearray(1024)
        w = initial_window.build_initial_bundle(vm_id=VM_ID, generation=GENERATION, disk=d, image_fd=fd, start=0,
                                                end=size, compress=True, created_ns=7, buffer=small)
    finally:
        os.close(fd)
    assert w.buffer is not small and small == bytearray(1024)
    views = [p for p in w.bundle.pieces if isinstance(p, memoryview)]
    assert views and all(v.obj is w.buffer for v in views)
    assert w.bundle.compressed_frames >= 1  # the text shrank
    path = tmp_path / "views.bundle"
    path.write_bytes(b"".join(w.bundle.pieces))
    _, records, _ = decode_file(path, kind=BundleKind.INITIAL, vm_id=VM_ID)
    got = bytearray(size)
    _apply(got, records[d.disk_id])
    with open(d.image_path, "rb") as f:
        assert got == f.read()
