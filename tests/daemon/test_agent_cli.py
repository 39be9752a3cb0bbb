"""hvrctl against the agent: finding it, inspecting logs, and block-device exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from daemons import python_executable, run

MiB = 1024 * 1024


def _hvrctl(*args, env=None):
    return subprocess.run([python_executable(), "-m", "hvrctl", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env)


def test_hvrctl_finds_the_agent_through_the_environment(agent):
    env = dict(os.environ, HVR_AGENT_SOCKET=str(agent.admin_socket))
    found = _hvrctl("vm", "list", "-o", "json", env=env)
    assert found.returncode == 0 and json.loads(found.stdout) == []
    env["HVR_AGENT_SOCKET"] = str(agent.admin_socket) + ".missing"
    missing = _hvrctl("vm", "list", env=env)
    assert missing.returncode == 69
    assert "does not exist" in missing.stderr and "--agent-socket" in missing.stderr


def test_hrl_inspect_reports_identity_counts_and_coalescing(agent, tmp_path):
    img = tmp_path / "i.img"
    with open(img, "wb") as fh:
        fh.truncate(8 * MiB)
    agent.add_vm("insp", [img], tracking="journal")  # inspects the log that journal mode writes
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 0 64k", "-c", "discard 1M 64k",
         agent.nbd_uri("insp", "i")], timeout_s=60)
    closed = agent.cut("insp")["logs"][0]
    vm = agent.list_vms()[0]
    out = json.loads(_hvrctl("hrl", "inspect", closed["path"], "--records", "-o", "json").stdout)
    assert out["header"]["vm_id"] == vm["vm_id"] and out["header"]["sequence"] == closed["sequence"]
    assert out["summary"]["clean"] is True
    assert out["records_by_kind"] == {"WRITE": 2, "TRIM": 1, "ZERO": 0}
    assert out["coalesced_write_bytes"] == 64 * 1024  # the second write replaced the first
    assert [r["kind"] for r in out["records"]] == ["WRITE", "WRITE", "TRIM"]
    not_hrl = tmp_path / "junk.hrl"
    not_hrl.write_bytes(b"this is not a log" * 20)
    bad = _hvrctl("hrl", "inspect", not_hrl)
    assert bad.returncode == 65 and "not an HRL file" in bad.stderr


@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop block device needs root and losetup")
    backing = tmp_path / "lv.img"
    with open(backing, "wb") as fh:
        fh.truncate(16 * MiB)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    path = Path(dev.stdout.strip())
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", str(path)], check=False)


def test_block_device_is_served_and_tracked_like_a_file(agent, tmp_path, loop_device):
    base = tmp_path / "before.img"
    with open(base, "wb") as fh:
        fh.truncate(16 * MiB)
    # journal mode: the test replays the logs a block device's writes go to (bitmap mode logs no data)
    agent.add_vm("lvm", [loop_device], tracking="journal")
    disk = loop_device.name
    uri = agent.nbd_uri("lvm", disk)
    run(["qemu-io", "-f", "raw", "-c", "write -P 7 100k 300k", "-c", "write -z 1M 64k", "-c", "discard 2M 1M",
         "-c", "read -P 7 100k 300k", uri], timeout_s=60)
    info = json.loads(run(["nbdinfo", "--json", uri], timeout_s=60).stdout)
    assert info["exports"][0]["export-size"] == 16 * MiB
    agent.cut("lvm")
    agent.terminate()
    # a block device's folder is /dev: its logs and bitmap live under the agent's state_dir instead
    assert not list(loop_device.parent.glob(loop_device.name + ".*.hrl"))
    log_dir = agent.state_dir / "blockdev-logs" / "lvm"
    logs = sorted(log_dir.glob(disk + ".*.hrl"))
    assert len(logs) == 2 and (log_dir / (disk + ".wib")).exists()
    for log in logs:
        run([python_executable(), "-m", "hvrctl", "hrl", "apply", str(log), str(base)], timeout_s=60)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(loop_device), str(base)],
                         capture_output=True, text=True, timeout=60)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
