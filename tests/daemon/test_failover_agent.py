"""Failover on the primary's agent, end to end: planned prepare and cancel, fencing, the heartbeat, SIGKILL.

A real agent and listener on loopback; writes through qemu-io and nbdsh; the
replica checked with ``qemu-img compare``.  The fencing test raises the
replica's generation the way a failover does, by a documented test-only edit
of the listener's store while it is stopped (``replicas.generation``: g -> g + 1).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from daemons import client_env, log_events, wait_for
from two_sites import assert_same_image as compare
from hvr_common.pure.errors import HvrError
from hvrctl.client import AdminClient
from replication_pair import MiB, Pair, make_disk, qemu_io

SIZE = 16 * MiB


def admin(pair: Pair) -> AdminClient:
    return AdminClient(pair.agent.admin_socket, "hvr-agent", timeout_s=300)


def protect(pair: Pair, tmp_path: Path) -> Path:
    disk = make_disk(tmp_path / "sys.img", SIZE)
    pair.protect("web", [disk], frequency=300)
    qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x11 0 1M", "write -P 0x22 5M 64k")
    pair.initial("web")
    return disk


def heard(pair: Pair, vm_id: str) -> tuple[bool, int] | None:
    """The primary's last heartbeat as the listener keeps it (running, NBD clients): a read-only look."""
    db = sqlite3.connect(f"file:{pair.listener.state_dir / 'listener.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT running, nbd_clients FROM heartbeats WHERE vm_id=?", (vm_id,)).fetchone()
    finally:
        db.close()
    return (bool(row[0]), row[1]) if row else None


class HeldClient:
    """An nbdsh connected to an export until closed (the VM "running")."""

    def __init__(self, uri: str):
        self.proc = subprocess.Popen(["nbdsh", "-u", uri, "-c", "import sys; print('up', flush=True); "
                                      "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=client_env())
        assert self.proc.stdout.readline().strip() == "up"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.mark.parametrize("tracking", ["bitmap", "journal"])
def test_prepare_refuses_a_running_vm_then_ships_the_last_writes_verifies_and_cancel_reopens(tmp_path, tracking):
    pair = Pair(tmp_path, agent_config={"heartbeat_s": 1}, tracking=tracking).start()
    try:
        disk = protect(pair, tmp_path)
        api = admin(pair)
        held = HeldClient(pair.agent.nbd_uri("web", "sys"))
        try:
            with pytest.raises(HvrError) as refused:
                api.request("POST", "/v1/vms/web/failover/prepare")
            assert refused.value.code == "vm_running" and refused.value.detail["nbd_clients"] == 1
            assert pair.status("web")["state"] == "Replicating"
        finally:
            held.close()
        qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x33 9M 128k", "write -P 0x44 15M 4k")  # the last writes

        prepared = api.request("POST", "/v1/vms/web/failover/prepare")
        assert prepared["state"] == "PreparedForFailover" and prepared["prepared_sequence"] >= 1
        assert pair.replica("web")["last_applied_sequence"] >= prepared["prepared_sequence"]
        compare(disk, pair.replica_image("web", "sys"))  # nothing lost
        assert pair.status("web")["health"] == "Warning"
        with pytest.raises(Exception):  # the exports take no new writer
            qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x55 0 4k", timeout_s=30)
        again = api.request("POST", "/v1/vms/web/failover/prepare")  # idempotent
        assert again["state"] == "PreparedForFailover" and again["prepared_sequence"] == prepared["prepared_sequence"]

        pair.agent.terminate()  # a restart keeps the state and the closed exports
        pair.agent.start().wait_ready()
        assert pair.status("web")["state"] == "PreparedForFailover"
        with pytest.raises(Exception):
            qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x55 0 4k", timeout_s=30)

        cancelled = api.request("DELETE", "/v1/vms/web/failover/prepare")
        assert cancelled["state"] == "Replicating" and cancelled["prepared_sequence"] is None
        assert api.request("DELETE", "/v1/vms/web/failover/prepare")["state"] == "Replicating"  # idempotent
        qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x66 2M 64k")
        pair.sync("web")
        pair.wait_replica_applied("web")
        compare(disk, pair.replica_image("web", "sys"))
        # the listener keeps the primary's heartbeats: the VM, replicating again with no client, said not running
        assert log_events(pair.agent.stdout_path, "heartbeat_unsupported") == []
        wait_for(lambda: heard(pair, pair.status("web")["vm_id"]) == (False, 0), 60,
                 "a heartbeat saying the VM does not run", context=pair.agent.log_tail)
    finally:
        pair.close()


def test_a_replica_at_a_newer_generation_fences_the_primary_into_error_and_nothing_is_deleted(tmp_path):
    pair = Pair(tmp_path, agent_config={"heartbeat_s": 1}, tracking="journal").start()
    try:
        disk = protect(pair, tmp_path)
        replica_image = pair.replica_image("web", "sys")
        vm_id = pair.status("web")["vm_id"]
        # test-only: what a failover at the replica server does to the relationship's generation (1 -> 2)
        pair.listener.terminate()
        before = replica_image.read_bytes()
        # written and cut while the replica server is away: the cycle waits here, unacknowledged
        qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x77 3M 64k")
        pair.agent.hvrctl("vm", "sync-now", "web", "--no-wait")
        db = sqlite3.connect(pair.listener.state_dir / "listener.db")
        with db:
            assert db.execute("UPDATE replicas SET generation=2 WHERE vm_id=?", (vm_id,)).rowcount == 1
        db.close()
        pair.listener.start().wait_ready()  # the agent's next upload or heartbeat is refused: fenced

        def fenced() -> dict | None:
            st = pair.status("web")
            return st if st["state"] == "Error" else None
        st = wait_for(fenced, 120, "the primary to be fenced", context=pair.agent.log_tail)
        assert "was failed over at the replica server (generation 2 there, 1 here)" in st["state_detail"]
        assert "hvrctl replica adopt web --from-agent" in st["state_detail"]
        assert log_events(pair.agent.stdout_path, "replication_fenced")
        assert st["pending_cycles"] >= 1  # the unacknowledged writes are kept here
        assert replica_image.read_bytes() == before  # nothing reached the replica
        compare_differs = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(disk),
                                          str(replica_image)], timeout=300)
        assert compare_differs.returncode == 1
    finally:
        pair.close()


