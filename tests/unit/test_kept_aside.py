"""The kept-aside point (hvr_listener/kept_aside.py): kept before the first apply, pinned, and crash-safe.

A real listener store and real undo logs; a "crash" is a step stopped
half-way, after which a fresh history is loaded as at the next start.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from hvr_common.pure.errors import NotFoundError
from hvr_common.pure.recovery_points import HistorySettings
from hvr_common.pure.replication_state import ReplicationState
from hvr_listener.kept_aside import KEPT, PENDING, RELEASED, KeptAside, mark_pending, read_marker
from hvr_listener.point_view import PointView
from hvr_listener.recovery_history import Histories, VmHistory
from hvr_listener.store import ListenerStore

SIZE = 1 << 20
NO_HISTORY = HistorySettings(0, 0)  # nothing but the kept-aside point captures
FINE = HistorySettings(0, 60)


@pytest.fixture
def setup(tmp_path):
    store = ListenerStore(tmp_path / "listener.db")
    vm_id, disk_id = uuid.uuid4(), uuid.uuid4()
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    image = vm_dir / "d.img"
    with open(image, "wb") as fh:
        fh.write(bytes([0xA5]) * SIZE)  # the old primary's state
    store.create_replica(vm_id, "vm", "p", 2, 30, True, vm_dir, [(disk_id, "d", SIZE, image)],
                         state=ReplicationState.REPLICATING)
    mark_pending(vm_dir)
    fd = os.open(image, os.O_RDWR)
    yield store, vm_id, disk_id, vm_dir, fd
    os.close(fd)
    store.close()


def fresh(store, vm_id, vm_dir) -> VmHistory:
    history = VmHistory(vm_id, "vm", vm_dir / "points", store)
    history.load()
    return history


def apply_cycle(kept: KeptAside, history, store, vm_id, disk_id, fd, seq, at, data, settings=NO_HISTORY):
    kept.settle(store.replica(vm_id), history)
    capture = history.prepare_capture(settings, kept.pins(vm_id))
    if capture is not None:
        capture.capture(disk_id, fd, at, len(data))
        capture.commit()
    os.pwrite(fd, data, at)
    store.mark_applied(vm_id, seq, time.time_ns())
    history.applied()


def read_point(history, point_id, disk_id, fd) -> bytes:
    return PointView(history, point_id, disk_id, fd, SIZE).pread(0, SIZE)


@pytest.mark.parametrize("settings", [NO_HISTORY, FINE], ids=["no-history", "fine-window"])
def test_the_point_reads_as_the_copy_was_and_stays_pinned(setup, settings):
    store, vm_id, disk_id, vm_dir, fd = setup
    before = os.pread(fd, SIZE, 0)
    kept, history = KeptAside(store), fresh(store, vm_id, vm_dir)
    for seq in range(1, 6):
        apply_cycle(kept, history, store, vm_id, disk_id, fd, seq, seq * 100_000, bytes([seq]) * 150_000, settings)
    marker = read_marker(vm_dir)
    assert marker["state"] == KEPT
    point = marker["point_id"]
    assert kept.point_id(store.replica(vm_id)) == point and kept.pins(vm_id) == {point}
    assert read_point(history, point, disk_id, fd) == before
    history.close()
    assert read_point(fresh(store, vm_id, vm_dir), point, disk_id, fd) == before, "after a restart too"


def test_a_crash_after_the_row_leaves_a_target_whose_log_the_next_start_creates(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    before = os.pread(fd, SIZE, 0)
    store.add_base_point(vm_id, 0, time.time_ns())  # step 1 done; crash before the log and the marker
    kept, history = KeptAside(store), fresh(store, vm_id, vm_dir)
    assert read_marker(vm_dir)["state"] == PENDING
    apply_cycle(kept, history, store, vm_id, disk_id, fd, 1, 0, b"\x01" * 200_000)
    point = read_marker(vm_dir)["point_id"]
    assert point == history.points[0].id
    assert read_point(history, point, disk_id, fd) == before


def test_a_crash_after_the_log_records_the_stored_point(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    before = os.pread(fd, SIZE, 0)
    history = fresh(store, vm_id, vm_dir)
    stored = history.add_base_point(0, time.time_ns())  # steps 1 and 2 done; crash before the marker
    history.close()
    kept, history = KeptAside(store), fresh(store, vm_id, vm_dir)
    apply_cycle(kept, history, store, vm_id, disk_id, fd, 1, 4096, b"\x02" * 300_000)
    assert read_marker(vm_dir) | {"kept_ns": 0} == {"state": KEPT, "point_id": stored.id, "kept_ns": 0}
    assert [p.id for p in history.points].count(stored.id) == 1 and len(history.points) == 2
    assert read_point(history, stored.id, disk_id, fd) == before


def test_released_it_is_dropped_like_any_point_and_other_points_are_not_released(setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    histories = Histories(store)
    kept, history = histories.kept_aside, histories.load(store.replica(vm_id))
    for seq in (1, 2):
        apply_cycle(kept, history, store, vm_id, disk_id, fd, seq, seq * 8192, bytes([seq]) * 8192)
    rep = store.replica(vm_id)
    point = kept.point_id(rep)
    assert point in histories.pins(vm_id)
    assert history.plan_drops(NO_HISTORY, histories.pins(vm_id), time.time_ns()) == []
    with pytest.raises(NotFoundError):
        kept.release(rep, point + 100)
    kept.release(rep, point)
    kept.release(rep, point)  # repeated: done already
    assert read_marker(vm_dir)["state"] == RELEASED and histories.pins(vm_id) == set()
    assert [s.point.id for s in history.plan_drops(NO_HISTORY, histories.pins(vm_id), time.time_ns())] == [point]


def test_a_replica_not_adopted_with_keep_aside_gets_no_point(tmp_path, setup):
    store, vm_id, disk_id, vm_dir, fd = setup
    (vm_dir / "kept-aside.json").unlink()
    kept, history = KeptAside(store), fresh(store, vm_id, vm_dir)
    apply_cycle(kept, history, store, vm_id, disk_id, fd, 1, 0, b"\x03" * 4096)
    assert [p.sequence for p in history.points] == [1] and kept.pins(vm_id) == set()
