"""SIGKILL of the listener at random points during upload and apply.

After every restart the replica converges: every cycle the listener
acknowledged is applied exactly once and in order (the sequence history has
no gap and no duplicate), nothing unacknowledged is half-applied, and the
images equal the expected contents.
"""

from __future__ import annotations

import random
import threading
import time

from replica_vm import SIZE, Vm
from listener_process import ListenerProcess


def _restart(lp: ListenerProcess) -> None:
    lp.start().wait_ready()


def test_sigkill_during_upload_and_apply_at_random_points(tmp_path):
    rng = random.Random(4242)
    lp = ListenerProcess(tmp_path / "l")
    lp.start().wait_ready()
    lp.key, _ = lp.new_key("crashy.example")
    try:
        vm = Vm(lp, "crashvm", disks=2)
        acked = 0
        kills = 0
        seq = 1
        while kills < 22:
            # a cycle big enough that apply takes a while: 3 MiB per disk in 64 KiB records
            ops, updates = [], []
            for i in range(2):
                disk_ops = []
                for _ in range(48):
                    off = rng.randrange(0, SIZE - 65536)
                    data = rng.randbytes(65536)
                    disk_ops.append(("write", off, data))
                    updates.append((i, off, data))
                ops.append(disk_ops)
            body = vm.cycle_body(seq, ops)
            result: dict = {}
            during_upload = kills % 2 == 0

            def upload():
                try:
                    result["reply"] = vm.put_cycle(seq, body)
                except OSError as exc:
                    result["error"] = exc

            t = threading.Thread(target=upload)
            t.start()
            if during_upload:
                time.sleep(rng.uniform(0.0, 0.05))  # a random crash point while the body is in flight
                lp.kill()
                t.join(30)
            else:
                t.join(30)
                time.sleep(rng.uniform(0.0, 0.08))  # a random crash point during apply
                lp.kill()
            kills += 1
            reply = result.get("reply")
            stored = reply is not None and reply.status in (200, 201)
            _restart(lp)
            state = vm.state()
            if not stored:
                # unacknowledged: it may or may not have been stored; if not, send it again
                if state["last_received_sequence"] < seq:
                    assert vm.put_cycle(seq, body).status == 201
            for i, off, data in updates:
                vm.expected[i][off:off + len(data)] = data
            acked = seq
            seq += 1
            st = vm.state()
            assert st["last_applied_sequence"] <= st["last_received_sequence"] == acked
        vm.wait_applied(acked)
        vm.assert_images()
        history = lp.hvrctl_json("replica", "get", "crashvm")["cycles"]
        assert [c["sequence"] for c in history] == list(range(1, acked + 1))
        assert all(c["applied_ns"] for c in history)
        applied_order = [c["applied_ns"] for c in history]
        assert applied_order == sorted(applied_order), "cycles were applied out of order"
        assert not list((lp.storage / str(vm.vm_id) / "incoming").iterdir()), "partial uploads left behind"
        assert not list((lp.storage / str(vm.vm_id) / "cycles").iterdir()), "applied cycle files left behind"
    finally:
        lp.close()
