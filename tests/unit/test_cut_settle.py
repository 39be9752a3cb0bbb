"""A cut in two halves: the switch returns the closed logs at once, complete; making them
durable (and shrinking the bitmap) settles afterwards, and the VM's next cut waits for it.

The replication task builds a cycle's bundle while its cut settles and uploads only once it
settled; these tests hold the registry to the promises that makes safe.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from hvr_common.pure.config import AgentConfig
from hvr_common.pure.errors import HvrError
from hvr_common.shell.hrl_file import read_hrl_summary, scan_hrl_file
from hvr_common.pure.intent_bitmap import decode_file
from hvr_common.pure.tracking_mode import TrackingMode
from hvr_agent.store import AgentStore
from hvr_agent.vms import VmRegistry

MiB = 1024 * 1024


async def _registry(tmp_path: Path) -> tuple[VmRegistry, AgentStore]:
    state = tmp_path / "state"
    state.mkdir()
    config = AgentConfig(state_dir=state, admin_socket=state / "admin.sock", nbd_socket=state / "nbd.sock")
    store = AgentStore(config.db_path)
    registry = VmRegistry(config, store)
    image = tmp_path / "disk0.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    # journal mode: these tests are about the closed logs a cut hands over
    await registry.add("vm", [str(image)], read_only=False, tracking=TrackingMode.JOURNAL)
    return registry, store


def _stored_sequence(store: AgentStore) -> int:
    return next(v.next_sequence for v in store.list_vms() if v.name == "vm")


def _marks_on_disk(disk) -> list[int]:
    intent = disk.intent
    state = decode_file(intent.path.read_bytes(), intent.disk_size, intent.region_bytes)
    return state.bitmap.marked_regions()


async def test_closed_logs_are_complete_before_the_cut_settles(tmp_path: Path):
    registry, store = await _registry(tmp_path)
    try:
        disk = registry.disk_for_export("vm/disk0")
        region = disk.intent.region_bytes
        offsets = [i * 4 * MiB for i in range(8)]
        for offset in offsets:
            await disk.write(offset, os.urandom(64 * 1024))
        first = registry.vms["vm"].sequence
        stored = _stored_sequence(store)
        marks = _marks_on_disk(disk)  # the written regions, and some ahead of them
        assert {o // region for o in offsets} <= set(marks)

        closed = await registry.begin_cut("vm")
        settled = registry.vms["vm"].settling[first]
        assert not settled.done()  # nothing of the durable half ran yet
        # the closed log is whole in the page cache: END record and every write, readable now
        _header, records, summary = scan_hrl_file(closed[0].path)
        assert summary.closed_ns is not None, "the closed log has no END record before its cut settled"
        assert [r.offset for r in records] == offsets
        assert (closed[0].sequence, closed[0].write_bytes) == (first, 8 * 64 * 1024)
        # until the cut settled, the bitmap on disk still covers what the closed log wrote,
        # and the store still names the old active log
        assert _marks_on_disk(disk) == marks
        assert _stored_sequence(store) == stored

        # the VM's next cut waits for this one to settle
        finished: list[str] = []
        settled.add_done_callback(lambda _f: finished.append("first settled"))
        second = asyncio.ensure_future(registry.begin_cut("vm"))
        second.add_done_callback(lambda _f: finished.append("second switched"))
        await asyncio.wait_for(registry.durable("vm", first), timeout=30)
        assert settled.done() and settled.exception() is None
        assert _marks_on_disk(disk) == []  # nothing written since: the bitmap shrank to nothing
        assert _stored_sequence(store) == stored + 1
        closed2 = await asyncio.wait_for(second, timeout=30)
        assert finished == ["first settled", "second switched"]
        assert closed2[0].sequence == first + 1
        assert read_hrl_summary(closed2[0].path)[1].closed_ns is not None
        await asyncio.wait_for(registry.durable("vm", first + 1), timeout=30)
        assert _stored_sequence(store) == stored + 2
        assert registry.vms["vm"].settling == {}  # settled cuts are forgotten
    finally:
        await registry.close_all()
        store.close()


async def test_a_cut_that_cannot_settle_stops_the_vm_cutting_and_shipping(tmp_path: Path):
    registry, store = await _registry(tmp_path)
    try:
        disk = registry.disk_for_export("vm/disk0")
        await disk.write(0, os.urandom(4096))
        closed = await registry.begin_cut("vm")
        settled = registry.vms["vm"].settling[closed[0].sequence]
        store.close()  # recording the new sequence fails: the cut does not settle
        seq = closed[0].sequence
        with pytest.raises(HvrError, match=f"cycle {seq} of VM 'vm' could not be made durable"):
            await asyncio.wait_for(registry.durable("vm", seq), timeout=30)
        assert settled.done() and settled.exception() is not None
        sequence = registry.vms["vm"].sequence
        with pytest.raises(HvrError, match="could not be made durable") as refused:
            await registry.begin_cut("vm")
        assert "restart the agent" in refused.value.hint
        assert registry.vms["vm"].sequence == sequence  # no switch happened
        assert not registry.vms["vm"].cut_lock.locked()  # and nothing is left holding the lock
        with pytest.raises(HvrError, match="could not be made durable"):  # asked again: still refused
            await registry.durable("vm", seq)
    finally:
        await registry.close_all()
