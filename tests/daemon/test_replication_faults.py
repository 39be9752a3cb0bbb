"""Replication under faults: SIGKILLs of either daemon at random points, and dropped connections.

After every fault, replication converges: the replica equals the primary
(qemu-img compare) and its cycle history is contiguous, each cycle applied
once, in order.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from daemons import wait_for
from fault_proxy import FaultProxy
from replication_pair import MiB, Pair, make_disk, qemu_io
from hvr_agent.initial_copy import INITIAL_WINDOWS_IN_FLIGHT

# every suite runs in both tracking modes
BOTH_MODES = pytest.mark.parametrize("tracking", ["journal", "bitmap"])


def _history_ok(pair: Pair, vm: str) -> list[int]:
    history = pair.replica(vm)["cycles"]
    seqs = [c["sequence"] for c in history]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap or duplicate in cycle history: {seqs}"
    applied = [c["applied_ns"] for c in history if c["applied_ns"]]
    assert applied == sorted(applied), "cycles applied out of order"
    return seqs


def _write_round(pair: Pair, vm: str, disks: list[Path], rng: random.Random, size: int) -> None:
    for d in disks:
        cmds = []
        for _ in range(6):
            off = rng.randrange(0, size - MiB)
            cmds.append(f"write -P {rng.randrange(256)} {off} {rng.choice([65536, 512 * 1024, MiB])}")
        qemu_io(pair.agent.nbd_uri(vm, d.stem), *cmds)


@BOTH_MODES
def test_sigkill_of_either_daemon_at_random_points_converges(tmp_path, tracking):
    rng = random.Random(20261123)
    size = 16 * MiB
    pair = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}, tracking=tracking).start()
    try:
        disks = [make_disk(tmp_path / "k0.img", size), make_disk(tmp_path / "k1.img", size)]
        pair.protect("kvm", disks, frequency=900)
        pair.initial("kvm")
        kills = {"listener": 0, "agent": 0}
        for point in range(22):
            _write_round(pair, "kvm", disks, rng, size)
            victim = "agent" if point % 3 == 2 else "listener"
            sync = threading.Thread(target=lambda: pair.agent.hvrctl("vm", "sync-now", "kvm", "--no-wait",
                                                                     check=False))
            sync.start()
            time.sleep(rng.uniform(0.0, 0.25))  # a random crash point: cut, spool, upload or apply
            sync.join(30)
            (pair.agent if victim == "agent" else pair.listener).kill()
            kills[victim] += 1
            (pair.agent if victim == "agent" else pair.listener).start().wait_ready()
        assert kills["listener"] >= 14 and kills["agent"] >= 7
        # everything converges once both run undisturbed
        deadline = time.monotonic() + 120
        while True:
            try:
                pair.sync("kvm", timeout_s=60)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "sync-now never succeeded after the faults"
        pair.wait_replica_applied("kvm")
        pair.assert_identical("kvm", disks)
        seqs = _history_ok(pair, "kvm")
        assert len(seqs) >= 10
        assert pair.status("kvm")["state"] == "Replicating"
    finally:
        pair.close()


def _noise_vm_behind(pair: Pair, proxy: FaultProxy, tmp_path: Path, name: str, size: int, *, seed: int) -> Path:
    """A VM with one disk full of incompressible data, replicating (every 900 s) through ``proxy``."""
    disk = make_disk(tmp_path / f"{name}.img", size)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(seed).randbytes(size))
    pair.agent.add_vm(name, [disk])
    qemu_io(pair.agent.nbd_uri(name, name), f"write -s {noise} 0 {size}")
    pair.agent.hvrctl("vm", "enable", name, "--replica-server", "127.0.0.1", "--port", str(proxy.port),
                      "--key", str(pair.key_path), "--frequency", "900", "--no-compression")
    return disk


@BOTH_MODES
def test_dropped_connections_are_retried_and_initial_copy_resends_little(tmp_path, tracking):
    size = 64 * MiB
    window = 2 * MiB
    pair = Pair(tmp_path, agent_config={"initial_window_bytes": window}, tracking=tracking).start()
    proxy = FaultProxy(pair.listener.port, seed=9)
    try:
        disk = _noise_vm_behind(pair, proxy, tmp_path, "net", size, seed=1)
        # three connections die mid-window; with windows in flight on several connections,
        # turning the cuts off after the third was seen let more die, each re-sending a window
        proxy.drop_after = (256 * 1024, 1536 * 1024)
        proxy.max_drops = 3
        pair.agent.hvrctl("initial", "start", "net")
        wait_for(lambda: proxy.dropped >= 3, 60, "three connections to be cut mid-upload")
        proxy.drop_after = proxy.max_drops = None
        wait_for(lambda: pair.status("net")["state"] == "Replicating", 180, "the initial copy to finish",
                 context=pair.agent.log_tail)
        resent = proxy.forwarded - size
        # a cut costs at most the window it interrupted twice: the part that had passed, and the whole window
        # sent again; never the copy from its start (which would be at least the disk again)
        bound = 2 * window * proxy.dropped
        assert resent <= bound < size, (f"the interrupted copy re-sent {resent} bytes ({resent / size:.1%} of the "
                                        f"disk) for {proxy.dropped} cuts of {window}-byte windows")
        # cycles through the same flaky path
        proxy.drop_after = (4096, 200 * 1024)
        qemu_io(pair.agent.nbd_uri("net", "net"), "write -P 7 0 3M", "write -P 8 10M 1M")
        pair.agent.hvrctl("vm", "sync-now", "net", "--no-wait")
        wait_for(lambda: proxy.dropped >= 6, 60, "cycle uploads to be cut")
        proxy.drop_after = None
        pair.sync("net")
        pair.wait_replica_applied("net")
        pair.assert_identical("net", [disk])
        _history_ok(pair, "net")
    finally:
        proxy.close()
        pair.close()


def _cycle_ready(pair: Pair, vm: str, outbox: Path, seq: int, tracking: str) -> bool:
    """Journal mode: the cycle's bundle is built (spooled).  Bitmap mode streams cycles from the disks
    (no spool file): the cycle is cut, its blocks frozen on every disk."""
    if tracking == "journal":
        return (outbox / f"{seq:010d}.bundle").exists()
    (rec,) = [v for v in pair.agent.list_vms() if v["name"] == vm]
    return all(seq in d["bitmap"]["frozen_cycles"] for d in rec["disks"])


@BOTH_MODES
def test_a_cut_due_during_a_stalled_upload_happens_and_its_bundle_is_built_meanwhile(tmp_path, tracking):
    """A cycle's cut and build do not wait for the upload before it: while cycle N cannot reach
    the replica, sync-now cuts N+1 and builds its bundle (bitmap mode: cuts it, its blocks frozen, to be
    streamed); once the link moves again both are acknowledged in order and the replica converges."""
    size = 16 * MiB
    pair = Pair(tmp_path, tracking=tracking).start()
    proxy = FaultProxy(pair.listener.port)
    try:
        disk = make_disk(tmp_path / "app.img", size)
        pair.protect("app", [disk], port=proxy.port)
        pair.initial("app")
        rng = random.Random(5)
        outbox = pair.agent.state_dir / "outbox" / "app"
        first = pair.status("app")["next_sequence"]
        _write_round(pair, "app", [disk], rng, size)
        proxy.hold()
        pair.agent.hvrctl("vm", "sync-now", "app", "--no-wait")
        wait_for(lambda: _cycle_ready(pair, "app", outbox, first, tracking), 30, f"cycle {first} to be built")
        _write_round(pair, "app", [disk], rng, size)
        pair.agent.hvrctl("vm", "sync-now", "app", "--no-wait")
        wait_for(lambda: _cycle_ready(pair, "app", outbox, first + 1, tracking), 30,
                 f"cycle {first + 1} to be cut and built while cycle {first} is stuck", context=pair.agent.log_tail)
        assert pair.status("app")["next_sequence"] == first  # cycle N is still not acknowledged
        proxy.release()
        pair.sync("app")
        pair.wait_replica_applied("app")
        pair.assert_identical("app", [disk])
        seqs = _history_ok(pair, "app")
        assert {first, first + 1} <= set(seqs)
    finally:
        proxy.close()
        pair.close()


@pytest.mark.parametrize("victim", ["agent", "listener"])
def test_initial_copy_resumes_after_a_restart_from_the_durable_offset(tmp_path, victim):
    size = 64 * MiB
    window = MiB
    pair = Pair(tmp_path, agent_config={"initial_window_bytes": window}).start()
    proxy = FaultProxy(pair.listener.port, seed=3)  # only counts bytes here
    try:
        disk = _noise_vm_behind(pair, proxy, tmp_path, "rs", size, seed=2)
        pair.agent.hvrctl("initial", "start", "rs")
        wait_for(lambda: proxy.forwarded > size // 3, 60, "a third of the disk to be sent")
        process = pair.agent if victim == "agent" else pair.listener
        process.kill()
        process.start().wait_ready()
        wait_for(lambda: pair.status("rs")["state"] == "Replicating", 180, "the initial copy to finish",
                 context=lambda: pair.agent.log_tail() + pair.listener.log_tail())
        resent = proxy.forwarded - size
        # what was in flight is lost (the windows travelling at once, and one being committed as the
        # restarted agent asked where to resume): nothing durable is sent again
        lost_at_most = (INITIAL_WINDOWS_IN_FLIGHT + 2) * window
        assert resent <= lost_at_most, f"{resent} bytes ({resent / size:.1%}) sent again after the restart"
        assert resent < size * 0.10
        pair.wait_replica_applied("rs")
        pair.assert_identical("rs", [disk])
    finally:
        proxy.close()
        pair.close()


@BOTH_MODES
def test_suspend_keeps_tracking_and_resume_ships_everything(tmp_path, tracking):
    size = 8 * MiB
    pair = Pair(tmp_path, tracking=tracking).start()
    try:
        disk = make_disk(tmp_path / "sr.img", size)
        pair.protect("sr", [disk], frequency=900)
        pair.initial("sr")
        pair.agent.hvrctl("vm", "suspend", "sr")
        assert pair.status("sr")["state"] == "Suspended"
        applied_before = pair.replica("sr")["last_applied_sequence"]
        qemu_io(pair.agent.nbd_uri("sr", "sr"), "write -P 5 0 1M", "write -P 6 3M 64k")
        refused = pair.agent.hvrctl("vm", "sync-now", "sr", check=False)
        assert refused.returncode != 0 and "Suspended" in refused.stderr
        assert pair.replica("sr")["last_applied_sequence"] == applied_before
        pair.agent.hvrctl("vm", "resume", "sr")
        pair.sync("sr")
        pair.wait_replica_applied("sr")
        pair.assert_identical("sr", [disk])
    finally:
        pair.close()
