"""Restarting the agent does not stop a running VM: QEMU's NBD client reconnects and writes resume.

A VM's disk is QEMU's NBD client with ``reconnect-delay``; ``qemu-io`` in
interactive mode is that client.  The agent is SIGKILLed (the worst kind of
restart: no END records, nothing flushed by the agent) while the client keeps
writing, and started again on the same unix socket path.  The writes queued
while it was gone complete once it is back, no request fails, and the replica
converges to an image identical to the primary's.
"""

from __future__ import annotations

import os
import stat

import pytest

from replication_pair import Pair, make_disk
from reconnecting_client import ReconnectingQemuIo

MiB = 1024 * 1024
KiB = 1024


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path).start()
    yield p
    p.close()


def _writes(first: int, count: int) -> list[str]:
    """``count`` writes, each 64 KiB with a pattern of its own, spread over the disk."""
    return [f"write -P {(i * 37) % 251 + 1} {(i * 1237 % 250) * 64 * KiB} {64 * KiB}"
            for i in range(first, first + count)]


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_writes_resume_across_an_agent_restart_and_the_replica_converges(pair, tmp_path, signal_name):
    disk = make_disk(tmp_path / "d0.img", 16 * MiB)
    pair.protect("vm1", [disk])
    pair.initial("vm1")
    agent = pair.agent
    socket_before = os.stat(agent.nbd_socket)
    client = ReconnectingQemuIo(agent.nbd_socket, "vm1/d0", reconnect_delay_s=120)
    try:
        client.write_each(_writes(0, 20), 60)
        pair.sync("vm1")  # some of the history is on the replica already
        client.write_each(_writes(20, 20), 60)  # in the agent's log, not yet in any cycle

        if signal_name == "SIGKILL":
            agent.kill()
        else:
            agent.terminate()
        client.send(_writes(40, 1)[0])  # issued while no agent runs: it waits for the reconnect
        agent.start().wait_ready(timeout_s=60)

        # The socket is a new one at the same path, with the same mode.
        socket_after = os.stat(agent.nbd_socket)
        assert stat.S_ISSOCK(socket_after.st_mode) and socket_after.st_ctime_ns > socket_before.st_ctime_ns
        assert stat.S_IMODE(socket_after.st_mode) == stat.S_IMODE(socket_before.st_mode)

        client.wait_writes(41, 180, "the write issued during the restart to complete after the reconnect")
        client.write_each(_writes(41, 39), 60)
        client.send("flush")
    finally:
        output = client.close()
    assert "failed" not in output, output[-3000:]

    vm = pair.agent.hvrctl_json("vm", "get", "vm1", "-o", "json")
    assert vm["state"] == "Replicating", vm
    pair.sync("vm1")
    pair.wait_replica_applied("vm1")
    pair.assert_identical("vm1", [disk])
    _assert_patterns(disk)


def _assert_patterns(disk) -> None:
    """The primary image holds the last pattern written at every offset (nothing lost by the restart)."""
    expected: dict[int, int] = {}
    for i in range(80):
        expected[(i * 1237 % 250) * 64 * KiB] = (i * 37) % 251 + 1
    data = disk.read_bytes()
    for offset, pattern in expected.items():
        assert data[offset:offset + 64 * KiB] == bytes([pattern]) * (64 * KiB), f"offset {offset}"
