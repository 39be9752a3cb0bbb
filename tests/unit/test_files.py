"""The shared file-system steps (hvr_common.shell.files) on real files.

A short write cannot be caused on a local file system at will, so the
short-write tests wrap ``os.pwrite``/``os.pwritev`` to write at most a few
bytes per call (the only fault simulated here); the bytes still go to a real
file and are read back.
"""

from __future__ import annotations

import os
import random

import pytest

from hvr_common.shell import files
from hvr_common.shell.files import IOV_MAX, pwrite_all, pwritev_all, unlink_if_exists, write_file_durably


@pytest.fixture
def short_writes(monkeypatch):
    """Every pwrite/pwritev writes at most 7 bytes; counts the calls."""
    calls = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        calls.append(offset)
        return real_pwrite(fd, memoryview(data)[:7], offset)

    def pwritev(fd, parts, offset):
        calls.append(offset)
        return real_pwrite(fd, memoryview(b"".join(parts))[:7], offset)

    monkeypatch.setattr(files.os, "pwrite", pwrite)
    monkeypatch.setattr(files.os, "pwritev", pwritev)
    return calls


def _fd(tmp_path):
    return os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)


_RANDOM = random.Random(42)  # fixed: the same test ids on every collection (parallel workers compare them)


@pytest.mark.parametrize("data", [b"", b"x", _RANDOM.randbytes(100), bytearray(_RANDOM.randbytes(50)),
                                  memoryview(_RANDOM.randbytes(64))],
                         ids=["empty", "one", "bytes", "bytearray", "memoryview"])
def test_pwrite_all_writes_everything_at_the_offset_even_in_short_pieces(tmp_path, short_writes, data):
    fd = _fd(tmp_path)
    try:
        pwrite_all(fd, data, 10)
        assert os.pread(fd, len(data) + 20, 0) == (bytes(10) + bytes(data) if data else b"")
        assert len(short_writes) == max(1, -(-len(data) // 7))
    finally:
        os.close(fd)


def test_pwritev_all_writes_every_part_in_order_even_in_short_pieces(tmp_path, short_writes):
    parts = [os.urandom(n) for n in (3, 0, 20, 1, 9)]
    fd = _fd(tmp_path)
    try:
        assert pwritev_all(fd, parts, 5) == 33
        assert os.pread(fd, 100, 0) == bytes(5) + b"".join(parts)
    finally:
        os.close(fd)


def test_pwritev_all_takes_more_parts_than_one_call_accepts(tmp_path):
    parts = [bytes([i % 251]) * 3 for i in range(2 * IOV_MAX + 5)]
    fd = _fd(tmp_path)
    try:
        assert pwritev_all(fd, parts, 0, size=3 * len(parts)) == 3 * len(parts)
        assert os.pread(fd, 10 * len(parts), 0) == b"".join(parts)
    finally:
        os.close(fd)


def test_write_file_durably_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "log.hrl"
    path.write_bytes(b"old contents, longer than the new")
    write_file_durably(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.hrl"]


def test_unlink_if_exists_says_whether_the_file_was_there(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"1")
    assert unlink_if_exists(path) is True
    assert not path.exists()
    assert unlink_if_exists(path) is False
