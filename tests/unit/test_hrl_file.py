"""HRL files on disk (hvr_common.shell.hrl_file): streaming reads, replay and coalesced apply onto real files."""

from __future__ import annotations

import os
import random
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.hrl import (
    RECORD_FLAG_FUA,
    RECORD_FLAG_NO_HOLE,
    HrlCorruptError,
    HrlEncoder,
    HrlHeader,
    LogSummary,
    RecordKind,
)
from hvr_common.pure.hrl_decoder import decode_bytes
from hvr_common.shell.hrl_file import apply_coalesced, iter_hrl_file, read_hrl_summary, replay

W, T, Z = RecordKind.WRITE, RecordKind.TRIM, RecordKind.ZERO
DISK = 64 * 1024


def header(disk_size: int = DISK, sequence: int = 7) -> HrlHeader:
    return HrlHeader(uuid.UUID(int=1), uuid.UUID(int=2), 1, sequence, disk_size, 10**18)


def encode_log(ops, *, disk_size: int = DISK, closed: bool = True) -> bytes:
    """``ops``: (kind, offset, data-or-length, flags)."""
    enc = HrlEncoder(header(disk_size))
    out = bytearray(enc.header_bytes())
    for kind, offset, arg, flags in ops:
        if kind is W:
            out += enc.write(offset, arg, flags) + arg
        elif kind is T:
            out += enc.trim(offset, arg, flags)
        else:
            out += enc.zero(offset, arg, flags)
    if closed:
        out += enc.end(10**18 + 1)
    return bytes(out)


def model(ops, base: bytes) -> bytes:
    image = bytearray(base)
    for kind, offset, arg, _ in ops:
        if kind is W:
            image[offset:offset + len(arg)] = arg
        else:
            image[offset:offset + arg] = bytes(arg)
    return bytes(image)


def random_ops(rng: random.Random, count: int, disk: int = DISK):
    ops = []
    for _ in range(count):
        kind = rng.choice([W, W, W, T, Z])
        length = rng.choice([1, 7, 512, 4096, 5000, 20000])
        offset = rng.randrange(0, disk - length + 1)
        if rng.random() < 0.5:
            offset -= offset % 4096
        if kind is W:
            ops.append((W, offset, rng.randbytes(length), rng.choice([0, RECORD_FLAG_FUA])))
        else:
            ops.append((kind, offset, length, rng.choice([0, RECORD_FLAG_NO_HOLE]) if kind is Z else 0))
    return ops


@pytest.fixture
def files(tmp_path):
    """A log of random operations, a base image, and what the image must read after the log."""
    rng = random.Random(11)
    ops = random_ops(rng, 60)
    log = tmp_path / "disk0.img.0000000007.hrl"
    log.write_bytes(encode_log(ops))
    base = rng.randbytes(DISK)
    image = tmp_path / "disk0.img"
    image.write_bytes(base)
    return log, image, ops, base


# --- reading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 33, 4096, 1 << 20])
@pytest.mark.parametrize("keep_data", [True, False])
def test_iter_hrl_file_streams_the_same_events_as_decode_bytes(files, chunk_size, keep_data):
    log, _, _, _ = files
    if chunk_size < 4096:  # a small log, for so many reads
        log.write_bytes(encode_log([(W, 5, b"abc", 0), (T, 0, 9, 0), (W, 100, b"x" * 300, 1), (Z, 1, 1, 2)]))
    hdr, records, summary = decode_bytes(log.read_bytes(), keep_data=keep_data)
    events = list(iter_hrl_file(log, keep_data=keep_data, chunk_size=chunk_size))
    assert events == [hdr, *records, summary]
    assert summary.clean and isinstance(events[-1], LogSummary)


@pytest.mark.parametrize("chunk_size", [1, 4096, 1 << 20])
def test_iter_hrl_file_of_a_torn_active_log(tmp_path, chunk_size):
    ops = random_ops(random.Random(2), 10)
    ops = [(k, o, a[:100], f) if k is W else (k, o, a, f) for k, o, a, f in ops]
    active = encode_log(ops, closed=False)
    path = tmp_path / "a.hrl"
    path.write_bytes(active + bytes(1000))  # a crash left unwritten pages after the last record
    *_, summary = iter_hrl_file(path, chunk_size=chunk_size)
    assert not summary.clean and summary.record_count == 10
    assert summary.valid_length == len(active) and summary.torn_bytes == 1000
    assert summary.reason == f"bad record magic at {len(active)}"


@pytest.mark.parametrize("chunk_size", [1, 4096, 1 << 20])
def test_data_after_end_record_is_found_by_the_file_reader(files, chunk_size):
    log, _, _, _ = files
    if chunk_size < 4096:
        log.write_bytes(encode_log([(W, 5, b"abc", 0)]))
    with open(log, "ab") as f:
        f.write(b"\0")
    with pytest.raises(HrlCorruptError, match="data after end record"):
        list(iter_hrl_file(log, chunk_size=chunk_size))


def test_read_hrl_summary(files, tmp_path):
    log, _, ops, _ = files
    hdr, summary = read_hrl_summary(log)
    assert hdr == header() and summary.clean and summary.record_count == len(ops)
    assert summary.write_bytes == sum(len(a) for k, _, a, _ in ops if k is W)
    assert summary.valid_length == log.stat().st_size
    with pytest.raises(NotFoundError):
        read_hrl_summary(tmp_path / "missing.hrl")
    (tmp_path / "image.raw").write_bytes(b"QFI\xfb" + bytes(200))
    with pytest.raises(HrlCorruptError, match="not an HRL file"):
        read_hrl_summary(tmp_path / "image.raw")


