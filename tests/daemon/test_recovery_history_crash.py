"""SIGKILL of the listener while it captures pre-images, thins and prunes recovery points.

Cycles are made by hand with cut times spread over the past eight hours, so
each apply also thins: fine-window points age out and are merged into the
hourly points, the oldest hourly ones are pruned.  The listener is killed at
a random moment after each upload (during apply and capture, or during the
thinning that follows) and restarted.  At the end every retained point, read
through a test failover view with qemu-img, equals the replica as it was
after that point's cycle.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import time

from daemons import wait_for
from listener_process import ListenerProcess
from replica_vm import SIZE, Vm

HOUR_NS = 3600 * 10 ** 9
KILLS = 22


def set_history(lp: ListenerProcess, name: str, recovery_history: int, fine_window_min: int) -> None:
    """The settings a primary sends (hvrctl vm set), written while the listener is down."""
    db = sqlite3.connect(lp.state_dir / "listener.db")
    with db:
        db.execute("UPDATE replicas SET recovery_history=?, fine_window_min=? WHERE name=?",
                   (recovery_history, fine_window_min, name))
    db.close()


def test_sigkill_during_capture_thinning_and_pruning_keeps_every_point(tmp_path):
    rng = random.Random(515)
    lp = ListenerProcess(tmp_path / "l")
    lp.start().wait_ready()
    lp.key, _ = lp.new_key("crashy.example")
    try:
        vm = Vm(lp, "histvm", disks=2)
        lp.terminate()
        set_history(lp, "histvm", recovery_history=3, fine_window_min=45)
        lp.start().wait_ready()
        truth: dict[int, list[bytes]] = {}
        start_ns = time.time_ns() - 8 * HOUR_NS
        kills = 0
        seq = 1
        while kills < KILLS:
            ops, updates = [], []
            for i in range(2):
                disk_ops = []
                for _ in range(40):
                    off = rng.randrange(0, SIZE - 65536) & ~511
                    data = rng.randbytes(65536)
                    disk_ops.append(("write", off, data))
                    updates.append((i, off, data))
                ops.append(disk_ops)
            body = vm.cycle_body(seq, ops, created_ns=start_ns + seq * 20 * 60 * 10 ** 9)
            assert vm.put_cycle(seq, body).status == 201
            for i, off, data in updates:
                vm.expected[i][off:off + len(data)] = data
            truth[seq] = [bytes(e) for e in vm.expected]
            time.sleep(rng.uniform(0.0, 0.15))  # somewhere in apply, capture or thinning
            lp.kill()
            kills += 1
            lp.start().wait_ready()
            seq += 1
        vm.wait_applied(seq - 1)
        vm.assert_images()
        # the applier thins after it reports the cycle applied: wait until the list holds still
        seen: list = []

        def settled() -> bool:
            seen.append(lp.hvrctl_json("recovery-points", "list", "histvm", "-o", "json"))
            return len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]
        wait_for(settled, 60, "thinning after the last apply to finish", interval_s=0.5)
        listed = seen[-1]
        kept = [p["sequence"] for p in listed]
        assert kept[-1] == seq - 1
        assert 4 <= len(kept) < seq - 1, f"thinning and pruning must have dropped points: {kept}"
        for point in listed:
            view = lp.hvrctl_json("failover", "start", "histvm", "--as-test", "--recovery-point", str(point["id"]),
                                  "-o", "json")
            for i, disk in enumerate(view["disks"]):
                out = tmp_path / "view.img"
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", disk["uri"], str(out)], check=True,
                               capture_output=True, timeout=120)
                assert out.read_bytes() == truth[point["sequence"]][i], \
                    f"point {point['id']} (cycle {point['sequence']}), disk {i} reads wrong after {kills} kills"
            lp.hvrctl("failover", "stop", "histvm", "--as-test")
    finally:
        lp.close()
