"""What a crash between two steps of the recovery history leaves, and how the next start finishes it.

A real listener store (SQLite) and real undo log files; each test stops a
step half-way the way a crash would and checks that loading the history
again leaves every point reachable.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from hvr_common.pure.recovery_points import HistorySettings
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.undo import HEADER_SIZE, file_name
from hvr_listener.point_view import PointView
from hvr_listener.recovery_history import VmHistory
from hvr_listener.store import ListenerStore

SIZE = 1 << 20
FINE = HistorySettings(0, 60)


@pytest.fixture
def setup(tmp_path):
    store = ListenerStore(tmp_path / "listener.db")
    vm_id, disk_id = uuid.uuid4(), uuid.uuid4()
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    image = vm_dir / "d.img"
    with open(image, "wb") as fh:
        fh.truncate(SIZE)
    store.create_replica(vm_id, "vm", "p", 1, 30, True, vm_dir, [(disk_id, "d", SIZE, image)],
                         state=ReplicationState.REPLICATING)
    fd = os.open(image, os.O_RDWR)
    yield store, vm_id, disk_id, vm_dir, fd
    os.close(fd)
    store.close()


def apply_cycle(history: VmHistory, store, vm_id, disk_id, fd, seq: int, data: bytes, at: int) -> None:
    capture = history.prepare_capture(FINE, set())
    if capture is not None:
        capture.capture(disk_id, fd, at, len(data))
        capture.commit()
    os.pwrite(fd, data, at)
    store.mark_applied(vm_id, seq, time.time_ns())
    history.applied()


def fresh(store, vm_id, vm_dir) -> VmHistory:
    history = VmHistory(vm_id, "vm", vm_dir / "points", store)
    history.load()
    return history


def check_points(history: VmHistory, disk_id, fd, truths: dict[int, bytes]) -> None:
    for p in history.points:
        if p.sequence in truths and (p.capturing or p is history.points[-1]):
            assert PointView(history, p.id, disk_id, fd, SIZE).pread(0, SIZE) == truths[p.sequence], p


def run_cycles(store, vm_id, disk_id, vm_dir, fd, n: int):
    history = fresh(store, vm_id, vm_dir)
    truths = {}
    for seq in range(1, n + 1):
        apply_cycle(history, store, vm_id, disk_id, fd, seq, bytes([seq]) * 70000, seq * 50000)
        truths[seq] = os.pread(fd, SIZE, 0)
    return history, truths


def test_a_decided_target_without_its_log_gets_one_at_start(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    history, truths = run_cycles(store, vm_id, disk_id, vm_dir, fd, 3)
    newest = history.points[-1]
    store.set_capturing(vm_id, newest.id, True)  # step 1 done, crash before its file was created
    history.close()
    again = fresh(store, vm_id, vm_dir)
    assert again.logs[newest.id].is_open
    check_points(again, disk_id, fd, truths)


def test_a_target_whose_header_was_torn_is_created_again(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    history, truths = run_cycles(store, vm_id, disk_id, vm_dir, fd, 3)
    newest = history.points[-1]
    store.set_capturing(vm_id, newest.id, True)
    history.close()
    (vm_dir / "points" / file_name(newest.id)).write_bytes(os.urandom(HEADER_SIZE // 2))
    again = fresh(store, vm_id, vm_dir)
    assert again.logs[newest.id].is_open and again.logs[newest.id].records() == []
    check_points(again, disk_id, fd, truths)


def test_a_previous_log_left_open_is_closed_at_start(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    history, truths = run_cycles(store, vm_id, disk_id, vm_dir, fd, 3)
    previous = history.points[-2]
    assert history.logs[previous.id].is_open  # the current target: nothing has superseded it yet
    newest = history.points[-1]
    store.set_capturing(vm_id, newest.id, True)
    history._new_log(newest).close_fd()  # step 2 done, crash before the previous log was closed
    history.close()
    again = fresh(store, vm_id, vm_dir)
    assert not again.logs[previous.id].is_open and again.logs[newest.id].is_open
    check_points(again, disk_id, fd, truths)


def test_merge_leftovers_are_finished_at_start(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    history, truths = run_cycles(store, vm_id, disk_id, vm_dir, fd, 5)
    a, b = history.points[0], history.points[1]
    step = next(s for s in history.plan_drops(HistorySettings(1, 60), set(), time.time_ns() + 2 * 3600 * 10 ** 9)
                if s.into is not None)
    assert (step.into.id, step.point.id) == (a.id, b.id)
    (vm_dir / "points" / f"{a.id:020d}.undo.merging").write_bytes(b"half a merge")
    merged = history.merge_files(step)  # renamed into place; crash before B's row and file were dropped
    merged.close_fd()
    history.close()
    again = fresh(store, vm_id, vm_dir)
    assert b.id not in {p.id for p in again.points} and b.id not in again.logs
    assert not (vm_dir / "points" / file_name(b.id)).exists()
    assert not list((vm_dir / "points").glob("*.merging"))
    assert again.logs[a.id].header.merged_through == b.id
    del truths[b.sequence]
    check_points(again, disk_id, fd, truths)


def test_a_lost_log_of_an_older_point_is_reported(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    history, _ = run_cycles(store, vm_id, disk_id, vm_dir, fd, 3)
    oldest = history.points[0]
    history.close()
    os.unlink(vm_dir / "points" / file_name(oldest.id))
    with pytest.raises(Exception, match="lost its undo log"):
        fresh(store, vm_id, vm_dir)


async def test_with_history_off_capture_stops_once_the_test_that_needed_it_ends(setup):
    from hvr_listener.recovery_history import Histories
    store, vm_id, disk_id, vm_dir, fd = setup
    off = HistorySettings(0, 0)
    history = fresh(store, vm_id, vm_dir)
    histories = Histories(store)
    histories._by_vm[vm_id] = history
    store.set_history_settings(vm_id, off)
    rep = store.replica(vm_id)

    def cycle(seq: int) -> object:
        capture = history.prepare_capture(off, histories.pins(vm_id))
        if capture is not None:
            capture.capture(disk_id, fd, seq * 4096, 4096)
            capture.commit()
        os.pwrite(fd, bytes([seq]) * 4096, seq * 4096)
        store.mark_applied(vm_id, seq, time.time_ns())
        history.applied()
        return capture

    assert cycle(1) is None and cycle(2) is None
    pinned = history.points[-1]
    store.start_test_failover(vm_id, pinned.id, time.time_ns())
    assert cycle(3) is not None  # the pinned point captures what cycle 3 overwrites
    store.stop_test_failover(vm_id)
    assert cycle(4) is not None  # still the target: its log holds what the test needed
    await histories.thin(rep, history)
    assert pinned.id not in {p.id for p in history.points} and not history.logs
    assert not (vm_dir / "points" / file_name(pinned.id)).exists()
    assert cycle(5) is None, "with history off, nothing is captured once no test needs it"
    assert [p.sequence for p in store.points(vm_id)] == [5]


def test_a_file_named_with_non_ascii_digits_is_not_taken_for_a_point(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    history, truths = run_cycles(store, vm_id, disk_id, vm_dir, fd, 3)
    odd = vm_dir / "points" / file_name(2).replace("2", "²")
    odd.write_bytes(b"not an undo log")
    again = fresh(store, vm_id, vm_dir)  # int('²') would raise here: the replica would not load
    assert [p.sequence for p in again.points] == [p.sequence for p in history.points]
    check_points(again, disk_id, fd, truths)
