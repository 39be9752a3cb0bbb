"""The replication timer in a running agent, and ``initial start --at``.

The timer test runs the agent with its replication clock ten times faster
(``tests/support/scaled_clock_agent.py``), so the 30 s interval passes in 3 s:
cycles are cut by the timer alone (no sync-now), one interval apart, and
a cycle the replica acknowledges more than an interval after its cut is
counted missed.
The 5 and 15 minute intervals run the same way, their clocks 100 and 300 times faster (an interval
in 3 s each).
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from daemons import REPO_ROOT, AgentProcess, python_executable, wait_for
from fault_proxy import FaultProxy
from replication_pair import MiB, Pair, make_disk, qemu_io

SCALE = 10
SCALED_AGENT = Path(__file__).resolve().parents[1] / "support" / "scaled_clock_agent.py"


class ScaledClockAgent(AgentProcess):
    scale = SCALE

    def start(self) -> "ScaledClockAgent":
        self.write_config()
        env = self._agent_env()
        env["HVR_TEST_CLOCK_SCALE"] = str(self.scale)
        self._spawn([python_executable(), str(SCALED_AGENT), "--config", self.config_path], cwd=REPO_ROOT, env=env)
        return self


def test_the_30_s_timer_cuts_one_interval_apart_and_counts_a_late_cycle_missed(tmp_path):
    pair = Pair(tmp_path)
    pair.agent = ScaledClockAgent(tmp_path / "agent")
    pair.start()
    proxy = FaultProxy(pair.listener.port)
    try:
        disk = make_disk(tmp_path / "t.img", 4 * MiB)
        pair.protect("t", [disk], frequency=30, port=proxy.port)
        pair.initial("t")
        seen: list[tuple[float, int]] = []

        def next_sequence() -> int:
            return pair.status("t")["next_sequence"]

        def a_new_cycle() -> bool:
            n = next_sequence()
            if not seen or n > seen[-1][1]:
                seen.append((time.monotonic(), n))
            return len(seen) >= 4
        qemu_io(pair.agent.nbd_uri("t", "t"), "write -P 1 0 64k")
        wait_for(a_new_cycle, 120, "three cycles cut by the timer alone", interval_s=0.1,
                 context=pair.agent.log_tail)
        gaps = [b[0] - a[0] for a, b in zip(seen[1:], seen[2:])]
        # one interval (30 s scaled: 3 s) apart, not back to back; generous above for a loaded machine
        assert all(gap > 0.5 * 30 / SCALE for gap in gaps), gaps
        assert all(b[1] - a[1] == 1 for a, b in zip(seen, seen[1:])), seen

        before = pair.agent.hvrctl_json("vm", "measure", "t", "-o", "json")["MissedReplicationCount"]
        proxy.hold()  # the next cycle cannot be acknowledged while the intervals go by
        qemu_io(pair.agent.nbd_uri("t", "t"), "write -P 2 0 64k")
        # the timer cuts the next cycle one interval later even though the held one waits
        wait_for(lambda: pair.status("t")["pending_cycles"] >= 2, 120, "a cut while a cycle is held",
                 context=pair.agent.log_tail)
        proxy.release()
        # the held cycle was acknowledged more than an interval after its cut: a missed cycle
        # (intervals skipped while cycles wait are counted by the same pure plan: test_schedule.py)
        wait_for(lambda: pair.agent.hvrctl_json("vm", "measure", "t", "-o", "json")["MissedReplicationCount"]
                 >= before + 1, 120, "the late cycle to be counted missed", context=pair.agent.log_tail)
        pair.wait_replica_applied("t")
        pair.assert_identical("t", [disk])
    finally:
        proxy.close()
        pair.close()


@pytest.mark.parametrize("frequency_s", [300, 900])
def test_the_5_and_15_minute_timers_cut_one_interval_apart(tmp_path, frequency_s):
    """Cycles cut by the timer alone, one interval apart, with the clock scaled so an interval takes 3 s."""
    scale = frequency_s / 3
    pair = Pair(tmp_path)
    pair.agent = ScaledClockAgent(tmp_path / "agent")
    pair.agent.scale = scale
    pair.start()
    try:
        disk = make_disk(tmp_path / "t.img", 4 * MiB)
        pair.protect("t", [disk], frequency=frequency_s)
        pair.initial("t")
        qemu_io(pair.agent.nbd_uri("t", "t"), "write -P 3 0 64k")
        seen: list[tuple[float, int]] = []

        def a_new_cycle() -> bool:
            n = pair.status("t")["next_sequence"]
            if not seen or n > seen[-1][1]:
                seen.append((time.monotonic(), n))
            return len(seen) >= 4
        wait_for(a_new_cycle, 120, f"three cycles cut by the {frequency_s} s timer alone", interval_s=0.1,
                 context=pair.agent.log_tail)
        gaps = [b[0] - a[0] for a, b in zip(seen[1:], seen[2:])]
        # one interval (3 s real) apart, not back to back, and not at the 30 s pace (0.1 s here)
        assert all(gap > 0.5 * frequency_s / scale for gap in gaps), gaps
        assert all(b[1] - a[1] == 1 for a, b in zip(seen, seen[1:])), seen
        pair.wait_replica_applied("t")
        pair.assert_identical("t", [disk])
    finally:
        pair.close()


def test_initial_start_at_waits_for_its_time(tmp_path):
    pair = Pair(tmp_path).start()
    try:
        disk = make_disk(tmp_path / "later.img", 4 * MiB)
        pair.protect("later", [disk], frequency=300)
        asked = time.time()
        pair.agent.hvrctl("initial", "start", "later", "--at", "+4s")
        st = pair.status("later")
        assert st["state"] == "ReadyForInitialReplication"
        scheduled = datetime.datetime.fromisoformat(st["initial"]["scheduled_at"].replace("Z", "+00:00"))
        assert abs(scheduled.timestamp() - (asked + 4)) < 3
        assert st["initial"]["started_at"] is None
        wait_for(lambda: pair.status("later")["state"] == "Replicating", 120, "the scheduled initial copy",
                 context=pair.agent.log_tail)
        started = datetime.datetime.fromisoformat(pair.status("later")["initial"]["started_at"].replace("Z", "+00:00"))
        assert started.timestamp() >= int(scheduled.timestamp())  # not before its time (to the second)
        qemu_io(pair.agent.nbd_uri("later", "later"), "write -P 9 0 64k")
        pair.sync("later")
        pair.wait_replica_applied("later")
        pair.assert_identical("later", [disk])
    finally:
        pair.close()
