"""Freeze/thaw hooks around a cut, run as real commands that write what they saw to a file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hvr_agent.app_consistency import HookFailed, frozen_cut, run_hook
from hvr_common.pure.config import FreezeHooks
from hvr_common.pure.recovery_points import Consistency


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def trail(tmp_path):
    return tmp_path / "trail"


def lines(trail: Path) -> list[str]:
    return trail.read_text().split() if trail.exists() else []


def recorder(trail: Path):
    async def cut():
        with trail.open("a") as fh:
            fh.write("cut\n")
        return 42
    return cut


async def test_freeze_then_cut_then_thaw_and_the_point_is_application_consistent(tmp_path, trail):
    rec = script(tmp_path, "rec", f'echo "$1:$HVR_VM:$HVR_PHASE" >> {trail}')
    hooks = FreezeHooks((rec, "freeze"), (rec, "thaw"), 10)
    result, outcome = await frozen_cut(hooks, "web01", recorder(trail))
    assert result == 42
    assert lines(trail) == ["freeze:web01:freeze", "cut", "thaw:web01:thaw"]
    assert outcome.consistency is Consistency.APPLICATION and outcome.failure is None


async def test_vm_name_is_substituted_in_arguments(tmp_path, trail):
    rec = script(tmp_path, "rec", f'echo "$1" >> {trail}')
    hooks = FreezeHooks((rec, "f-{vm}"), (rec, "t-{vm}"), 10)
    await frozen_cut(hooks, "db01", recorder(trail))
    assert lines(trail) == ["f-db01", "cut", "t-db01"]


async def test_a_failing_freeze_is_thawed_and_gives_a_crash_consistent_cut(tmp_path, trail):
    bad = script(tmp_path, "bad", f'echo freeze >> {trail}; echo "guest agent not responding" >&2; exit 3')
    rec = script(tmp_path, "rec", f'echo thaw >> {trail}')
    result, outcome = await frozen_cut(FreezeHooks((bad,), (rec,), 10), "web01", recorder(trail))
    assert result == 42
    assert lines(trail) == ["freeze", "thaw", "cut"]
    assert outcome.consistency is Consistency.CRASH
    assert "exited with status 3" in outcome.failure and "guest agent not responding" in outcome.failure


async def test_a_freeze_that_cannot_start_still_thaws_and_cuts(tmp_path, trail):
    rec = script(tmp_path, "rec", f'echo thaw >> {trail}')
    _, outcome = await frozen_cut(FreezeHooks((str(tmp_path / "missing"),), (rec,), 10), "web01",
                                  recorder(trail))
    assert lines(trail) == ["thaw", "cut"]
    assert outcome.consistency is Consistency.CRASH and "could not start" in outcome.failure


async def test_the_timeout_is_honoured_and_the_whole_group_killed(tmp_path, trail):
    child_pid = tmp_path / "child.pid"
    slow = script(tmp_path, "slow", f'sleep 60 & echo $! > {child_pid}; wait')
    rec = script(tmp_path, "rec", f'echo thaw >> {trail}')
    started = time.monotonic()
    _, outcome = await frozen_cut(FreezeHooks((slow,), (rec,), 1), "web01", recorder(trail))
    assert time.monotonic() - started < 20
    assert "did not finish within 1 s" in outcome.failure
    assert outcome.consistency is Consistency.CRASH
    assert lines(trail) == ["thaw", "cut"]
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z", "the hook's child outlived the timeout"


async def test_thaw_runs_when_the_cut_fails(tmp_path, trail):
    rec = script(tmp_path, "rec", f'echo "$1" >> {trail}')

    async def failing_cut():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        await frozen_cut(FreezeHooks((rec, "freeze"), (rec, "thaw"), 10), "web01", failing_cut)
    assert lines(trail) == ["freeze", "thaw"]


async def test_a_failing_thaw_keeps_the_point_consistent(tmp_path, trail):
    rec = script(tmp_path, "rec", f'echo freeze >> {trail}')
    bad = script(tmp_path, "bad", "exit 1")
    _, outcome = await frozen_cut(FreezeHooks((rec,), (bad,), 10), "web01", recorder(trail))
    assert outcome.consistency is Consistency.APPLICATION
    assert lines(trail) == ["freeze", "cut"]


async def test_run_hook_reports_the_exit_status(tmp_path):
    bad = script(tmp_path, "bad", "exit 7")
    with pytest.raises(HookFailed, match="status 7"):
        await run_hook([bad], 5, vm="v", phase="freeze")
    assert await run_hook([script(tmp_path, "ok", "exit 0")], 5, vm="v", phase="freeze") >= 0
    assert os.environ.get("HVR_VM") is None  # the hook's environment is its own
