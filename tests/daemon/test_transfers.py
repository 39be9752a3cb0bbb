"""Bandwidth cap and parallel transfers of a real agent, measured at an HTTP proxy before the listener."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from daemons import run, wait_for
from replication_pair import Pair
from upload_counter import UploadCounter

MiB = 1024 * 1024


def random_disk(path: Path, data_bytes: int, size_bytes: int) -> Path:
    """An image whose first ``data_bytes`` are random (nothing to compress), sparse after them."""
    with open(path, "wb") as fh:
        for _ in range(data_bytes // MiB):
            fh.write(os.urandom(MiB))
        fh.truncate(size_bytes)
    return path


def write_random(pair: Pair, vm: str, disk: str, nbytes: int) -> None:
    """Random bytes written by the guest's side (nbdsh over the agent's NBD socket)."""
    script = ("import os\n"
              f"for off in range(0, {nbytes}, {MiB}):\n"
              f"    h.pwrite(os.urandom({MiB}), off)\n"
              "h.flush()\n")
    run(["nbdsh", "-u", pair.agent.nbd_uri(vm, disk), "-c", script], timeout_s=120)


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}).start()
    yield p
    p.close()


def _copy_under_cap(pair: Pair, tmp_path: Path, cap: int, data_bytes: int) -> float:
    disk = random_disk(tmp_path / "d0.img", data_bytes, data_bytes + 4 * MiB)
    with UploadCounter(pair.listener.port) as counter:
        pair.protect("vm1", [disk], port=counter.port)
        pair.initial("vm1", timeout_s=600)
        assert sum(n for _, n in counter.received) >= data_bytes
        rate = counter.rate()
    pair.assert_identical("vm1", [disk])
    return rate / cap


def test_the_bandwidth_cap_holds_over_an_initial_copy(pair, tmp_path):
    view = pair.agent.hvrctl_json("server", "set", "--bandwidth", "3MiB/s", "-o", "json")
    assert view["bandwidth_limit"] == "3MiB/s" and view["bandwidth_now"] == "3MiB/s"
    assert view["set_by_operator"] == ["bandwidth_limit"]
    ratio = _copy_under_cap(pair, tmp_path, 3 * MiB, 15 * MiB)  # about 5 s
    assert 0.85 <= ratio <= 1.1, f"sent at {ratio:.3f} times the cap"


@pytest.mark.parametrize("tracking", ["journal", "bitmap"])  # a cycle sent from its file, and streamed
def test_the_bandwidth_cap_holds_over_a_cycle(tmp_path, tracking):
    p = Pair(tmp_path, tracking=tracking).start()
    try:
        disk = tmp_path / "d0.img"
        with open(disk, "wb") as fh:
            fh.truncate(16 * MiB)
        with UploadCounter(p.listener.port) as counter:
            p.protect("vm1", [disk], frequency=300, port=counter.port)
            p.initial("vm1")
            p.agent.hvrctl("server", "set", "--bandwidth", "2MiB/s")
            write_random(p, "vm1", "d0", 10 * MiB)  # random: the cycle compresses to about its size
            counter.received.clear()
            p.sync("vm1")
            assert sum(n for _, n in counter.received) >= 10 * MiB
            ratio = counter.rate() / (2 * MiB)
        assert 0.85 <= ratio <= 1.1, f"the cycle was sent at {ratio:.3f} times the cap"
        p.wait_replica_applied("vm1")
        p.assert_identical("vm1", [disk])
    finally:
        p.close()


@pytest.mark.slow
def test_the_bandwidth_cap_holds_within_ten_percent_over_thirty_seconds(tmp_path):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB},
             agent_tables='[bandwidth]\nlimit = "2MiB/s"\n').start()
    try:
        assert p.agent.hvrctl_json("server", "get", "--agent", "-o", "json")["set_by_operator"] == []
        ratio = _copy_under_cap(p, tmp_path, 2 * MiB, 60 * MiB)
        assert 0.9 <= ratio <= 1.1, f"sent at {ratio:.3f} times the cap"
    finally:
        p.close()


def test_no_more_vms_upload_at_once_than_max_transfers(pair, tmp_path):
    vms = [f"vm{i}" for i in range(3)]
    disks = {}
    with UploadCounter(pair.listener.port) as counter:
        for vm in vms:
            disks[vm] = pair.agent.workdir.parent / f"{vm}-d0.img"
            with open(disks[vm], "wb") as fh:
                fh.truncate(8 * MiB)
            pair.protect(vm, [disks[vm]], frequency=300, port=counter.port)
            pair.initial(vm)
        view = pair.agent.hvrctl_json("server", "set", "--max-transfers", "2", "--bandwidth", "6MiB/s",
                                      "-o", "json")
        assert view["max_active_transfers"] == 2
        for vm in vms:
            write_random(pair, vm, f"{vm}-d0", 4 * MiB)
        counter.most_vms = 0
        # three cycles of 4 MiB each asked for at once (one hvrctl each, started together: bitmap mode
        # sends a cycle as soon as it is cut, sooner than a slow machine starts the next hvrctl):
        # about a second each, two at a time
        asking = [threading.Thread(target=pair.agent.hvrctl, args=("vm", "sync-now", vm, "--no-wait")) for vm in vms]
        for thread in asking:
            thread.start()
        for thread in asking:
            thread.join(60)
        for vm in vms:
            pair.wait_replica_applied(vm)
            wait_for(lambda: pair.status(vm).get("next_sequence", 0) >= 3, 120, f"{vm}'s cycle acknowledged")
            pair.wait_replica_applied(vm)
        assert counter.most_vms == 2, f"{counter.most_vms} VMs uploaded at once with max_active_transfers 2"
    for vm in vms:
        pair.assert_identical(vm, [disks[vm]])


def test_transfer_settings_are_kept_across_a_restart_until_reset(pair):
    agent = pair.agent
    agent.hvrctl("server", "set", "--bandwidth", "40MiB/s", "--bandwidth-schedule",
                 "08:00-18:00=10MiB/s,22:00-06:00=unlimited", "--max-transfers", "5")
    agent.stop_and_check()
    agent.start().wait_ready()
    view = agent.hvrctl_json("server", "get", "--agent", "-o", "json")
    assert view["bandwidth_limit"] == "40MiB/s" and view["max_active_transfers"] == 5
    assert view["bandwidth_schedule"] == [{"start": "08:00", "end": "18:00", "limit": "10MiB/s"},
                                          {"start": "22:00", "end": "06:00", "limit": "unlimited"}]
    assert view["set_by_operator"] == ["bandwidth_limit", "bandwidth_schedule", "max_active_transfers"]
    bad = agent.hvrctl("server", "set", "--bandwidth-schedule", "08:00-18:00=10MiB/s,17:00-19:00=1MiB/s",
                       check=False)
    assert bad.returncode == 2 and "overlaps an earlier window" in bad.stderr
    mixed = agent.hvrctl("server", "set", "--max-transfers", "2", "--max-applies", "2", check=False)
    assert mixed.returncode == 2 and "set apart" in mixed.stderr
    view = agent.hvrctl_json("server", "set", "--reset-transfers", "-o", "json")
    assert view["bandwidth_limit"] == "unlimited" and view["max_active_transfers"] == 3
    assert view["set_by_operator"] == [] and view["bandwidth_schedule"] == []


def test_max_applies_is_a_replica_server_setting(pair):
    listener = pair.listener
    assert listener.hvrctl_json("server", "get", "-o", "json")["max_active_applies"] == 1
    assert listener.hvrctl_json("server", "set", "--max-applies", "4", "-o", "json")["max_active_applies"] == 4
    bad = listener.hvrctl("server", "set", "--max-applies", "0", check=False)
    assert bad.returncode == 2 and "max_active_applies" in bad.stderr