# --- replay -------------------------------------------------------------------------------------

@pytest.mark.parametrize("apply", [replay, apply_coalesced])
def test_replay_makes_the_image_equal_the_model(files, apply):
    log, image, ops, base = files
    summary = apply(log, image)
    assert summary.clean and summary.record_count == len(ops)
    assert image.read_bytes() == model(ops, base)


@pytest.mark.parametrize("apply", [replay, apply_coalesced])
def test_replay_onto_an_open_fd_leaves_it_open(files, apply):
    log, image, ops, base = files
    fd = os.open(image, os.O_RDWR)
    try:
        apply(log, fd)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
    assert image.read_bytes() == model(ops, base)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 40), st.sampled_from([replay, apply_coalesced]))
def test_replay_equals_model_for_random_logs(seed, count, apply):
    rng = random.Random(seed)
    ops = random_ops(rng, count)
    base = rng.randbytes(DISK)
    with tempfile.TemporaryDirectory() as d:
        log, image = Path(d) / "l.hrl", Path(d) / "i.img"
        log.write_bytes(encode_log(ops))
        image.write_bytes(base)
        apply(log, image, sync=False)
        assert image.read_bytes() == model(ops, base)


def _corruptions(data: bytes):
    """(name, damaged log) pairs: each must leave the image untouched under require_clean."""
    middle = len(data) // 2
    flipped = bytearray(data)
    flipped[middle] ^= 0x40
    bad_header = bytearray(data)
    bad_header[60] ^= 1
    return [
        ("no END record (active log)", data[:-56]),
        ("truncated mid-record", data[:middle]),
        ("bit flip in a record", bytes(flipped)),
        ("bit flip in the END record", data[:-3] + bytes([data[-3] ^ 1]) + data[-2:]),
        ("data after END", data + b"\0" * 8),
        ("bad header", bytes(bad_header)),
        ("empty file", b""),
    ]


@pytest.mark.parametrize("apply", [replay, apply_coalesced])
def test_corrupt_log_changes_nothing_when_clean_is_required(files, apply):
    log, image, _, base = files
    good = log.read_bytes()
    for name, damaged in _corruptions(good):
        log.write_bytes(damaged)
        with pytest.raises(HrlCorruptError):
            apply(log, image)
        assert image.read_bytes() == base, name


def test_replay_of_a_torn_log_without_require_clean_applies_the_valid_records(files):
    log, image, ops, base = files
    data = log.read_bytes()
    _, records, _ = decode_bytes(data)
    cut = records[40].position + 10  # inside record 40
    log.write_bytes(data[:cut])
    summary = replay(log, image, require_clean=False)
    assert not summary.clean and summary.record_count == 40
    assert summary.reason == f"truncated record at {records[40].position}"
    assert image.read_bytes() == model(ops[:40], base)


def test_corrupt_header_is_refused_even_without_require_clean(files):
    log, image, _, base = files
    data = bytearray(log.read_bytes())
    data[20] ^= 1
    log.write_bytes(bytes(data))
    with pytest.raises(HrlCorruptError, match="checksum"):
        replay(log, image, require_clean=False)
    assert image.read_bytes() == base


@pytest.mark.parametrize("apply", [replay, apply_coalesced])
@pytest.mark.parametrize("require_clean", [True, False])
def test_image_smaller_than_the_disk_is_refused_before_writing(files, apply, require_clean):
    log, image, _, base = files
    image.write_bytes(base[:DISK - 1])
    with pytest.raises(UsageError, match="smaller than the 65536-byte disk") as info:
        apply(log, image, require_clean=require_clean)
    assert info.value.hint
    assert image.read_bytes() == base[:DISK - 1]


def test_a_larger_image_is_fine(files):
    log, image, ops, base = files
    image.write_bytes(base + b"tail")
    replay(log, image)
    assert image.read_bytes() == model(ops, base) + b"tail"


def test_missing_files_are_not_found(files, tmp_path):
    log, image, _, _ = files
    with pytest.raises(NotFoundError):
        replay(tmp_path / "nope.hrl", image)
    with pytest.raises(NotFoundError):
        replay(log, tmp_path / "nope.img")


@pytest.mark.parametrize("apply", [replay, apply_coalesced])
def test_trim_and_zero_read_as_zeroes(tmp_path, apply):
    disk = 1 << 20
    log = tmp_path / "l.hrl"
    log.write_bytes(encode_log([(T, 0, 512 << 10, 0), (Z, 512 << 10, 128 << 10, RECORD_FLAG_NO_HOLE),
                                (Z, 640 << 10, 128 << 10, 0)], disk_size=disk))
    image = tmp_path / "i.img"
    image.write_bytes(b"\xaa" * disk)
    apply(log, image)
    assert image.read_bytes() == bytes(768 << 10) + b"\xaa" * (256 << 10)


def test_apply_coalesced_writes_each_surviving_byte_once(tmp_path, monkeypatch):
    ops = [(W, 0, b"a" * 4096, 0)] * 50 + [(W, 4096, b"b" * 4096, 0)]
    log = tmp_path / "l.hrl"
    log.write_bytes(encode_log(ops))
    image = tmp_path / "i.img"
    image.write_bytes(bytes(DISK))
    written = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd, data, offset):
        written.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting_pwrite)
    apply_coalesced(log, image)
    assert sum(written) == 8192
    assert image.read_bytes() == b"a" * 4096 + b"b" * 4096 + bytes(DISK - 8192)
