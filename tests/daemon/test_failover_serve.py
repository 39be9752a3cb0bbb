"""A failed-over VM served by the new primary's agent, its hooks, and reverse replication to the old primary.

Two sites on loopback: site A (agent A, listener A), site B (listener B,
agent B).  The failover disks the replica server makes are made here as the
listener will (a sparse copy of the replica image), so the agent's side is
tested on its own: ``failover/serve`` registers them under the VM's name with
its ids and raised generation, NBD clients read and write them, and
``vm set --reverse`` brings an adopted copy on site A in sync by compare,
sending far less than the disk.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from daemons import AgentProcess, wait_for
from two_sites import assert_same_image as compare, sparse_copy
from hvr_common.pure.errors import HvrError
from hvrctl.client import AdminClient
from listener_process import ListenerProcess
from replication_pair import MiB, make_disk, qemu_io

BLOCK = 4096


def hook_script(path: Path, log: Path, exit_code: int = 0) -> Path:
    path.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit {exit_code}\n")
    path.chmod(0o755)
    return path


def serve_body(vm_id: str, disk_id: str, path: Path, generation: int = 2) -> dict:
    return {"vm_id": vm_id, "generation": generation, "recovery_point": None,
            "disks": [{"disk_id": disk_id, "name": "sys", "path": str(path), "size_bytes": path.stat().st_size}]}


def test_serve_registers_the_failed_over_disks_runs_the_hooks_and_withdraw_or_complete(tmp_path):
    calls = tmp_path / "hooks.log"
    hooks = {h: hook_script(tmp_path / f"{h}.sh", calls) for h in ("define_vm", "stop_vm", "undefine_vm")}
    start = hook_script(tmp_path / "start_vm.sh", calls, exit_code=3)
    tables = "[hooks]\n" + "".join(f'{h} = ["{p}", "{h}", "{{name}}", "{{vm_id}}", "{{nbd_socket}}", "{{export}}"]\n'
                                   for h, p in {**hooks, "start_vm": start}.items())
    agent = AgentProcess(tmp_path / "agent", extra_tables=tables).start().wait_ready()
    try:
        api = AdminClient(agent.admin_socket, "hvr-agent")
        disk = make_disk(tmp_path / "failover-sys.img", 8 * MiB)
        body = serve_body("6f1c1e0a-1111-4a4a-9b9b-000000000001", "6f1c1e0a-2222-4a4a-9b9b-000000000002", disk)

        with pytest.raises(HvrError) as failed:  # the start hook fails: the step stops there
            api.request("POST", "/v1/vms/web/failover/serve", body)
        assert failed.value.code == "hook_failed" and "start_vm" in failed.value.message
        start.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")  # fixed: repeating finishes the step
        vm = api.request("POST", "/v1/vms/web/failover/serve", body)
        assert (vm["vm_id"], vm["generation"], vm["tracking"], vm["failover"]) == (
            body["vm_id"], 2, "bitmap", "waiting_completion")
        assert vm["disks"][0]["disk_id"] == body["disks"][0]["disk_id"]
        assert api.request("POST", "/v1/vms/web/failover/serve", body)["vm_id"] == body["vm_id"]  # idempotent
        lines = calls.read_text().splitlines()
        assert [ln.split()[0] for ln in lines] == ["define_vm", "start_vm", "start_vm"]
        assert lines[0].split()[1:] == ["web", body["vm_id"], str(agent.nbd_socket), "web/sys"]

        qemu_io(agent.nbd_uri("web", "sys"), "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")  # served over NBD
        other = dict(body, vm_id="6f1c1e0a-3333-4a4a-9b9b-000000000003")
        with pytest.raises(HvrError) as clash:
            api.request("POST", "/v1/vms/web/failover/serve", other)
        assert clash.value.code == "conflict"

        # withdrawn (the failover is cancelled): stop and undefine hooks, unregistered, the file stays
        assert api.request("DELETE", "/v1/vms/web/failover/serve") == {"removed": "web", "already": False}
        assert [ln.split()[0] for ln in calls.read_text().splitlines()[3:]] == ["stop_vm", "undefine_vm"]
        assert disk.exists() and all(v["name"] != "web" for v in agent.list_vms())
        assert api.request("DELETE", "/v1/vms/web/failover/serve")["already"] is True

        # served again, then completed: it is this host's VM now, and survives a restart
        api.request("POST", "/v1/vms/web/failover/serve", body)
        assert api.request("POST", "/v1/vms/web/failover/serve/complete")["failover"] == "completed"
        agent.terminate()
        agent.start().wait_ready()
        vm = AdminClient(agent.admin_socket, "hvr-agent").request("GET", "/v1/vms/web")
        assert (vm["failover"], vm["generation"], vm["vm_id"]) == ("completed", 2, body["vm_id"])
        with pytest.raises(HvrError) as done:
            api.request("DELETE", "/v1/vms/web/failover/serve")
        assert done.value.code == "conflict"
        qemu_io(agent.nbd_uri("web", "sys"), "read -P 0x5a 1M 64k")
    finally:
        agent.close()


def test_reverse_replication_brings_the_old_primary_in_sync_by_sending_only_the_differences(tmp_path):
    size = 64 * MiB
    listener_b = ListenerProcess(tmp_path / "listener-b").start().wait_ready()
    listener_a = ListenerProcess(tmp_path / "listener-a").start().wait_ready()
    agent_a = AgentProcess(tmp_path / "agent-a", extra_config={"heartbeat_s": 1})
    agent_b = AgentProcess(tmp_path / "agent-b", extra_config={"heartbeat_s": 1})
    try:
        _, key_a = listener_b.new_key("site-a.example")
        _, key_b = listener_a.new_key("site-b.example")
        agent_a.start().wait_ready()
        agent_b.start().wait_ready()
        image_a = make_disk(tmp_path / "sys.img", size)
        agent_a.add_vm("web", [image_a], tracking="bitmap")
        rng = random.Random(10)
        qemu_io(agent_a.nbd_uri("web", "sys"), *[f"write -P {rng.randrange(1, 256)} {i * 4 * MiB} 1M"
                                                   for i in range(size // (4 * MiB))])
        agent_a.hvrctl("vm", "enable", "web", "--replica-server", "127.0.0.1", "--port", str(listener_b.port),
                       "--key", str(key_a), "--frequency", "300")
        agent_a.hvrctl("initial", "start", "web", "--wait", timeout_s=300)
        vm_a = AdminClient(agent_a.admin_socket, "hvr-agent").request("GET", "/v1/vms/web")
        wait_for(lambda: listener_b.hvrctl_json("replica", "get", "web")["state"] == "Replicating", 60,
                 "the replica on site B")

        # site A writes 1% more that never reaches site B, then is lost
        diverged = [rng.randrange(0, size // BLOCK) * BLOCK for _ in range(size // BLOCK // 100)]
        qemu_io(agent_a.nbd_uri("web", "sys"), *[f"write -P 0xa1 {o} 4k" for o in diverged])
        agent_a.terminate()

        # site B fails over (the failover disk as the listener makes it) and serves the VM with generation 2
        replica_b = Path(listener_b.hvrctl_json("replica", "get", "web")["storage"]) / "sys.img"
        image_b = sparse_copy(replica_b, tmp_path / "failover-sys.img")
        api_b = AdminClient(agent_b.admin_socket, "hvr-agent", timeout_s=300)
        body = serve_body(vm_a["vm_id"], vm_a["disks"][0]["disk_id"], image_b)
        api_b.request("POST", "/v1/vms/web/failover/serve", body)
        # the agent's route refuses a failover waiting completion (hvrctl vm set --reverse completes it first
        # through the local listener, which this test does not have)
        with pytest.raises(HvrError) as refused:
            api_b.request("POST", "/v1/vms/web/failover/reverse",
                          {"replica_server": "127.0.0.1", "port": listener_a.port, "key_file": str(key_b)})
        assert refused.value.code == "not_failed_over_vm" and "not completed" in refused.value.message
        api_b.request("POST", "/v1/vms/web/failover/serve/complete")
        written_b = [rng.randrange(0, size // BLOCK) * BLOCK for _ in range(size // BLOCK // 100)]
        qemu_io(agent_b.nbd_uri("web", "sys"), *[f"write -P 0xb2 {o} 4k" for o in written_b])

        # site A returns as the replica: its listener adopts the old image; site B reverses
        listener_a.hvrctl("replica", "adopt", "web", "--vm-id", vm_a["vm_id"], "--disk", str(image_a))
        agent_b.hvrctl("vm", "set", "web", "--reverse", "--replica-server", "127.0.0.1", "--port",
                       str(listener_a.port), "--key", str(key_b), "--frequency", "30", "-o", "json")

        def in_sync() -> dict | None:
            st = agent_b.hvrctl_json("vm", "get", "web", "-o", "json")
            return st if st["state"] == "Replicating" and (st.get("resync") or {}).get("running") is False else None
        st = wait_for(in_sync, 300, "the compare of the old primary's copy", context=agent_b.log_tail)
        assert st["generation"] == 2
        # repeating the reverse changes nothing
        agent_b.hvrctl("vm", "set", "web", "--reverse", "--replica-server", "127.0.0.1", "--port",
                       str(listener_a.port), "--key", str(key_b))
        agent_b.hvrctl("vm", "sync-now", "web", timeout_s=120)
        target = agent_b.hvrctl_json("vm", "get", "web", "-o", "json")["next_sequence"] - 1
        wait_for(lambda: listener_a.hvrctl_json("replica", "get", "web")["last_applied_sequence"] >= target, 120,
                 "site A to apply the last cycle")
        compare(image_b, image_a)
        sent = st["resync"]["sent_bytes"]
        diverged_bytes = (len(set(diverged)) + len(set(written_b))) * BLOCK
        assert 0 < sent <= 2 * diverged_bytes + MiB, (sent, diverged_bytes)  # the differences, no disk copy
        assert sent < size // 8
    finally:
        for proc in (agent_b, agent_a, listener_a, listener_b):
            proc.close()
