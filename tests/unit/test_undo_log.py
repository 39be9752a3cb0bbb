"""Undo log files, point views and the overlay, on real files checked against in-memory models."""

from __future__ import annotations

import asyncio
import os
import random
import uuid

import pytest

from hvr_common.block.overlay import Overlay
from hvr_common.pure.errors import CorruptError
from hvr_common.pure.undo import UndoHeader
from hvr_listener.point_view import PointView
from hvr_listener.undo_log import UndoLog

SIZE = 1 << 20
DISK = uuid.uuid4()
VM = uuid.uuid4()


class History:
    """The smallest history: logs by point id, oldest first."""

    def __init__(self):
        self.epoch = 0
        self.logs: list[UndoLog] = []

    def chain(self, point_id):
        ids = [log.point_id for log in self.logs]
        return self.logs[ids.index(point_id):] if point_id in ids else []


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    rng = random.Random(1)
    model = bytearray(SIZE)
    for _ in range(20):  # some data, some holes
        off = rng.randrange(0, SIZE - 8192) & ~511
        data = rng.randbytes(rng.randrange(512, 8192))
        os.pwrite(fd, data, off)
        model[off:off + len(data)] = data
    yield fd, model
    os.close(fd)


def header(point_id, seq=1):
    return UndoHeader(VM, point_id, seq, point_id, 1)


def overwrite(hist, log, fd, model, off, data):
    """What apply does: capture, sync, then write the image."""
    log.capture(DISK, fd, off, len(data))
    hist.epoch += 1
    log.sync()
    os.pwrite(fd, data, off)
    model[off:off + len(data)] = data


def build_history(tmp_path, fd, model, rng, points, writes: int, max_len: int):
    """Points 1..points, each with ``writes`` random overwrites captured first; the image at each point."""
    hist = History()
    truths = {}
    for point in range(1, points + 1):
        if hist.logs:
            hist.logs[-1].close_log(99)
        truths[point] = bytes(model)
        hist.logs.append(UndoLog.create(tmp_path / f"{point:020d}.undo", header(point, point)))
        for _ in range(writes):
            off = rng.randrange(0, SIZE - max_len)
            overwrite(hist, hist.logs[-1], fd, model, off, rng.randbytes(rng.randrange(1, max_len)))
    return hist, truths


def test_points_read_back_while_the_image_moves_on(tmp_path, image):
    fd, model = image
    rng = random.Random(2)
    hist, truths = build_history(tmp_path, fd, model, rng, 5, 15, 70000)
    for point, truth in truths.items():
        view = PointView(hist, point, DISK, fd, SIZE)
        assert view.pread(0, SIZE) == truth, f"point {point}"
        for _ in range(20):
            off = rng.randrange(0, SIZE - 1)
            n = rng.randrange(1, min(200000, SIZE - off))
            assert view.pread(off, n) == truth[off:off + n]
        runs = view.extents(0, SIZE)
        assert sum(n for _, n, _ in runs) == SIZE
        for o, n, is_data in runs:
            if not is_data:
                assert truth[o:o + n] == bytes(n), "a hole reported where the point has data"
    assert PointView(hist, 99, DISK, fd, SIZE).pread(0, SIZE) == bytes(model)  # not in the history: the image


def test_a_range_is_captured_once_and_holes_stay_holes(tmp_path, image):
    fd, model = image
    log = UndoLog.create(tmp_path / "1.undo", header(1))
    hole_at = next(i for i in range(0, SIZE, 4096) if model[i:i + 4096] == bytes(4096))
    first = log.capture(DISK, fd, hole_at, 4096)
    assert first > 0 and log.capture(DISK, fd, hole_at, 4096) == 0  # second time: nothing
    kinds = {rec.kind.name for rec in log.records()}
    assert "HOLE" in kinds
    assert log.size_bytes < 4096, "a hole's pre-image must not be stored as zero bytes"


def test_reopening_resumes_an_open_log_and_cuts_its_torn_tail(tmp_path, image):
    fd, model = image
    path = tmp_path / "1.undo"
    log = UndoLog.create(path, header(1))
    log.capture(DISK, fd, 1000, 5000)
    log.sync()
    good = os.path.getsize(path)
    log.close_fd()
    with open(path, "ab") as fh:
        fh.write(os.urandom(100))  # a torn record
    again = UndoLog.open(path, may_be_open=True)
    assert again.is_open and os.path.getsize(path) == good
    assert again.uncaptured(DISK, 0, 10000) == [(0, 1000), (6000, 4000)]
    again.capture(DISK, fd, 0, 10000)
    again.close_log(5)
    again.close_fd()
    closed = UndoLog.open(path, may_be_open=False)
    assert not closed.is_open and closed.uncaptured(DISK, 0, 10000) == []
    closed.close_fd()


def test_an_older_log_without_its_end_record_is_refused(tmp_path, image):
    fd, _ = image
    path = tmp_path / "1.undo"
    log = UndoLog.create(path, header(1))
    log.capture(DISK, fd, 0, 100)
    log.close_fd()
    with pytest.raises(CorruptError, match="not cleanly closed"):
        UndoLog.open(path, may_be_open=False)