def test_a_sigkilled_prepare_is_finished_by_repeating_it_or_undone_by_cancelling(tmp_path):
    marker = tmp_path / "stopped"
    hook = tmp_path / "stop_vm.sh"
    hook.write_text(f"#!/bin/sh\necho \"$1\" >> {marker}\n")
    hook.chmod(0o755)
    tables = f'[hooks]\nstop_vm = ["{hook}", "{{name}}"]\n'
    pair = Pair(tmp_path, agent_config={"heartbeat_s": 1}, agent_tables=tables, tracking="bitmap").start()
    try:
        disk = protect(pair, tmp_path)
        uri = pair.agent.nbd_uri("web", "sys")
        qemu_io(uri, *[f"write -P {i} {i * MiB} 512k" for i in range(1, 15)])
        cuts = len(log_events(pair.agent.stdout_path, "vm_cut"))

        def prepare_in_background() -> None:
            try:
                admin(pair).request("POST", "/v1/vms/web/failover/prepare")
            except HvrError:
                pass  # the agent dies under it
        caller = threading.Thread(target=prepare_in_background)
        caller.start()
        wait_for(lambda: len(log_events(pair.agent.stdout_path, "vm_cut")) > cuts, 120, "the final cut of the prepare",
                 context=pair.agent.log_tail)
        pair.agent.process.send_signal(signal.SIGKILL)
        pair.agent.process.wait(timeout=30)
        caller.join(timeout=60)
        assert marker.read_text().split() == ["web"]  # the stop hook ran with the placeholder replaced

        pair.agent.start().wait_ready()
        assert pair.status("web")["state"] in ("Replicating", "PreparedForFailover")
        prepared = admin(pair).request("POST", "/v1/vms/web/failover/prepare")  # repeating finishes it
        assert prepared["state"] == "PreparedForFailover"
        compare(disk, pair.replica_image("web", "sys"))
        assert admin(pair).request("DELETE", "/v1/vms/web/failover/prepare")["state"] == "Replicating"
        qemu_io(uri, "write -P 0x42 0 4k")
    finally:
        pair.close()


def test_a_failing_stop_hook_leaves_the_vm_replicating_and_a_fixed_one_lets_prepare_finish(tmp_path):
    hook = tmp_path / "stop_vm.sh"
    hook.write_text("#!/bin/sh\necho 'domain web cannot be stopped' >&2\nexit 3\n")
    hook.chmod(0o755)
    tables = f'[hooks]\nstop_vm = ["{hook}", "{{name}}", "{{export}}"]\nhook_timeout_s = 2\n'
    pair = Pair(tmp_path, agent_config={"heartbeat_s": 1}, agent_tables=tables, tracking="bitmap").start()
    try:
        disk = protect(pair, tmp_path)
        with pytest.raises(HvrError) as failed:
            admin(pair).request("POST", "/v1/vms/web/failover/prepare")
        assert failed.value.code == "hook_failed"
        assert "stop_vm" in failed.value.message and "status 3" in failed.value.message
        assert "cannot be stopped" in failed.value.message
        assert pair.status("web")["state"] == "Replicating"
        qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x12 1M 4k")  # still writable

        hook.write_text("#!/bin/sh\nexec sleep 60\n")  # past hook_timeout_s: killed
        with pytest.raises(HvrError) as timed_out:
            admin(pair).request("POST", "/v1/vms/web/failover/prepare")
        assert timed_out.value.code == "hook_failed" and "within 2 s" in timed_out.value.message
        assert pair.status("web")["state"] == "Replicating"

        hook.write_text("#!/bin/sh\nexit 0\n")
        assert admin(pair).request("POST", "/v1/vms/web/failover/prepare")["state"] == "PreparedForFailover"
        compare(disk, pair.replica_image("web", "sys"))
    finally:
        pair.close()
