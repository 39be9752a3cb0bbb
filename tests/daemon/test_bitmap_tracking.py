"""Bitmap tracking end to end: copy-before-write under fire, and a SIGKILL during a write storm.

(The suites of test_replication_e2e.py and test_replication_faults.py run in
both tracking modes; these are the cases only bitmap mode has.)
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from daemons import AgentProcess, log_events, wait_for
from hvr_common.shell.hrl_file import read_hrl_summary
from fault_proxy import FaultProxy
from replication_pair import MiB, Pair, make_disk, qemu_io
from hvrctl.client import AdminClient

CLIENTS = Path(__file__).resolve().parents[1] / "support" / "clients"
SYSTEM_PYTHON = "/usr/bin/python3"  # has libnbd's bindings (Debian python3-libnbd)


def test_a_bitmap_vm_writes_data_once_and_a_cut_without_replication_arms_nothing(tmp_path):
    agent = AgentProcess(tmp_path / "agent").start()
    try:
        agent.wait_ready()
        disk = make_disk(tmp_path / "once.img", 16 * MiB)
        refused = agent.hvrctl("vm", "add", "bad", "--disk", str(disk), "--tracking", "both", check=False)
        assert refused.returncode != 0 and "journal" in refused.stderr
        agent.add_vm("once", [disk], tracking="bitmap")
        (vm,) = agent.list_vms()
        assert vm["tracking"] == "bitmap"
        assert "TRACKING" in agent.hvrctl("vm", "list").stdout and "bitmap" in agent.hvrctl("vm", "list").stdout
        qemu_io(agent.nbd_uri("once", "once"), "write -P 9 0 1M", "write -P 3 5M 4k", "flush")
        (status,) = agent.hvrctl_json("vm", "list", "-o", "json")[0]["disks"]
        assert status["bitmap"]["dirty_blocks"] == 256 + 1 and status["active_log_records"] == 0
        cut = agent.cut("once")
        (log,) = cut["logs"]
        assert log["record_count"] == 0  # the data went into the image only
        _, summary = read_hrl_summary(Path(log["path"]))
        assert summary.clean and summary.write_bytes == 0
        (status,) = agent.list_vms()[0]["disks"]
        # no replication: nothing will ship the cycle, so nothing is frozen or copied aside
        assert status["bitmap"] == {"dirty_blocks": 0, "frozen_cycles": [], "cbw_bytes": 0}
        qemu_io(agent.nbd_uri("once", "once"), "write -P 4 0 1M")
        assert not list(tmp_path.glob("once.img.*.cbw"))
    finally:
        agent.close()


def test_copy_before_write_under_fire_ships_the_image_as_it_was_at_the_cut(tmp_path):
    size = 160 * MiB
    dirty = 128 * MiB
    pair = Pair(tmp_path, tracking="bitmap").start()
    writer = None
    try:
        disk = make_disk(tmp_path / "hot.img", size)
        pair.protect("hot", [disk], frequency=900)  # only the cuts the test makes
        pair.initial("hot")
        noise = tmp_path / "noise.bin"
        noise.write_bytes(random.Random(11).randbytes(dirty))  # incompressible: the build takes a while
        qemu_io(pair.agent.nbd_uri("hot", "hot"), f"write -s {noise} 0 {dirty}")
        at_cut = tmp_path / "at_cut" / "hot.img"  # named like the disk: assert_identical finds its replica
        at_cut.parent.mkdir()
        shutil.copyfile(disk, at_cut)  # nothing writes now: this is the image at the next cut
        go = tmp_path / "go"
        writer = subprocess.Popen([SYSTEM_PYTHON, str(CLIENTS / "fire_writer.py"), pair.agent.nbd_uri("hot", "hot"),
                                   str(dirty), "4000", "5", str(go)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        admin = AdminClient(pair.agent.admin_socket, "hvr-agent")
        cut_seq = admin.request("GET", "/v1/vms/hot")["sequence"]
        admin.request("POST", "/v1/vms/hot/replication/sync-now", {"wait": False})
        wait_for(lambda: admin.request("GET", "/v1/vms/hot")["sequence"] > cut_seq, 30, "the cut")
        go.touch()  # the cycle is being built: overwrite its blocks now
        assert writer.stdout.readline().strip() == "done"
        assert writer.wait(60) == 0
        wait_for(lambda: pair.replica("hot")["last_applied_sequence"] >= cut_seq, 120, f"cycle {cut_seq} applied",
                 context=pair.agent.log_tail)
        assert pair.replica("hot")["last_applied_sequence"] == cut_seq  # nothing cut since
        pair.assert_identical("hot", [at_cut])  # the replica is the image as it was at the cut
        (built,) = [e for e in log_events(pair.agent.stdout_path, "cycle_built") if e["seq"] == cut_seq]
        assert built["cbw_bytes"] > 0, "no write reached a block of the cycle before the build read it"
        assert built["write_bytes"] == dirty
        # the overwrites travel in the next cycle
        pair.sync("hot")
        pair.wait_replica_applied("hot")
        pair.assert_identical("hot", [disk])
        assert not list(tmp_path.glob("hot.img.*.cbw")), "copy-before-write files left behind"
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        pair.close()


def test_sigkill_during_a_write_storm_then_restart_converges_shipping_only_marked_regions(tmp_path):
    region = 256 * 1024
    size = 64 * MiB
    span = 8 * MiB  # the storm stays here; the rest of the disk must never travel again
    pair = Pair(tmp_path, agent_config={"bitmap_region_bytes": region}, tracking="bitmap").start()
    storm = None
    try:
        disk = make_disk(tmp_path / "st.img", size)
        qemu_io_fill = random.Random(3).randbytes(size)
        disk.write_bytes(qemu_io_fill)  # a full disk: reshipping all of it would show
        pair.protect("st", [disk], frequency=900)
        pair.initial("st")
        record = tmp_path / "storm.txt"
        storm = subprocess.Popen([SYSTEM_PYTHON, str(CLIENTS / "write_storm.py"), pair.agent.nbd_uri("st", "st"),
                                  str(span), "42", str(record)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def flushes() -> int:
            return record.read_text().count("F\n") if record.exists() else 0

        wait_for(lambda: flushes() >= 5, 60, "the storm to complete 5 flushes")
        pair.agent.hvrctl("vm", "sync-now", "st", "--no-wait")  # a cycle in flight when the agent dies
        target = flushes() + 10
        wait_for(lambda: flushes() >= target, 60, "10 more flushes")
        pair.agent.kill()
        storm.wait(timeout=60)
        restarted_at = len(pair.agent.stdout_path.read_text(errors="replace").splitlines())
        pair.agent.start().wait_ready()
        deadline = time.monotonic() + 120
        while True:
            try:
                pair.sync("st", timeout_s=60)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "sync-now never succeeded after the restart"
        pair.wait_replica_applied("st")
        pair.assert_identical("st", [disk])
        assert pair.status("st")["state"] == "Replicating"
        lines = pair.agent.stdout_path.read_text(errors="replace").splitlines()[restarted_at:]
        after = [json.loads(line) for line in lines if line.startswith("{")]
        carried = [e for e in after if e.get("event") == "regions_carried"]
        assert carried and all(e["bytes"] <= span + 17 * region for e in carried)  # + the mark-ahead
        shipped = sum(e["write_bytes"] for e in after if e.get("event") == "cycle_shipped")
        assert 0 < shipped <= span + 17 * region, f"{shipped} bytes shipped after the restart"
    finally:
        if storm is not None and storm.poll() is None:
            storm.kill()
        pair.close()


def test_link_down_and_copy_before_write_past_its_budget_abandons_the_cycle_and_converges(tmp_path):
    """The replica is unreachable while the guest overwrites a cycle's blocks faster than the budget
    allows: the cycle is abandoned (event, state detail), ships empty, the next one carries its blocks,
    and the replica converges with no resynchronization."""
    size = 64 * MiB
    dirty = 48 * MiB
    pair = Pair(tmp_path, agent_config={"cbw_budget_bytes": 64 * 1024}, tracking="bitmap").start()
    proxy = FaultProxy(pair.listener.port)
    writer = None
    try:
        disk = make_disk(tmp_path / "tight.img", size)
        pair.protect("tight", [disk], frequency=900, port=proxy.port)
        pair.initial("tight")
        noise = tmp_path / "noise.bin"
        noise.write_bytes(random.Random(12).randbytes(dirty))
        qemu_io(pair.agent.nbd_uri("tight", "tight"), f"write -s {noise} 0 {dirty}")
        go = tmp_path / "go"
        writer = subprocess.Popen([SYSTEM_PYTHON, str(CLIENTS / "fire_writer.py"),
                                   pair.agent.nbd_uri("tight", "tight"), str(dirty), "3000", "6", str(go)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        proxy.hold()  # the link is down
        admin = AdminClient(pair.agent.admin_socket, "hvr-agent")
        cut_seq = admin.request("GET", "/v1/vms/tight")["sequence"]
        admin.request("POST", "/v1/vms/tight/replication/sync-now", {"wait": False})
        wait_for(lambda: admin.request("GET", "/v1/vms/tight")["sequence"] > cut_seq, 30, "the cut")
        go.touch()
        assert writer.stdout.readline().strip() == "done" and writer.wait(60) == 0
        wait_for(lambda: log_events(pair.agent.stdout_path, "cycle_abandoned"), 60, "the cycle to be abandoned",
                 context=pair.agent.log_tail)
        (abandoned,) = log_events(pair.agent.stdout_path, "cycle_abandoned")
        assert abandoned["seq"] == cut_seq and "budget" in abandoned["reason"]
        status = pair.status("tight")
        assert status["state"] == "Replicating" and "abandoned" in status["state_detail"]
        assert not list(tmp_path.glob("tight.img.*.cbw"))
        proxy.release()  # the link is back
        pair.sync("tight")
        pair.wait_replica_applied("tight")
        pair.assert_identical("tight", [disk])
        status = pair.status("tight")
        assert status["state"] == "Replicating" and not status["state_detail"]
        history = [c["sequence"] for c in pair.replica("tight")["cycles"]]
        assert cut_seq in history and history == list(range(history[0], history[0] + len(history)))
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        proxy.close()
        pair.close()


@pytest.mark.parametrize("first,then", [("journal", "bitmap"), ("bitmap", "journal")])
def test_switching_the_tracking_mode_at_a_cut_keeps_the_replica_identical(tmp_path, first, then):
    size = 16 * MiB
    pair = Pair(tmp_path, tracking=first).start()
    try:
        disk = make_disk(tmp_path / "sw.img", size)
        pair.protect("sw", [disk], frequency=900)
        pair.initial("sw")
        uri = pair.agent.nbd_uri("sw", "sw")
        qemu_io(uri, "write -P 1 0 2M", "write -P 2 6M 64k")  # tracked the first way, cut by the switch
        switched = pair.agent.hvrctl_json("vm", "set-tracking", "sw", then, "-o", "json")
        assert switched["tracking"] == then and pair.status("sw")["tracking"] == then
        qemu_io(uri, "write -P 3 1M 2M", "write -P 4 10M 1M")  # tracked the new way
        pair.sync("sw")
        pair.wait_replica_applied("sw")
        pair.assert_identical("sw", [disk])
        qemu_io(uri, "write -P 5 0 512k")
        pair.sync("sw")
        pair.wait_replica_applied("sw")
        pair.assert_identical("sw", [disk])
        pair.agent.terminate()  # the mode survives a restart
        pair.agent.start().wait_ready()
        assert [v["tracking"] for v in pair.agent.list_vms()] == [then]
        qemu_io(uri, "write -P 6 3M 1M")
        pair.sync("sw")
        pair.wait_replica_applied("sw")
        pair.assert_identical("sw", [disk])
    finally:
        pair.close()


def _watch_outbox(outbox: Path, seen: list, stop: threading.Event) -> None:
    while not stop.is_set():
        if outbox.exists():
            seen.extend(p.name for p in outbox.rglob("*") if p.is_file())
        stop.wait(0.002)


def test_a_bitmap_cycle_streams_from_the_disks_without_a_spool_file(tmp_path):
    """The cycle is read from the image and sent as it is read: nothing appears in the outbox."""
    size = 64 * MiB
    pair = Pair(tmp_path, tracking="bitmap").start()
    stop = threading.Event()
    seen: list = []
    watcher = None
    try:
        disk = make_disk(tmp_path / "flow.img", size)
        pair.protect("flow", [disk], frequency=900)
        pair.initial("flow")
        noise = tmp_path / "noise.bin"
        noise.write_bytes(random.Random(13).randbytes(32 * MiB))  # incompressible: the upload takes a while
        qemu_io(pair.agent.nbd_uri("flow", "flow"), f"write -s {noise} 0 {32 * MiB}", "write -P 5 40M 4M")
        watcher = threading.Thread(target=_watch_outbox, args=(pair.agent.state_dir / "outbox", seen, stop))
        watcher.start()
        pair.sync("flow")
        stop.set()
        watcher.join()
        pair.wait_replica_applied("flow")
        pair.assert_identical("flow", [disk])
        assert not seen, f"spool files were written in bitmap mode: {sorted(set(seen))}"
        built = log_events(pair.agent.stdout_path, "cycle_built")
        assert built and all(e.get("streamed") for e in built)
        assert sum(e["write_bytes"] for e in built) >= 32 * MiB
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
        pair.close()


def test_a_connection_dropped_mid_stream_sends_the_cycle_again_and_converges(tmp_path):
    """Connections cut inside the streamed body: the cycle is sent again (the same bytes: copy-before-write
    stays armed until the acknowledgement, while the guest overwrites its blocks), the replica converges on
    the image as it was at the cut, then on the image."""
    size = 32 * MiB
    dirty = 16 * MiB
    pair = Pair(tmp_path, tracking="bitmap").start()
    proxy = FaultProxy(pair.listener.port, seed=4)
    try:
        disk = make_disk(tmp_path / "cut.img", size)
        pair.protect("cut", [disk], frequency=900, port=proxy.port)
        pair.initial("cut")
        noise = tmp_path / "noise.bin"
        noise.write_bytes(random.Random(14).randbytes(dirty))
        qemu_io(pair.agent.nbd_uri("cut", "cut"), f"write -s {noise} 0 {dirty}")
        at_cut = tmp_path / "at_cut" / "cut.img"
        at_cut.parent.mkdir()
        shutil.copyfile(disk, at_cut)
        proxy.drop_after = (256 * 1024, 8 * MiB)  # inside the body of a 16 MiB cycle
        proxy.max_drops = 3
        admin = AdminClient(pair.agent.admin_socket, "hvr-agent")
        cut_seq = admin.request("GET", "/v1/vms/cut")["sequence"]
        admin.request("POST", "/v1/vms/cut/replication/sync-now", {"wait": False})
        wait_for(lambda: admin.request("GET", "/v1/vms/cut")["sequence"] > cut_seq, 30, "the cut")
        qemu_io(pair.agent.nbd_uri("cut", "cut"), "write -P 6 0 8M")  # overwrites blocks of the cycle in flight
        wait_for(lambda: proxy.dropped >= 3, 120, "three streamed bodies to be cut", context=pair.agent.log_tail)
        proxy.drop_after = None
        wait_for(lambda: pair.replica("cut")["last_applied_sequence"] >= cut_seq, 180, f"cycle {cut_seq} applied",
                 context=pair.agent.log_tail)
        pair.assert_identical("cut", [at_cut])  # the re-sent cycle is the image as it was at the cut
        assert [c["sequence"] for c in pair.replica("cut")["cycles"]].count(cut_seq) == 1
        pair.sync("cut")
        pair.wait_replica_applied("cut")
        pair.assert_identical("cut", [disk])
        assert not list(tmp_path.glob("cut.img.*.cbw")), "copy-before-write files left behind"
    finally:
        proxy.close()
        pair.close()
