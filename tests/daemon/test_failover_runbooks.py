"""The failover runbooks end to end on two sites (docs/failover.md), as an operator types them on each host.

Two sites on loopback (``tests/support/two_sites.py``): site A and site B,
each an agent and a listener with their own state, storage and sockets; what
one site sends the other is counted by a proxy in front of each listener.
Writes go through the agents' NBD sockets (qemu-io); the test keeps a sparse
copy of the primary image at each step and ``qemu-img compare`` checks every
disk against the copy of its step.

* planned: prepare on A, fail over on B, reverse B -> A, write through B,
  sync, then fail back the same way; each reverse sends far less than a disk;
* unplanned: A's agent killed; fail over to an older point; cancel; fail over
  to another point; complete; A's agent returns and is fenced; reverse; A's
  unreplicated writes read as the kept-aside point; converge;
* SIGKILL in the middle of prepare, failover, complete and reverse: repeating
  the command finishes it, nothing lost (``HVR_TEST_FAILOVER_KILL`` is the
  listener's test-only kill point);
* the split-brain guard refuses while the primary answers that its VM runs;
  ``--force`` overrides and the fencing still protects the new primary;
* a cycle received but not applied when B fails over to the latest point is
  in the failover disk (``HVR_TEST_APPLY_HOLD`` holds the listener's applier).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from daemons import client_env, log_events, wait_for
from two_sites import MiB, Site, TwoSites, assert_same_image as same, qemu_io, sparse_copy

SIZE = 32 * MiB
KILL_ENV = "HVR_TEST_FAILOVER_KILL"
HOLD_ENV = "HVR_TEST_APPLY_HOLD"
FENCED = "was failed over at the replica server (generation 2 there, 1 here)"


@pytest.fixture
def sites(tmp_path):
    with TwoSites(tmp_path, agent_config={"initial_window_bytes": 4 * MiB, "heartbeat_s": 1}) as two:
        yield two


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def protect_at_a(sites: TwoSites, tmp_path: Path) -> Path:
    a = sites.a
    disk = a.make_disk("sys", SIZE)
    a.add_vm("web", [disk], tracking="bitmap")
    a.write("web", "sys", *[f"write -P {0x10 + i} {i * 3}M 1M" for i in range(8)])
    a.enable("web", frequency=300, extra=("--no-compression",))
    a.initial("web")
    sites.wait_applied(a, "web")
    return disk


def settled(site: Site, sites: TwoSites) -> bool:
    st = site.replication("web")
    assert st["state"] != "Error", f"{st.get('state_detail')}\n{sites.log_tails()}"
    return st["state"] == "Replicating" and not (st.get("resync") or {}).get("running")


def reverse_to(new: Site, sites: TwoSites, *, timeout_s: float = 180) -> int:
    """``vm set --reverse`` on ``new`` towards the other site, until it replicates; the bytes it sent."""
    sites.reset_counts()
    new.reverse("web", timeout_s=timeout_s)
    wait_for(lambda: settled(new, sites), timeout_s, f"site {new.name}'s reverse to finish", context=sites.log_tails)
    sites.sync(new, "web", timeout_s=timeout_s)
    return sites.sent_bytes(new)


def planned_failover(old: Site, new: Site, sites: TwoSites, tmp_path: Path, step: str,
                     complete: bool = True) -> tuple[Path, Path]:
    """Prepare on ``old``, fail over (and complete) on ``new``, adopt on ``old``: (old's image, new's disk).
    Without ``complete``, the failover waits completion: ``vm set --reverse`` completes it (the issue's
    planned runbook: prepare, fail over, reverse)."""
    old_disk = Path(old.agent_vm("web")["disks"][0]["path"])
    old.prepare("web")
    assert old.replication("web")["state"] == "PreparedForFailover"
    kept = sparse_copy(old_disk, tmp_path / f"{step}-prepared.img")
    same(new.replica_image("web", "sys"), kept)  # nothing lost
    view = new.hvrctl_json("failover", "start", "web")
    assert view["state"] == "FailedOverWaitingCompletion" and view["agent"]["name"] == "web"
    new_disk = Path(view["disks"][0]["path"])
    same(new_disk, kept)
    if complete:
        done = new.hvrctl_json("failover", "complete", "web")
        assert done["state"] == "FailedOver" and done["agent"]["failover"] == "completed"
    old.adopt_from_agent("web")
    assert old.agent_vm("web") is None
    same(old_disk, kept)
    return old_disk, new_disk


def test_planned_failover_reverse_and_fail_back_send_no_disk_copy(sites, tmp_path):
    a, b = sites.a, sites.b
    disk_a = protect_at_a(sites, tmp_path)
    a.write("web", "sys", "write -P 0x21 5M 64k", "write -P 0x22 30M 4k")  # the last writes before the move

    disk_a, disk_b = planned_failover(a, b, sites, tmp_path, "a-to-b")
    sent = reverse_to(b, sites)
    assert sent < SIZE // 8, f"the reverse B -> A sent {sent} bytes: a disk copy"
    b.write("web", "sys", "write -P 0xb1 7M 128k", "write -P 0xb2 1M 4k")
    sites.sync(b, "web")
    same(disk_a, disk_b)
    at_b = sparse_copy(disk_b, tmp_path / "written-at-b.img")

    # fail back, the same runbook as the issue gives it: prepare, fail over, reverse (which completes)
    disk_b, disk_a = planned_failover(b, a, sites, tmp_path, "b-to-a", complete=False)
    same(disk_a, at_b)
    assert a.replica("web")["state"] == "FailedOverWaitingCompletion"
    sent = reverse_to(a, sites)
    assert a.replica("web")["state"] == "FailedOver"
    assert a.agent_vm("web")["failover"] == "completed"
    assert sent < SIZE // 8, f"the reverse A -> B sent {sent} bytes: a disk copy"
    a.write("web", "sys", "write -P 0xa1 9M 64k")
    sites.sync(a, "web")
    same(disk_a, disk_b)


def test_unplanned_failover_cancel_complete_fencing_reverse_and_the_kept_aside_point(sites, tmp_path):
    a, b = sites.a, sites.b
    disk_a = protect_at_a(sites, tmp_path)
    copies = {}
    for i in range(3):
        a.write("web", "sys", f"write -P {0x40 + i} {4 + 6 * i}M 256k")
        seq = sites.sync(a, "web")
        copies[seq] = sparse_copy(disk_a, tmp_path / f"a-at-{seq}.img")
    by_seq = {p["sequence"]: p["id"] for p in b.points("web")}
    older, newer = sorted(copies)[0], sorted(copies)[1]
    assert older in by_seq and newer in by_seq, b.points("web")
    before_points = [(p["id"], p["sequence"]) for p in b.points("web")]

    # site A is lost: its agent dies; writes that never reached B land in its image
    a.kill_agent()
    qemu_io(disk_a, "write -P 0xa5 12M 256k", "write -P 0xa6 20M 64k")

    view = b.hvrctl_json("failover", "start", "web", "--recovery-point", by_seq[older])
    assert (view["state"], view["generation"]) == ("FailedOverWaitingCompletion", 2)
    same(view["disks"][0]["path"], copies[older])
    stopped = b.hvrctl_json("failover", "stop", "web")
    assert (stopped["state"], stopped["generation"]) == ("Replicating", 1)
    assert [(p["id"], p["sequence"]) for p in b.points("web")] == before_points, "cancel keeps every point"
    assert b.agent_vm("web") is None

    view = b.hvrctl_json("failover", "start", "web", "--recovery-point", by_seq[newer])
    disk_b = Path(view["disks"][0]["path"])
    same(disk_b, copies[newer])
    done = b.hvrctl_json("failover", "complete", "web")
    assert done["state"] == "FailedOver" and b.replica("web")["health"] == "Warning"
    b.write("web", "sys", "write -P 0xb1 13M 64k", "write -P 0xb2 2M 128k")
    b_before = digest(disk_b)

    # site A returns: its agent uploads what it holds and is fenced; nothing changes at B
    a.restart_agent()
    qemu_io(a.nbd_uri("web", "sys"), "write -P 0xa7 25M 4k")
    a.hvrctl("vm", "sync-now", "web", "--no-wait", check=False)
    wait_for(lambda: a.replication("web")["state"] == "Error", 120, "site A's agent to be fenced",
             context=sites.log_tails)
    st = a.replication("web")
    assert FENCED in st["state_detail"] and "hvrctl replica adopt web --from-agent" in st["state_detail"]
    assert log_events(a.agent.stdout_path, "replication_fenced")
    assert digest(disk_b) == b_before and b.replica("web")["generation"] == 2
    a_lost = sparse_copy(disk_a, tmp_path / "a-lost.img")  # its writes B never got, and the one after its return

    a.adopt_from_agent("web")
    sent = reverse_to(b, sites)
    same(disk_a, disk_b)
    assert sent < SIZE // 8, f"the reverse sent {sent} bytes: a disk copy"

    kept = [p for p in a.points("web") if p["label"] == "kept-aside"]
    assert len(kept) == 1, a.points("web")
    test_view = a.listener.hvrctl_json("failover", "start", "web", "--as-test", "--recovery-point", kept[0]["id"])
    try:
        same(test_view["disks"][0]["uri"], a_lost)  # A's unreplicated writes, readable
    finally:
        a.listener.hvrctl("failover", "stop", "web", "--as-test")

    b.write("web", "sys", "write -P 0xb3 12M 1M")  # converge: B goes on replicating to A
    sites.sync(b, "web")
    same(disk_a, disk_b)


def test_sigkill_in_the_middle_of_prepare_failover_complete_and_reverse_then_repeating_finishes(
        sites, tmp_path, monkeypatch):
    a, b = sites.a, sites.b
    disk_a = protect_at_a(sites, tmp_path)
    a.write("web", "sys", *[f"write -P {i} {i * MiB} 512k" for i in range(1, 15)])

    # prepare: A's agent killed once its final cut is made
    cuts = len(log_events(a.agent.stdout_path, "vm_cut"))
    caller = threading.Thread(target=lambda: a.prepare("web", check=False, timeout_s=120))
    caller.start()
    wait_for(lambda: len(log_events(a.agent.stdout_path, "vm_cut")) > cuts, 120, "the final cut of the prepare",
             context=sites.log_tails)
    a.agent.process.send_signal(signal.SIGKILL)
    a.agent.process.wait(timeout=30)
    caller.join(timeout=120)
    a.agent.start().wait_ready()
    a.prepare("web")
    kept = sparse_copy(disk_a, tmp_path / "prepared.img")
    same(b.replica_image("web", "sys"), kept)

    def killed_at(site: Site, step: str, *args) -> None:
        site.listener.terminate()
        monkeypatch.setenv(KILL_ENV, step)
        site.listener.start().wait_ready()
        monkeypatch.delenv(KILL_ENV)
        site.hvrctl(*args, check=False, timeout_s=120)
        assert site.listener.process.wait(timeout=60) == -9, f"the listener was not killed after {step}"
        site.listener.start().wait_ready()

    # failover: B's listener killed after the generation rose, then after a disk was written
    killed_at(b, "started", "failover", "start", "web")
    killed_at(b, "disk_written", "failover", "start", "web")
    view = b.hvrctl_json("failover", "start", "web")
    disk_b = Path(view["disks"][0]["path"])
    same(disk_b, kept)
    assert b.agent_vm("web") is not None

    # complete: B's listener killed after the history was removed
    killed_at(b, "history_removed", "failover", "complete", "web")
    done = b.hvrctl_json("failover", "complete", "web")
    assert done["state"] == "FailedOver" and done["agent"]["failover"] == "completed"
    same(disk_b, kept)

    # reverse: B's agent killed while it brings A's copy in sync, then A's listener; repeating finishes it
    a.adopt_from_agent("web")
    b.write("web", "sys", "write -P 0xb1 3M 64k")
    b.reverse("web")
    b.kill_agent()
    b.restart_agent()
    a.kill_listener()
    a.restart_listener()
    sent = reverse_to(b, sites)
    assert sent < SIZE // 4, f"the repeated reverse sent {sent} bytes"
    same(disk_a, disk_b)


def test_the_split_brain_guard_refuses_while_the_primary_runs_and_fencing_protects_after_force(sites, tmp_path):
    a, b = sites.a, sites.b
    disk_a = protect_at_a(sites, tmp_path)
    holder = subprocess.Popen(["nbdsh", "-u", a.nbd_uri("web", "sys"), "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE, env=client_env())
    try:
        wait_for(lambda: a.agent_vm("web")["nbd_clients"] == 1, 30, "the VM to run at A")
        vm_id = a.replication("web")["vm_id"]
        wait_for(lambda: _heard_running(b, vm_id), 60, "A's heartbeat saying the VM runs", context=sites.log_tails)
        refused = b.hvrctl("failover", "start", "web", "-o", "json", check=False)
        assert refused.returncode == 4, refused.stderr
        err = json.loads(refused.stderr)["error"]
        assert err["code"] == "primary_running" and "site-a.example" in err["message"] and "--force" in err["hint"]
        assert b.replica("web")["state"] == "Replicating" and b.agent_vm("web") is None

        view = b.hvrctl_json("failover", "start", "web", "--force")  # the operator says A is lost
        assert (view["state"], view["generation"], view["forced"]) == ("FailedOverWaitingCompletion", 2, True)
        disk_b = Path(view["disks"][0]["path"])
        before = digest(disk_b)
        qemu_io(a.nbd_uri("web", "sys"), "write -P 0x99 6M 64k")  # A still runs and writes
        a.hvrctl("vm", "sync-now", "web", "--no-wait", check=False)
        wait_for(lambda: a.replication("web")["state"] == "Error", 120, "site A's agent to be fenced",
                 context=sites.log_tails)
        assert FENCED in a.replication("web")["state_detail"]
        assert digest(disk_b) == before and b.replica("web")["generation"] == 2
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert digest(disk_a) != before


def _heard_running(site: Site, vm_id: str) -> bool:
    """Whether the replica server holds a heartbeat saying the VM runs (read-only look at its store)."""
    db = sqlite3.connect(f"file:{site.listener.state_dir / 'listener.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT running FROM heartbeats WHERE vm_id=?", (vm_id,)).fetchone()
    finally:
        db.close()
    return bool(row and row[0])


def test_failover_to_the_latest_point_applies_the_cycles_received_but_not_applied(tmp_path, monkeypatch):
    hold = tmp_path / "hold-applies"
    monkeypatch.setenv(HOLD_ENV, str(hold))
    with TwoSites(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}) as sites:
        a, b = sites.a, sites.b
        disk_a = protect_at_a(sites, tmp_path)
        hold.touch()  # B's applier leaves what arrives now unapplied
        a.write("web", "sys", "write -P 0x77 17M 256k")
        a.hvrctl("vm", "sync-now", "web")
        rep = b.replica("web")
        assert rep["last_received_sequence"] > rep["last_applied_sequence"], rep
        a.kill_agent()
        lost_at_a = sparse_copy(disk_a, tmp_path / "a-at-kill.img")

        answer = {}
        caller = threading.Thread(target=lambda: answer.update(b.hvrctl_json("failover", "start", "web")))
        caller.start()
        wait_for(lambda: log_events(b.listener.stdout_path, "failover_waiting_apply"), 60,
                 "the failover to wait for the applier", context=sites.log_tails)
        assert b.replica("web")["state"] == "Replicating"  # nothing decided while it waits
        hold.unlink()
        caller.join(timeout=120)
        assert answer.get("applied_before", 0) >= 1, answer
        same(answer["disks"][0]["path"], lost_at_a)  # the received cycle's writes are in the failover disk
