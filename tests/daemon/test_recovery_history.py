"""Recovery history and test failover, end to end: a real agent and listener, independent NBD clients.

Patterns are written through the agent with qemu-io, one cycle each; a copy
of the primary image is kept at each cut.  Every retained point, served as a
test failover view and read by ``qemu-img convert`` from its nbd+unix URI,
must equal the copy taken at its cut.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from replication_pair import MiB, Pair, make_disk, qemu_io

SIZE = 16 * MiB


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}).start()
    yield p
    p.close()


def read_view(uri: str, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True,
                   capture_output=True, timeout=120)
    data = out.read_bytes()
    out.unlink()
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_cycle(pair: Pair, vm: str, disks: list[Path], rng: random.Random, pattern: int) -> int:
    """Write a pattern to every disk through the agent, ship it as one cycle; the sequence it was applied as."""
    for d in disks:
        cmds = []
        for _ in range(6):
            length = rng.choice([4096, 65536, 512 * 1024])
            off = rng.randrange(0, SIZE - length) & ~511
            cmds.append(f"write -P {pattern} {off} {length}")
        if rng.random() < 0.3:
            cmds.append(f"discard {rng.randrange(0, SIZE // 2) & ~65535} 65536")
        qemu_io(pair.agent.nbd_uri(vm, d.stem), *cmds)
    pair.sync(vm)
    return pair.wait_replica_applied(vm)


def start_test(pair: Pair, vm: str, *args: str) -> dict:
    return pair.listener.hvrctl_json("failover", "start", vm, "--as-test", *args, "-o", "json")


def stop_test(pair: Pair, vm: str) -> dict:
    return pair.listener.hvrctl_json("failover", "stop", vm, "--as-test", "-o", "json")


def points(pair: Pair, vm: str) -> list[dict]:
    return pair.listener.hvrctl_json("recovery-points", "list", vm, "-o", "json")


def protect(pair: Pair, tmp_path: Path, vm: str, ndisks: int = 2) -> list[Path]:
    disks = [make_disk(tmp_path / f"{vm}-d{i}.img", SIZE) for i in range(ndisks)]
    pair.protect(vm, disks, frequency=300)
    pair.initial(vm)
    pair.wait_replica_applied(vm)
    return disks


def test_every_retained_point_reads_back_as_the_primary_was_at_its_cut(pair, tmp_path):
    disks = protect(pair, tmp_path, "web")
    rng = random.Random(11)
    copies: dict[int, list[bytes]] = {}
    for pattern in range(1, 6):
        seq = write_cycle(pair, "web", disks, rng, pattern)
        copies[seq] = [d.read_bytes() for d in disks]  # the primary as it was at this cut
    listed = points(pair, "web")
    assert {"id", "time", "sequence", "consistency", "size_bytes"} <= set(listed[0])
    by_seq = {p["sequence"]: p for p in listed}
    assert set(copies) <= set(by_seq), f"cycles {sorted(copies)} are not all points: {sorted(by_seq)}"
    assert listed[-1]["latest"] and listed[-1]["sequence"] == max(copies)
    assert all(p["consistency"] == "crash" for p in listed)
    assert sum(p["size_bytes"] for p in listed[:-1]) > 0, "older points must hold pre-images"
    for seq, expected in copies.items():
        view = start_test(pair, "web", "--recovery-point", str(by_seq[seq]["id"]))
        assert view["test_vm"] == "web - Test" and view["recovery_point"]["sequence"] == seq
        for disk, want in zip(view["disks"], expected):
            got = read_view(disk["uri"], tmp_path / "view.img")
            assert sha(got) == sha(want), f"point of cycle {seq}, disk {disk['disk']}: not the primary at its cut"
        stop_test(pair, "web")
    replica = pair.replica("web")
    assert replica["recovery_points"] == len(listed) and replica["recovery_points_bytes"] > 0
    assert replica["last_test_failover_time"] and replica["test_failover"] is None
    pair.assert_identical("web", disks)


def test_a_test_failover_keeps_its_point_while_cycles_apply(pair, tmp_path):
    disks = protect(pair, tmp_path, "db")
    rng = random.Random(12)
    write_cycle(pair, "db", disks, rng, 7)
    at_cut = [d.read_bytes() for d in disks]
    view = start_test(pair, "db")  # the latest point
    uris = [d["uri"] for d in view["disks"]]
    assert [sha(read_view(u, tmp_path / "v.img")) for u in uris] == [sha(b) for b in at_cut]
    for pattern in (8, 9, 10):  # replication and apply go on
        write_cycle(pair, "db", disks, rng, pattern)
        assert [sha(read_view(u, tmp_path / "v.img")) for u in uris] == [sha(b) for b in at_cut]
    # the test VM writes: it sees its writes, the replica does not
    qemu_io(uris[0], "write -P 0xEE 0 1M")
    seen = read_view(uris[0], tmp_path / "v.img")
    assert seen[:MiB] == b"\xee" * MiB and seen[MiB:] == at_cut[0][MiB:]
    pair.assert_identical("db", disks)
    overlay_dir = pair.replica_dir("db") / "test-failover"
    assert overlay_dir.is_dir()
    stopped = stop_test(pair, "db")
    assert stopped["stopped"] and stopped["deleted_bytes"] >= MiB
    assert not overlay_dir.exists()
    result = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", uris[0]], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0, "the test VM's export must be gone after stop"
    write_cycle(pair, "db", disks, rng, 11)
    pair.assert_identical("db", disks)


def test_bad_test_failover_requests_are_refused_and_change_nothing(pair, tmp_path):
    disks = protect(pair, tmp_path, "app", ndisks=1)
    write_cycle(pair, "app", disks, random.Random(3), 5)
    before = points(pair, "app")

    def refused(*args: str) -> subprocess.CompletedProcess:
        result = pair.listener.hvrctl(*args, check=False)
        assert result.returncode != 0
        return result

    bad = refused("failover", "start", "app", "--as-test", "--recovery-point", "999999")
    assert bad.returncode == 3 and "no recovery point 999999" in bad.stderr and "recovery-points list" in bad.stderr
    # (without --as-test, failover start is the real failover: tests/daemon/test_failover_listener.py)
    assert refused("failover", "start", "app", "--as-test", "--force").returncode == 2  # no --force for a test
    assert refused("failover", "stop", "app", "--as-test").returncode == 3
    assert refused("failover", "start", "nosuchvm", "--as-test").returncode == 3
    start_test(pair, "app")
    second = refused("failover", "start", "app", "--as-test")
    assert second.returncode == 4 and "already running" in second.stderr
    removing = refused("replica", "remove", "app")
    assert removing.returncode == 4
    stop_test(pair, "app")
    # a VM still in initial replication has no point to test
    late = make_disk(tmp_path / "late.img", SIZE)
    pair.protect("late", [late])
    waiting = refused("failover", "start", "late", "--as-test")
    assert waiting.returncode == 4 and "WaitingForInitialReplication" in waiting.stderr
    assert points(pair, "app") == before
    assert pair.replica("app")["test_failover"] is None
    assert not (pair.replica_dir("late") / "test-failover").exists()