def test_a_read_racing_a_capture_is_done_again(tmp_path, image):
    fd, model = image
    hist = History()
    hist.logs.append(UndoLog.create(tmp_path / "1.undo", header(1)))
    truth = bytes(model)
    view = PointView(hist, 1, DISK, fd, SIZE)
    log = hist.logs[0]
    real_split = log.split
    raced = []

    def split_then_apply(disk_id, offset, length):
        runs = real_split(disk_id, offset, length)
        if not raced:  # apply captures and overwrites right after the view resolved its ranges
            raced.append(True)
            overwrite(hist, log, fd, model, 0, b"\xff" * 4096)
        return runs
    log.split = split_then_apply
    assert view.pread(0, 4096) == truth[:4096]
    assert raced


# --- overlay -----------------------------------------------------------------------------------
async def test_overlay_takes_writes_and_leaves_the_base_alone(tmp_path, image):
    fd, model = image
    base = PointView(History(), 1, DISK, fd, SIZE)
    before = os.pread(fd, SIZE, 0)
    ov = Overlay(base, tmp_path / "delta")
    assert ov.delta_bytes == 0
    expect = bytearray(model)
    rng = random.Random(3)
    for _ in range(50):
        off = rng.randrange(0, SIZE - 20000)
        n = rng.randrange(1, 20000)
        if rng.random() < 0.7:
            data = rng.randbytes(n)
            if rng.random() < 0.5:
                ov.write_now(off, data)
            else:
                await ov.write(off, data)
            expect[off:off + n] = data
        else:
            await ov.write_zeroes(off, n, may_trim=rng.random() < 0.5)
            expect[off:off + n] = bytes(n)
        probe = rng.randrange(0, SIZE - 30000)
        assert ov.pread(probe, 30000) == bytes(expect[probe:probe + 30000])
    assert ov.pread(0, SIZE) == bytes(expect)
    assert os.pread(fd, SIZE, 0) == before, "the overlay wrote to its base"
    assert sum(n for _, n, _ in ov.extents(0, SIZE)) == SIZE
    assert 0 < ov.delta_bytes < SIZE
    await ov.close()
    assert not (tmp_path / "delta").exists()


def test_overlay_of_a_huge_device_costs_nothing_to_create(tmp_path):
    class Zeros:
        size = 64 << 30

        def pread(self, offset, length):
            return bytes(length)

        def extents(self, offset, length):
            return [(offset, length, False)]
    ov = Overlay(Zeros(), tmp_path / "delta")
    assert ov.delta_bytes == 0 and os.path.getsize(tmp_path / "delta") == 64 << 30
    asyncio.run(ov.write(10 << 30, b"x" * 4096))
    assert ov.pread(10 << 30, 4096) == b"x" * 4096 and ov.delta_bytes <= 64 * 1024
    ov.discard()


def test_merging_two_closed_logs_keeps_the_older_point_reachable(tmp_path, image):
    from hvr_listener.undo_log import merge_files
    fd, model = image
    hist, truths = build_history(tmp_path, fd, model, random.Random(5), 3, 10, 50000)
    hist.logs[-1].close_log(7)  # merged logs are closed ones
    a, b, c = hist.logs
    merged = merge_files(a, b, 9)
    assert merged.header.merged_through == 2 and not merged.is_open
    assert not (tmp_path / f"{1:020d}.undo.merging").exists()
    hist.logs = [merged, c]
    assert PointView(hist, 1, DISK, fd, SIZE).pread(0, SIZE) == truths[1]
    assert PointView(hist, 3, DISK, fd, SIZE).pread(0, SIZE) == truths[3]
    # the old descriptors still read the old files' contents (a view may be mid-read)
    for rec in a.records():
        assert a.read(rec, rec.offset, rec.length) == truths[1][rec.offset:rec.end]
    for log in (a, b):
        log.close_fd()


def test_a_capture_that_fails_half_way_leaves_the_log_whole(tmp_path, image):
    """A write that fails for real (the file size limit: EFBIG) is cut back and rolled back, so a retry
    continues a whole log and a restart reads every record it holds."""
    import resource
    import signal
    fd, model = image
    data = random.Random(9).randbytes(400_000)
    os.pwrite(fd, data, 100_000)  # data, not holes: its pre-image takes room
    model[100_000:500_000] = data
    path = tmp_path / "1.undo"
    log = UndoLog.create(path, header(1))
    log.capture(DISK, fd, 0, 8192)
    log.sync()
    size_before, index_before = os.path.getsize(path), log.uncaptured(DISK, 0, SIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size_before + 100_000, hard))
    try:
        with pytest.raises(OSError):
            log.capture(DISK, fd, 100_000, 400_000)  # needs more room than the limit leaves
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert os.path.getsize(path) == size_before and log.uncaptured(DISK, 0, SIZE) == index_before
    log.capture(DISK, fd, 100_000, 400_000)  # the retry
    log.sync()
    log.close_fd()
    again = UndoLog.open(path, may_be_open=True)
    assert again.uncaptured(DISK, 0, 500_000) == [(8192, 100_000 - 8192)]
    for rec in again.records():
        assert again.read(rec, rec.offset, rec.length) == bytes(model[rec.offset:rec.end])
    again.close_fd()
