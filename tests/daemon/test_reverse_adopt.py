"""Reverse replication onto an old primary: ``replica adopt --from-agent`` and the kept-aside recovery point.

Two sites on loopback (``tests/support/two_sites.py``).  The VM replicates
from site A to site B; site A is lost (its agent killed) after writes that
never reached B; B's copy becomes the primary (its agent serves a copy of the
replica image); A's images are adopted by A's listener with their own state
kept aside; B replicates back with ``--use-existing``: only the differences
travel, A ends equal to B, and A's unreplicated writes stay readable as the
pinned ``kept-aside`` point until the operator releases it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from daemons import client_env, wait_for
from two_sites import MiB, TwoSites, images_equal, qemu_io, sparse_copy


@pytest.fixture
def sites(tmp_path):
    with TwoSites(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}) as two:
        yield two


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_adopt_from_agent_refuses_a_running_vm_then_adopts_its_images_and_repeats(sites):
    a = sites.a
    disk = a.make_disk("sys", 8 * MiB)
    vm = a.add_vm("web", [disk], tracking="bitmap")
    a.write("web", "sys", "write -P 0x5a 1M 256k")
    before = digest(disk)

    # a VM with a client attached still runs here: refused, nothing changes
    holder = subprocess.Popen(["nbdsh", "-u", a.nbd_uri("web", "sys"), "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE, env=client_env())
    try:
        wait_for(lambda: a.agent_vm("web")["nbd_clients"] == 1, 30, "the NBD client to attach")
        refused = a.hvrctl("replica", "adopt", "web", "--from-agent", "-o", "json", check=False)
        assert refused.returncode == 4, refused.stderr
        assert json.loads(refused.stderr)["error"]["code"] == "adopt_busy"
        assert a.agent_vm("web") is not None
        assert a.adopt_from_agent("web", check=False).returncode == 4
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    wait_for(lambda: a.agent_vm("web")["nbd_clients"] == 0, 30, "the NBD client to go")

    # a crash between the two steps leaves the record written and the VM still in the agent
    a.hvrctl("replica", "adopt", "web", "--vm-id", vm["vm_id"], "--disk", disk, "--keep-aside")
    record = a.hvrctl_json("replica", "adopt", "web", "--from-agent")
    assert record["vm_id"] == vm["vm_id"] and record["keep_aside"] is True and record["removed_from_agent"]
    assert [(d["path"], d["disk_id"], d["size_bytes"]) for d in record["disks"]] == \
        [(str(disk), vm["disks"][0]["disk_id"], 8 * MiB)]
    assert a.agent_vm("web") is None, "the VM is no longer the agent's"
    assert digest(disk) == before, "the images are left as they were"

    again = a.hvrctl_json("replica", "adopt", "web", "--from-agent")  # repeating finds it done
    assert {k: again[k] for k in ("vm_id", "disks", "keep_aside")} == \
        {k: record[k] for k in ("vm_id", "disks", "keep_aside")}


def take_over_at_b(sites, tmp_path):
    """A replicates to B; A is lost after writes B never got; B's copy becomes the primary and is written;
    A's images are adopted as the replica of B's VM, their state kept aside.  Returns (A's image, B's
    image, the copy of A's image before the reverse, the diverged bytes)."""
    a, b = sites.a, sites.b
    disk_a = a.make_disk("sys", 32 * MiB)
    a.add_vm("web", [disk_a], tracking="bitmap")
    a.write("web", "sys", *[f"write -P {0x10 + i} {i * 3}M 1M" for i in range(8)])
    a.enable("web", frequency=300, extra=("--no-compression",))
    a.initial("web")
    a.write("web", "sys", "write -P 0x30 2M 64k")
    sites.sync(a, "web")

    # site A is lost: its agent dies; writes that never reached B land in its image
    a.kill_agent()
    qemu_io(disk_a, "write -P 0xa5 4M 256k", "write -P 0xa6 20M 64k")
    kept_before = sparse_copy(disk_a, tmp_path / "a-before-reverse.img")

    # site B's copy becomes the primary: its agent serves a copy of the replica image, which the VM writes
    replica_b = b.replica_image("web", "sys")
    b.listener.hvrctl("replica", "remove", "web")
    disk_b = sparse_copy(replica_b, b.images / "sys.img")
    vm_b = b.add_vm("web", [disk_b], tracking="bitmap")
    b.write("web", "sys", "write -P 0xb1 4352k 256k", "write -P 0xb2 12M 128k")

    # A's images become the replica of B's VM, their own state kept aside (the agent of A is gone, so the
    # adoption names the images; --from-agent needs B's VM to carry A's VM id, which the failover gives)
    a.hvrctl("replica", "adopt", "web", "--vm-id", vm_b["vm_id"], "--disk", disk_a, "--keep-aside")
    return disk_a, disk_b, kept_before, 256 * 1024 + 64 * 1024 + 256 * 1024 + 128 * 1024


def kept_point(site) -> dict:
    kept = [p for p in site.points("web") if p["label"] == "kept-aside"]
    assert len(kept) == 1, site.points("web")
    return kept[0]


def assert_kept_reads_as(site, image) -> None:
    view = site.listener.hvrctl_json("failover", "start", "web", "--as-test", "--recovery-point",
                                     kept_point(site)["id"])
    try:
        same, why = images_equal(view["disks"][0]["uri"], image)
        assert same, f"the kept-aside point differs from A's image before the reverse: {why}"
    finally:
        site.listener.hvrctl("failover", "stop", "web", "--as-test")


def test_reverse_replication_sends_only_differences_and_keeps_the_old_primarys_writes_aside(sites, tmp_path):
    a, b = sites.a, sites.b
    disk_a, disk_b, kept_before, diverged = take_over_at_b(sites, tmp_path)
    sites.reset_counts()
    b.enable("web", frequency=300, extra=("--no-compression", "--fine-window", "0"))
    b.initial("web", use_existing=True)
    sites.wait_applied(b, "web")
    sent = sites.sent_bytes(b)
    same, why = images_equal(disk_a, disk_b)
    assert same, why
    assert sent <= 2 * diverged + 512 * 1024, f"{sent} bytes on the wire for {diverged} diverged bytes"
    assert sites.sent_bytes(a) == 0

    assert_kept_reads_as(a, kept_before)
    b.write("web", "sys", "write -P 0xb3 4M 1M", "write -P 0xb4 20M 64k")  # over A's kept writes again
    sites.sync(b, "web")
    same, why = images_equal(disk_a, disk_b)
    assert same, why
    assert_kept_reads_as(a, kept_before)

    point = kept_point(a)["id"]
    released = a.listener.hvrctl_json("recovery-points", "release", "web", point)
    assert released["released"] == point and released["points_dropped"] == 1
    assert all(p["id"] != point for p in a.points("web")), "released, retention dropped it"
    same, why = images_equal(disk_a, disk_b)
    assert same, why


def test_the_old_primarys_listener_killed_during_the_reverse_finishes_it_after_restart(sites, tmp_path):
    a, b = sites.a, sites.b
    disk_a, disk_b, kept_before, _ = take_over_at_b(sites, tmp_path)
    b.enable("web", frequency=300, extra=("--no-compression",))
    b.hvrctl("initial", "start", "web", "--use-existing")
    wait_for(lambda: any(a.listener.storage.glob("*/kept-aside.json")), 60, "the reverse to reach site A",
             interval_s=0.01, context=sites.log_tails)
    a.kill_listener()  # SIGKILL somewhere in the compare, the first apply or just after
    a.restart_listener()
    wait_for(lambda: b.replication("web")["state"] == "Replicating"
             and not (b.replication("web").get("resync") or {}).get("running"), 180,
             "the reverse to finish", context=sites.log_tails)
    sites.sync(b, "web", timeout_s=180)
    same, why = images_equal(disk_a, disk_b)
    assert same, why
    assert_kept_reads_as(a, kept_before)
