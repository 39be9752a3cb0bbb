"""Replication end to end: a real agent and a real listener on loopback.

Independent clients (qemu-io, fio, libnbd) write through the agent; the
replica images are compared with the primary's using ``qemu-img compare``.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from replication_pair import MiB, Pair, make_disk, qemu_io

CLIENTS = Path(__file__).resolve().parents[1] / "support" / "clients"


@pytest.fixture(params=["journal", "bitmap"])
def pair(tmp_path, request):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}, tracking=request.param).start()
    yield p
    p.close()


def random_writes(uri: str, rng: random.Random, size: int, count: int) -> None:
    cmds = []
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 300_000])
        off = rng.randrange(0, size - length)
        if rng.random() < 0.1:
            cmds.append(f"write -z {off} {length}")
        elif rng.random() < 0.1:
            cmds.append(f"discard {off} {length}")
        else:
            cmds.append(f"write -P {rng.randrange(256)} {off} {length}")
    qemu_io(uri, *cmds)


def test_initial_replication_and_cycles_keep_the_replica_identical(pair, tmp_path):
    size = 32 * MiB
    disks = [make_disk(tmp_path / "sys.img", size), make_disk(tmp_path / "data.img", size)]
    pair.agent.add_vm("web", disks)
    assert [v["tracking"] for v in pair.agent.list_vms()] == [pair.tracking]
    rng = random.Random(7)
    for d in disks:  # data before replication starts: the initial copy must carry it
        random_writes(pair.agent.nbd_uri("web", d.stem), rng, size, 30)
    pair.agent.hvrctl("vm", "enable", "web", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path), "--frequency", "30")
    assert pair.status("web")["state"] == "ReadyForInitialReplication"
    assert pair.replica("web")["state"] == "WaitingForInitialReplication"
    pair.initial("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", disks)
    for round_no in range(3):
        for d in disks:
            random_writes(pair.agent.nbd_uri("web", d.stem), rng, size, 40)
        pair.sync("web")
        pair.wait_replica_applied("web")
        pair.assert_identical("web", disks)
    st = pair.status("web")
    assert st["state"] == "Replicating"
    measure = pair.agent.hvrctl_json("vm", "measure", "web", "-o", "json")
    assert measure["SuccessfulReplicationCount"] >= 3
    assert measure["MissedReplicationCount"] == 0 and measure["ReplicationErrors"] == 0
    assert measure["LastAppliedLogTime"] and measure["LastReplicationTime"]
    assert measure["LastAppliedLogTime"] <= measure["LastReplicationTime"]
    history = pair.replica("web")["cycles"]
    seqs = [c["sequence"] for c in history]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_writes_during_initial_replication_are_shipped_right_after(pair, tmp_path):
    size = 48 * MiB
    disk = make_disk(tmp_path / "busy.img", size)
    pair.agent.add_vm("busy", [disk])
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(5).randbytes(size))  # incompressible: the copy takes a while
    qemu_io(pair.agent.nbd_uri("busy", "busy"), f"write -s {noise} 0 {size}")
    pair.agent.hvrctl("vm", "enable", "busy", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path), "--frequency", "30")
    # the agent's bandwidth cap makes the copy last about 4 s, whatever the machine's speed
    pair.agent.hvrctl("server", "set", "--bandwidth", "12MiB/s")
    pair.agent.hvrctl("initial", "start", "busy")
    rng = random.Random(3)
    deadline = time.monotonic() + 60
    rounds = 0
    while pair.status("busy")["state"] != "Replicating":
        random_writes(pair.agent.nbd_uri("busy", "busy"), rng, size, 10)
        rounds += 1
        assert time.monotonic() < deadline, "initial replication did not finish"
    assert rounds >= 1, "no write landed while the initial copy was running"
    pair.agent.hvrctl("server", "set", "--reset-transfers")
    pair.sync("busy")
    pair.wait_replica_applied("busy")
    pair.assert_identical("busy", [disk])


def test_multi_disk_consistency_b_never_ahead_of_a(pair, tmp_path):
    size = 8 * MiB
    disks = [make_disk(tmp_path / "a.img", size), make_disk(tmp_path / "b.img", size)]
    pair.protect("cnt", disks, frequency=900)  # only sync-now cuts: nothing applies while we read
    pair.initial("cnt")
    writer = subprocess.Popen(["/usr/bin/python3", str(CLIENTS / "counter_writer.py"),
                               pair.agent.nbd_uri("cnt", "a"), pair.agent.nbd_uri("cnt", "b"), "10"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and writer.poll() is None:
            pair.sync("cnt")
            pair.wait_replica_applied("cnt")
            a = int.from_bytes(pair.replica_image("cnt", "a").read_bytes()[:8], "little")
            b = int.from_bytes(pair.replica_image("cnt", "b").read_bytes()[:8], "little")
            seen.append((a, b))
            assert b <= a <= b + 1, f"replica shows A={a}, B={b}: not a crash-consistent cut"
    finally:
        writer.kill()
        writer.wait()
    assert len(seen) >= 3 and seen[-1][0] > 0, f"too few samples or the writer never wrote: {seen}"


def test_enabling_again_never_mixes_an_old_replica_with_a_new_copy(pair, tmp_path):
    size = 8 * MiB
    disk = make_disk(tmp_path / "re.img", size)
    pair.protect("re", [disk], frequency=900)
    qemu_io(pair.agent.nbd_uri("re", "re"), "write -P 1 0 2M")
    pair.initial("re")
    pair.agent.hvrctl("vm", "remove", "re", "--replication-only")
    qemu_io(pair.agent.nbd_uri("re", "re"), "write -P 2 0 1M")  # changes nobody ships
    again = pair.agent.hvrctl("vm", "enable", "re", "--replica-server", "127.0.0.1", "--port",
                              str(pair.replica_port), "--key", str(pair.key_path), "--frequency", "900", check=False)
    assert again.returncode != 0 and "already has a replica" in again.stderr, again.stderr
    pair.listener.hvrctl("replica", "remove", "re", "--delete-storage")
    pair.agent.hvrctl("vm", "enable", "re", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path), "--frequency", "900")
    pair.initial("re")
    pair.wait_replica_applied("re")
    pair.assert_identical("re", [disk])


def test_sync_now_answers_once_the_acknowledged_cycle_is_cleaned_up_and_counted(pair, tmp_path):
    """The next cut does not wait for an acknowledged cycle's files to be deleted, but
    ``sync-now --wait`` does: when it returns the logs and the bundle (journal mode) are gone and the
    cycle is counted, and ``cycle_shipped`` says where the cycle's time went."""
    size = 8 * MiB
    disk = make_disk(tmp_path / "sys.img", size)
    pair.protect("db", [disk])
    pair.initial("db")
    outbox = pair.agent.state_dir / "outbox" / "db"
    rng = random.Random(11)
    for round_no in range(1, 4):
        random_writes(pair.agent.nbd_uri("db", disk.stem), rng, size, 20)
        pair.sync("db")
        next_seq = pair.status("db")["next_sequence"]
        logs = sorted(int(p.name.split(".")[-2]) for p in tmp_path.glob("sys.img.*.hrl"))
        assert logs and min(logs) >= next_seq, f"acknowledged logs left behind: {logs}, next {next_seq}"
        if pair.tracking == "bitmap":  # cycles stream from the disks: no spool file, ever
            assert not outbox.exists() or not list(outbox.iterdir()), f"spool files: {list(outbox.iterdir())}"
        else:
            assert outbox.is_dir() and not list(outbox.iterdir()), f"bundles left behind: {list(outbox.iterdir())}"
        assert pair.agent.hvrctl_json("vm", "measure", "db", "-o", "json")["SuccessfulReplicationCount"] >= round_no
    shipped = [json.loads(line) for line in pair.agent.stdout_path.read_text().splitlines()
               if '"cycle_shipped"' in line]
    assert shipped
    for ev in shipped:
        for field in ("latency_s", "build_s", "upload_s", "commit_s"):
            assert isinstance(ev[field], (int, float)) and ev[field] >= 0, (field, ev)
        assert ev["build_s"] + ev["upload_s"] <= ev["latency_s"] + 0.01
