"""Failover on the replica server (the listener's half): a real agent replicates to a real listener.

Patterns are written through the agent with qemu-io, one cycle each; the test
keeps a copy of the primary image at each cut.  A failover disk must equal
the copy of its point (``qemu-img compare``); a cancel leaves every recovery
point and the replica image as they were (sha256); a complete removes the
history; the old generation's uploads and heartbeats are refused (409
``stale_generation``) and change nothing; the split-brain guard refuses a
fresh "running" heartbeat unless ``--force``.

The crash test sets ``HVR_TEST_FAILOVER_KILL`` (read by hvr_listener/failover.py;
only tests set it) to a step name: the listener kills itself with SIGKILL right
after that step, and repeating (or cancelling) must finish the verb.

The local agent of the replica server is not running here (``--agent-socket``
names a socket that does not exist): hvrctl must say so and name the disks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import uuid
from pathlib import Path

import pytest

from bundles import bundle, hrl_bytes
from hvr_common.pure.bundle import BundleKind
from hvr_common.shell.key_file import read_key
from listener_process import call, call_json
from replication_pair import MiB, Pair, make_disk, qemu_io

SIZE = 8 * MiB
KILL_ENV = "HVR_TEST_FAILOVER_KILL"


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}, tracking="journal").start()
    yield p
    p.close()


def fo(pair: Pair, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """hvrctl failover ... on the replica server (whose agent is absent)."""
    return pair.listener.hvrctl("failover", *args, "--agent-socket", pair.workdir / "no-agent.sock", "-o", "json",
                                check=check, timeout_s=120)


def fo_json(pair: Pair, *args: str) -> dict:
    return json.loads(fo(pair, *args).stdout)


def sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def points(pair: Pair, vm: str) -> list[dict]:
    return pair.listener.hvrctl_json("recovery-points", "list", vm)


def compare(a: Path, b: Path) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"{a} differs from {b}: {r.stdout}{r.stderr}"


def protect_with_cycles(pair: Pair, tmp_path: Path, vm: str, cycles: int) -> tuple[Path, dict[int, Path]]:
    """One disk, replicated, then ``cycles`` pattern cycles; the copy of the primary at each applied cycle."""
    disk = make_disk(tmp_path / f"{vm}.img", SIZE)
    pair.protect(vm, [disk], frequency=300)
    pair.initial(vm)
    pair.wait_replica_applied(vm)
    rng = random.Random(7)
    copies = {}
    for pattern in range(1, cycles + 1):
        cmds = [f"write -P {pattern} {rng.randrange(0, SIZE - MiB) & ~4095} {rng.choice([4096, 65536, MiB])}"
                for _ in range(4)]
        qemu_io(pair.agent.nbd_uri(vm, disk.stem), *cmds)
        pair.sync(vm)
        seq = pair.wait_replica_applied(vm)
        copies[seq] = tmp_path / f"{vm}-at-{seq}.img"
        copies[seq].write_bytes(disk.read_bytes())
    return disk, copies


def heartbeat(pair: Pair, vm_id: str, generation: int, running: bool):
    key = read_key(pair.key_path)
    return call_json(pair.listener.port, "POST", f"/v1/replicas/{vm_id}/heartbeat",
                     {"running": running, "nbd_clients": 1 if running else 0}, key=key,
                     headers={"X-Hvr-Generation": str(generation)})


def old_generation_cycle(pair: Pair, rep: dict, generation: int):
    """A well-formed cycle of ``generation`` written by hand, as the old primary would send it."""
    key = read_key(pair.key_path)
    vm_id, disk = uuid.UUID(rep["vm_id"]), rep["disks"][0]
    disk_id, size = uuid.UUID(disk["disk_id"]), disk["size_bytes"]
    seq = rep["next_sequence"]
    log = hrl_bytes(vm_id, disk_id, generation, seq, size, [("write", 0, b"\xab" * 4096)])
    body = bundle(BundleKind.CYCLE, vm_id, generation, seq, [(disk_id, size, 0, size, log)])
    return call(pair.listener.port, "PUT", f"/v1/replicas/{vm_id}/cycles/{seq}", body, key=key,
                headers={"X-Hvr-Generation": str(generation)})


def test_failover_to_an_older_point_cancel_latest_complete_with_guard_and_fencing(pair, tmp_path):
    disk, copies = protect_with_cycles(pair, tmp_path, "web", 3)
    rep = pair.replica("web")
    vm_id, image = rep["vm_id"], pair.replica_image("web", disk.stem)
    before_points, before_sha = points(pair, "web"), sha_file(image)
    by_seq = {p["sequence"]: p["id"] for p in before_points}
    oldest_seq = min(copies)
    assert oldest_seq in by_seq, f"the first cycle's point is not kept: {before_points}"

    # the split-brain guard: a fresh heartbeat saying the VM runs refuses the failover
    r = heartbeat(pair, vm_id, 1, running=True)
    assert r.status == 200 and r.json() == {"generation": 1, "state": "Replicating"}
    refused = fo(pair, "start", "web", check=False)
    assert refused.returncode == 4 and "primary_running" in refused.stdout + refused.stderr
    assert "--force" in refused.stdout + refused.stderr and "primary.example" in refused.stdout + refused.stderr
    assert pair.replica("web")["state"] == "Replicating" and pair.replica("web")["generation"] == 1

    # --force overrides: fail over to the oldest point
    view = fo_json(pair, "start", "web", "--recovery-point", str(by_seq[oldest_seq]), "--force")
    assert (view["state"], view["generation"], view["recovery_point"]) == (
        "FailedOverWaitingCompletion", 2, by_seq[oldest_seq])
    assert view["agent"] is None and view["disks"][0]["path"] in view["note"]
    failover_disk = Path(view["disks"][0]["path"])
    compare(failover_disk, copies[oldest_seq])
    assert failover_disk.stat().st_blocks * 512 < SIZE, "the failover disk must stay sparse"

    # fenced: the old generation's cycle and heartbeat are refused and change nothing
    r = old_generation_cycle(pair, rep, 1)
    assert (r.status, r.code) == (409, "stale_generation")
    assert (heartbeat(pair, vm_id, 1, running=True).code) == "stale_generation"
    after = pair.replica("web")
    assert after["last_received_sequence"] == rep["last_received_sequence"] and sha_file(image) == before_sha
    assert after["failover"]["step"] == "waiting_completion" and after["health"] == "Warning"

    # repeating answers the same; another point, or a test failover, is refused while waiting completion
    again = fo_json(pair, "start", "web")
    assert again["recovery_point"] == view["recovery_point"] and again["generation"] == 2
    other = fo(pair, "start", "web", "--recovery-point", str(by_seq[max(copies)]), check=False)
    assert other.returncode == 4 and "failover_in_progress" in other.stdout + other.stderr
    assert pair.listener.hvrctl("failover", "start", "web", "--as-test", check=False).returncode == 4

    # cancel: every point and the replica image as they were, the generation back, the disks gone
    stopped = fo_json(pair, "stop", "web")
    assert (stopped["state"], stopped["generation"], stopped["cancelled"]) == ("Replicating", 1, True)
    assert [(p["id"], p["sequence"]) for p in points(pair, "web")] == [(p["id"], p["sequence"])
                                                                       for p in before_points]
    assert sha_file(image) == before_sha and not failover_disk.parent.exists()
    assert pair.replica("web")["failover"] is None
    assert fo(pair, "stop", "web", check=False).returncode == 4  # not_failed_over

    # fail over to the latest point; complete waits for a backup that stands on the history
    pair.listener.hvrctl("backup", "begin", "web")
    view = fo_json(pair, "start", "web", "--force")
    assert view["recovery_point"] == before_points[-1]["id"] and view["generation"] == 2
    compare(failover_disk, copies[max(copies)])
    held = fo(pair, "complete", "web", check=False)
    assert held.returncode == 4 and "backup_running" in held.stdout + held.stderr and image.exists()
    pair.listener.hvrctl("backup", "end", "web")
    done = fo_json(pair, "complete", "web")
    assert (done["state"], done["step"], done["generation"]) == ("FailedOver", "completed", 2)
    assert points(pair, "web") == [] and not image.exists()
    assert not (image.parent / "points").exists()
    compare(failover_disk, copies[max(copies)])
    assert fo_json(pair, "complete", "web")["state"] == "FailedOver"  # idempotent
    # an agent that answers but does not serve the VM as a failed-over one (here the primary's own agent):
    # no agent step to do, said so, with the disks' paths
    older = json.loads(pair.listener.hvrctl("failover", "complete", "web", "--agent-socket",
                                            pair.agent.admin_socket, "-o", "json").stdout)
    assert older["agent"] is None and "older" in older["note"] and str(failover_disk) in older["note"]
    late = fo(pair, "stop", "web", check=False)
    assert late.returncode == 4 and "failover_completed" in late.stdout + late.stderr
    status = pair.replica("web")
    assert status["health"] == "Warning" and status["failover"]["completed_ns"]
    assert (heartbeat(pair, vm_id, 1, running=True).code) == "stale_generation"  # the FailedOver row fences
    r = heartbeat(pair, vm_id, 2, running=False)
    assert r.status == 200 and r.json() == {"generation": 2, "state": "FailedOver"}


def _killed_at(pair: Pair, monkeypatch, step: str, *args: str) -> None:
    """Restart the listener armed to SIGKILL itself after ``step``, run the verb, wait for the kill, restart."""
    pair.listener.terminate()
    monkeypatch.setenv(KILL_ENV, step)
    pair.listener.start().wait_ready()
    monkeypatch.delenv(KILL_ENV)
    fo(pair, *args, check=False)
    assert pair.listener.process.wait(timeout=60) == -9, f"the listener was not killed after {step}"
    pair.listener.start().wait_ready()


def test_sigkill_of_the_listener_at_each_step_then_repeat_or_cancel_finishes_it(pair, tmp_path, monkeypatch):
    disk, copies = protect_with_cycles(pair, tmp_path, "db", 2)
    image = pair.replica_image("db", disk.stem)
    before_points, before_sha = points(pair, "db"), sha_file(image)
    latest = copies[max(copies)]
    failover_dir = image.parent / "failover"

    # killed right after the generation was raised: the disks are not made yet; repeating makes them
    _killed_at(pair, monkeypatch, "started", "start", "db")
    rep = pair.replica("db")
    assert (rep["state"], rep["generation"]) == ("FailedOverWaitingCompletion", 2)
    view = fo_json(pair, "start", "db")
    compare(Path(view["disks"][0]["path"]), latest)

    # killed while cancelling, after the disks were deleted: cancelling again finishes
    _killed_at(pair, monkeypatch, "disks_removed", "stop", "db")
    assert pair.replica("db")["state"] == "FailedOverWaitingCompletion"
    assert fo_json(pair, "stop", "db")["state"] == "Replicating"

    # killed after a disk was written but before its rename: a cancel removes the leftover, loses nothing
    _killed_at(pair, monkeypatch, "disk_written", "start", "db")
    assert list(failover_dir.glob("*.part")) and not list(failover_dir.glob("*.img"))
    assert fo_json(pair, "stop", "db")["generation"] == 1
    assert not failover_dir.exists() and sha_file(image) == before_sha
    assert [p["id"] for p in points(pair, "db")] == [p["id"] for p in before_points]

    # completing, killed after each of its steps: repeating completes
    fo_json(pair, "start", "db")
    _killed_at(pair, monkeypatch, "completing", "complete", "db")
    assert fo(pair, "stop", "db", check=False).returncode == 4  # complete began: no cancel any more
    _killed_at(pair, monkeypatch, "history_removed", "complete", "db")
    assert not image.exists()
    done = fo_json(pair, "complete", "db")
    assert (done["state"], done["generation"]) == ("FailedOver", 2)
    compare(Path(done["disks"][0]["path"]), latest)
    assert pair.replica("db")["failover"]["step"] == "completed"
    assert os.listdir(failover_dir) == [f"{disk.stem}.img"]
