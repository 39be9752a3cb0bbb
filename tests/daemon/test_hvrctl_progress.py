"""hvrctl's long operations report their progress on stderr (plain lines when it is not a terminal, nothing
with -o json): the initial copy, a resync, a verify, a backup export."""

from __future__ import annotations

import json

import pytest

from replication_pair import MiB, Pair, make_disk, qemu_io


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path).start()
    yield p
    p.close()


def final_line(stderr: str, description: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(description)]
    assert lines, f"no progress line '{description}...' on stderr: {stderr!r}"
    return lines[-1]


def test_long_operations_report_their_progress_on_stderr(pair, tmp_path):
    disk = make_disk(tmp_path / "web.img", 8 * MiB)
    pair.protect("web", [disk], frequency=300)
    copy = pair.agent.hvrctl("initial", "start", "web", "--wait", timeout_s=300)
    assert "100.0%" in final_line(copy.stderr, "initial replication of web")
    qemu_io(pair.agent.nbd_uri("web", "web"), "write -P 2 0 1M")
    pair.sync("web")
    pair.wait_replica_applied("web")

    verify = pair.agent.hvrctl("vm", "verify", "web", timeout_s=300)
    assert "100.0%" in final_line(verify.stderr, "verify web"), verify.stderr
    quiet = pair.agent.hvrctl("vm", "verify", "web", "-o", "json", timeout_s=300)
    assert quiet.stderr == "" and json.loads(quiet.stdout)["differing_bytes"] == 0

    resync = pair.agent.hvrctl("vm", "resync", "web", "--wait", timeout_s=300)
    assert "100.0%" in final_line(resync.stderr, "resync web"), resync.stderr

    begun = pair.listener.hvrctl("backup", "begin", "web", "-o", "json")
    assert begun.returncode == 0
    export = pair.listener.hvrctl("backup", "export", "web", str(tmp_path / "out"), timeout_s=300)
    assert "100.0%" in final_line(export.stderr, "backup web")
    pair.listener.hvrctl("backup", "end", "web")
