"""Backup of replica VMs, end to end: a real agent and listener, independent readers of the backup.

A backup held while cycles keep applying must read back, through its NBD
export (``qemu-img compare``) and as the files ``hvrctl backup export``
writes, exactly as the primary image was at the point's cut; and the gate must
refuse, with the condition's own transient code, where consistency cannot be
guaranteed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from daemons import wait_for
from hvr_common.shell.key_file import read_key
from listener_process import call_json
from replication_pair import MiB, Pair, make_disk, qemu_io

SIZE = 16 * MiB


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}).start()
    yield p
    p.close()


def write_cycle(pair: Pair, vm: str, disks: list[Path], rng: random.Random, pattern: int) -> int:
    for d in disks:
        cmds = []
        for _ in range(5):
            length = rng.choice([4096, 65536, 512 * 1024])
            cmds.append(f"write -P {pattern} {rng.randrange(0, SIZE - length) & ~511} {length}")
        cmds.append(f"discard {rng.randrange(0, SIZE // 2) & ~65535} 65536")
        qemu_io(pair.agent.nbd_uri(vm, d.stem), *cmds)
    pair.sync(vm)
    return pair.wait_replica_applied(vm)


def protect(pair: Pair, tmp_path: Path, vm: str, ndisks: int = 2) -> list[Path]:
    disks = [make_disk(tmp_path / f"{vm}-d{i}.img", SIZE) for i in range(ndisks)]
    pair.protect(vm, disks, frequency=300)
    pair.initial(vm)
    pair.wait_replica_applied(vm)
    return disks


def hvrctl(pair: Pair, *args: str) -> subprocess.CompletedProcess:
    return pair.listener.hvrctl("backup", *args, "-o", "json", check=False, timeout_s=120)


def refused_with(pair: Pair, vm: str, *args: str) -> str:
    """Begin a backup that must be refused; the error code (exit 75: transient, a product retries)."""
    result = hvrctl(pair, "begin", vm, *args)
    assert result.returncode == 75, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    return json.loads(result.stderr)["error"]["code"]


def compare(a: str, b: Path) -> None:
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, str(b)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{a} vs {b}: {result.stdout}{result.stderr}"


def test_a_backup_held_while_cycles_apply_is_the_primary_at_its_point(pair, tmp_path):
    disks = protect(pair, tmp_path, "web")
    # no history kept: without its pin, the next cycle would replace the backup's point
    pair.agent.hvrctl("vm", "set", "web", "--recovery-history", "0", "--fine-window", "0")
    rng = random.Random(5)
    write_cycle(pair, "web", disks, rng, 3)
    kept = tmp_path / "kept"
    kept.mkdir()
    for d in disks:  # the primary as it was at the point's cut
        subprocess.run(["cp", "--sparse=always", str(d), str(kept / f"{d.stem}.raw")], check=True)
    result = hvrctl(pair, "begin", "web")
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    point = view["recovery_point"]
    assert [d["disk"] for d in view["disks"]] == [d.stem for d in disks]
    for pattern in (4, 5, 6):  # cycles keep arriving and applying
        write_cycle(pair, "web", disks, rng, pattern)
    listed = pair.listener.hvrctl_json("recovery-points", "list", "web")
    assert point["id"] in [p["id"] for p in listed], "retention pruned the point under a backup"
    assert pair.listener.hvrctl_json("backup", "get", "web")["recovery_point"]["id"] == point["id"]
    for disk in view["disks"]:
        compare(disk["uri"], kept / f"{disk['disk']}.raw")
    qemu_write = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", view["disks"][0]["uri"]],
                                capture_output=True, text=True, timeout=60)
    assert qemu_write.returncode != 0 or "failed" in (qemu_write.stdout + qemu_write.stderr).lower(), \
        "a backup export must be read-only"
    out = tmp_path / "export"
    result = hvrctl(pair, "export", "web", str(out))
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    for f in files:
        path = Path(f["path"])
        compare(str(path), kept / f"{f['disk']}.raw")
        assert path.stat().st_blocks * 512 < SIZE, f"{path} is not sparse"
    assert not list(out.glob("*.part"))
    ended = json.loads(hvrctl(pair, "end", "web").stdout)
    assert ended["ended"] and ended["read_bytes"] > 0
    gone = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", view["disks"][0]["uri"]],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode != 0, "the backup's export must be gone after end"
    assert hvrctl(pair, "get", "web").returncode == 3
    write_cycle(pair, "web", disks, rng, 7)  # unpinned: retention keeps the latest only
    assert [p["id"] for p in pair.listener.hvrctl_json("recovery-points", "list", "web")] != [point["id"]]
    assert point["id"] not in [p["id"] for p in pair.listener.hvrctl_json("recovery-points", "list", "web")]
    pair.assert_identical("web", disks)


def test_the_gate_refuses_each_condition_with_its_code(pair, tmp_path):
    # initial replication not complete
    fresh = [make_disk(tmp_path / "fresh-d0.img", SIZE)]
    pair.protect("fresh", fresh, frequency=300)
    wait_for(lambda: pair.listener.hvrctl("replica", "get", "fresh", check=False).returncode == 0, 30,
             "the replica of fresh to exist")
    assert refused_with(pair, "fresh") == "backup_initial_replication"

    disks = protect(pair, tmp_path, "web", ndisks=1)
    rng = random.Random(9)
    write_cycle(pair, "web", disks, rng, 1)
    # a point not applied yet
    latest = pair.listener.hvrctl_json("recovery-points", "list", "web")[-1]["id"]
    assert refused_with(pair, "web", "--recovery-point", str(latest + 5)) == "backup_point_not_applied"
    # a second backup of the same VM: a conflict (not transient)
    assert hvrctl(pair, "begin", "web").returncode == 0
    again = hvrctl(pair, "begin", "web")
    assert again.returncode == 4 and json.loads(again.stderr)["error"]["code"] == "backup_running"
    hvrctl(pair, "end", "web")

    # an apply interrupted: the replica image vanishes, the applier retries the stored cycle
    image = pair.replica_image("web", disks[0].stem)
    aside = image.with_name("aside.img")
    os.rename(image, aside)
    qemu_io(pair.agent.nbd_uri("web", disks[0].stem), "write -P 9 0 64k")
    pair.sync("web")
    wait_for(lambda: '"apply_retry"' in pair.listener.stdout_path.read_text(), 60, "the apply to be retried")
    assert refused_with(pair, "web") == "backup_apply_interrupted"
    # an apply failed: the stored cycle is damaged, its apply fails for good (Error)
    [stored] = list((pair.replica_dir("web") / "cycles").glob("*.bundle"))
    with open(stored, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.rename(aside, image)
    wait_for(lambda: pair.replica("web")["state"] == "Error", 90, "the replica to fail")
    assert refused_with(pair, "web") == "backup_apply_failed"


@pytest.mark.slow
def test_the_gate_refuses_while_health_is_critical(pair, tmp_path):
    disks = [make_disk(tmp_path / "quiet-d0.img", SIZE)]
    pair.protect("quiet", disks, frequency=30)
    pair.initial("quiet")
    pair.wait_replica_applied("quiet")
    pair.agent.hvrctl("vm", "suspend", "quiet")  # no cycle arrives: two intervals later the replica is Critical
    wait_for(lambda: refused_or_none(pair, "quiet") == "backup_health_critical", 150,
             "health to become Critical", interval_s=2)


def refused_or_none(pair: Pair, vm: str) -> str | None:
    result = hvrctl(pair, "begin", vm)
    if result.returncode == 0:
        hvrctl(pair, "end", vm)
        return None
    return json.loads(result.stderr)["error"]["code"]


def test_a_backup_ends_with_the_listener_process(pair, tmp_path):
    disks = protect(pair, tmp_path, "app", ndisks=1)
    write_cycle(pair, "app", disks, random.Random(4), 2)
    view = json.loads(hvrctl(pair, "begin", "app").stdout)
    uri = view["disks"][0]["uri"]
    pair.listener.terminate()
    pair.listener.start().wait_ready()
    assert hvrctl(pair, "get", "app").returncode == 3, "a backup must not outlive the listener process"
    assert json.loads(hvrctl(pair, "get").stdout) == []
    gone = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", uri], capture_output=True, text=True,
                          timeout=60)
    assert gone.returncode != 0, "the export must be gone after a restart"
    again = hvrctl(pair, "begin", "app")  # a backup product begins again
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["recovery_point"]["id"] == view["recovery_point"]["id"]
    hvrctl(pair, "end", "app")


@pytest.fixture
def hooked_pair(tmp_path):
    """A pair whose agent freezes VM "app" with hooks that succeed (application-consistent cuts)."""
    log = tmp_path / "hooks.log"
    scripts = {}
    for phase in ("freeze", "thaw"):
        script = tmp_path / f"{phase}.sh"
        script.write_text(f'#!/bin/sh\necho "{phase} $1" >> "{log}"\n')
        script.chmod(0o755)
        scripts[phase] = script
    tables = (f'[app_consistency.vm.app]\nfreeze = ["{scripts["freeze"]}", "{{vm}}"]\n'
              f'thaw = ["{scripts["thaw"]}", "{{vm}}"]\ntimeout_s = 20\n\n')
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}, agent_tables=tables).start()
    yield p
    p.close()


def test_an_application_consistent_point_gives_an_application_consistent_backup(hooked_pair, tmp_path):
    pair = hooked_pair
    disk = make_disk(tmp_path / "app.img", SIZE)
    pair.agent.add_vm("app", [disk])
    pair.agent.hvrctl("vm", "enable", "app", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path), "--frequency", "900", "--app-consistent-hours", "1")
    qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 7 0 1M")
    pair.initial("app")  # the first cycle, cut right after the copy, is frozen
    wait_for(lambda: pair.listener.hvrctl_json("recovery-points", "list", "app"), 60, "the first point")
    pair.wait_replica_applied("app")
    at_cut = tmp_path / "at-cut.raw"
    subprocess.run(["cp", "--sparse=always", str(disk), str(at_cut)], check=True)
    [app_point] = pair.listener.hvrctl_json("recovery-points", "list", "app")
    assert app_point["consistency"] == "application"
    write_cycle(pair, "app", [disk], random.Random(8), 9)  # a crash-consistent point after it
    result = hvrctl(pair, "begin", "app", "--recovery-point", str(app_point["id"]))
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["recovery_point"]["consistency"] == "application"
    compare(view["disks"][0]["uri"], at_cut)
    hvrctl(pair, "end", "app")


def test_a_backup_is_refused_while_the_primary_resynchronizes_the_replica(pair, tmp_path):
    """The replica stays Replicating through a resync; the primary's resync digest queries tell the listener,
    whose gate then refuses (backup_resync_running) until the resync completes."""
    disks = protect(pair, tmp_path, "web", ndisks=1)
    write_cycle(pair, "web", disks, random.Random(4), 1)
    replica = pair.listener.hvrctl_json("replica", "get", "web")
    disk = replica["disks"][0]
    path = f"/v1/replicas/{replica['vm_id']}/digests/{disk['disk_id']}"
    query = {"size_bytes": disk["size_bytes"], "level": 0, "indices": [0]}
    key = read_key(pair.key_path)
    # a verify's query reads only: a backup may begin
    assert call_json(pair.listener.port, "POST", path, dict(query, purpose="verify"), key=key).status == 200
    assert hvrctl(pair, "begin", "web").returncode == 0
    assert hvrctl(pair, "end", "web").returncode == 0
    # a resync's query: the replica is not trusted until the resync completes
    assert call_json(pair.listener.port, "POST", path, dict(query, purpose="resync"), key=key).status == 200
    assert refused_with(pair, "web") == "backup_resync_running"
    assert pair.listener.hvrctl_json("replica", "get", "web")["state"] == "Replicating"
    # a real resync of the VM ends it (resync/complete)
    assert pair.agent.hvrctl("vm", "resync", "web", "--wait", timeout_s=300).returncode == 0
    wait_for(lambda: hvrctl(pair, "begin", "web").returncode == 0, 60, "a backup to be admitted after the resync")


def test_a_backup_is_refused_while_a_failover_of_the_replica_runs(pair, tmp_path):
    disks = protect(pair, tmp_path, "web", ndisks=1)
    write_cycle(pair, "web", disks, random.Random(6), 3)
    failover = ("--agent-socket", str(pair.workdir / "no-agent.sock"), "-o", "json")  # no agent on this host
    started = pair.listener.hvrctl("failover", "start", "web", "--force", *failover, timeout_s=120)
    assert json.loads(started.stdout)["state"] == "FailedOverWaitingCompletion"
    assert refused_with(pair, "web") == "backup_failover_running"
    pair.listener.hvrctl("failover", "stop", "web", *failover, timeout_s=120)  # cancelled: Replicating again
    assert hvrctl(pair, "begin", "web").returncode == 0
    assert hvrctl(pair, "end", "web").returncode == 0
