"""Recovery history settings and application-consistent cuts, with a real agent and a real listener.

The settings are given on the primary (``vm enable``, ``vm set``) and must
reach the replica server; the freeze and thaw commands are small shell
scripts that append to a file, so the test sees that and when they ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemons import wait_for
from hvrctl.client import AdminClient
from replication_pair import MiB, Pair, make_disk, qemu_io


def hook_script(path: Path, phase: str, log: Path, status: int = 0) -> Path:
    path.write_text(f'#!/bin/sh\necho "{phase} $1 $HVR_PHASE" >> "{log}"\nexit {status}\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def hooks(tmp_path) -> dict:
    log = tmp_path / "hooks.log"
    log.touch()
    return {"log": log,
            "freeze": hook_script(tmp_path / "freeze.sh", "freeze", log),
            "thaw": hook_script(tmp_path / "thaw.sh", "thaw", log),
            "fail": hook_script(tmp_path / "freeze-fails.sh", "freeze-failed", log, status=3)}


@pytest.fixture
def pair(tmp_path, hooks):
    # Hooks for two VMs only: "app" freezes well, "broken" fails to freeze; any other VM has none.
    tables = "".join(
        f'[app_consistency.vm.{vm}]\nfreeze = ["{freeze}", "{{vm}}"]\nthaw = ["{hooks["thaw"]}", "{{vm}}"]\n'
        f"timeout_s = 20\n\n" for vm, freeze in (("app", hooks["freeze"]), ("broken", hooks["fail"])))
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}, agent_tables=tables).start()
    yield p
    p.close()


def enable(pair: Pair, vm: str, disks: list[Path], *settings: str, frequency: int = 900,
           tracking: str | None = None) -> None:
    pair.agent.add_vm(vm, disks, tracking=tracking)
    pair.agent.hvrctl("vm", "enable", vm, "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path), "--frequency", str(frequency), *settings)


def replica_settings(pair: Pair, vm: str) -> tuple:
    rep = pair.replica(vm)
    return rep["recovery_history"], rep["fine_window_min"], rep["app_consistent_hours"]


def primary_settings(pair: Pair, vm: str) -> tuple:
    st = pair.status(vm)
    return st["recovery_history"], st["fine_window_min"], st["app_consistent_hours"]


def wait_replica_settings(pair: Pair, vm: str, wanted: tuple) -> None:
    wait_for(lambda: replica_settings(pair, vm) == wanted and not pair.status(vm)["settings_pending"], 30,
             f"the replica of {vm} to have the settings {wanted}",
             context=lambda: pair.agent.log_tail() + "\n" + pair.listener.log_tail())


def recovery_points(pair: Pair, vm: str) -> list[dict]:
    return AdminClient(pair.listener.admin_socket, "hvr-listener").request(
        "GET", f"/v1/replicas/{vm}/recovery-points")


def wait_first_point(pair: Pair, vm: str) -> dict:
    """The first recovery point of the VM: the first cycle after the initial copy, once applied."""
    found: list[dict] = []

    def applied() -> bool:
        found[:] = recovery_points(pair, vm)
        return bool(found)
    wait_for(applied, 60, f"a recovery point of {vm}",
             context=lambda: pair.agent.log_tail() + "\n" + pair.listener.log_tail())
    return found[0]


def test_settings_given_at_enable_reach_the_replica_and_vm_set_changes_them(pair, tmp_path):
    disk = make_disk(tmp_path / "app.img", 4 * MiB)
    enable(pair, "app", [disk], "--recovery-history", "6", "--fine-window", "30")
    assert primary_settings(pair, "app") == (6, 30, None)
    wait_replica_settings(pair, "app", (6, 30, None))  # before the initial copy: it was not started

    pair.agent.hvrctl("vm", "set", "app", "--app-consistent-hours", "4", "--fine-window", "0")
    assert primary_settings(pair, "app") == (6, 0, 4)  # the one not given stays
    wait_replica_settings(pair, "app", (6, 0, 4))
    pair.agent.hvrctl("vm", "set", "app", "--app-consistent-hours", "off")
    wait_replica_settings(pair, "app", (6, 0, None))
    shown = pair.agent.hvrctl("vm", "get", "app").stdout
    assert "RecoveryHistory" in shown and "AppConsistentHours" in shown and "off" in shown

    # And while replicating: the next step sends them.
    pair.initial("app")
    pair.agent.hvrctl("vm", "set", "app", "--recovery-history", "2")
    wait_replica_settings(pair, "app", (2, 0, None))


@pytest.mark.parametrize("flags, field", [
    (["--recovery-history", "25"], "recovery_history"),
    (["--fine-window", "-5"], "fine_window_min"),
    (["--app-consistent-hours", "13"], "app_consistent_hours"),
    (["--app-consistent-hours", "0", "--recovery-history", "3"], "app_consistent_hours"),
])
def test_bad_settings_are_refused_naming_the_field_and_change_nothing(pair, tmp_path, flags, field):
    disk = make_disk(tmp_path / "db.img", 4 * MiB)
    enable(pair, "db", [disk], "--recovery-history", "1")
    wait_replica_settings(pair, "db", (1, 60, None))
    before = pair.status("db")
    r = pair.agent.hvrctl("vm", "set", "db", *flags, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert field in r.stderr
    after = pair.status("db")
    assert primary_settings(pair, "db") == (1, 60, None) and not after["settings_pending"]
    assert replica_settings(pair, "db") == (1, 60, None)
    # enabling with a bad value is refused before anything is recorded, here or on the replica
    other = make_disk(tmp_path / "db2.img", 4 * MiB)
    pair.agent.add_vm("db2", [other])
    r = pair.agent.hvrctl("vm", "enable", "db2", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                          "--key", str(pair.key_path), *flags, check=False)
    assert r.returncode == 2 and field in r.stderr, r.stdout + r.stderr
    assert pair.agent.hvrctl("vm", "get", "db2", check=False).returncode == 3
    assert pair.listener.hvrctl("replica", "get", "db2", check=False).returncode == 3
    assert before == after


def test_the_first_cycle_is_application_consistent_with_freeze_then_thaw(pair, tmp_path, hooks):
    disk = make_disk(tmp_path / "app.img", 8 * MiB)
    enable(pair, "app", [disk], "--app-consistent-hours", "1")
    qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 7 0 65536")
    pair.initial("app")  # the first cycle is cut right after the copy
    point = wait_first_point(pair, "app")
    assert point["consistency"] == "application", point
    assert hooks["log"].read_text().splitlines() == ["freeze app freeze", "thaw app thaw"]
    measure = pair.agent.hvrctl_json("vm", "measure", "app", "-o", "json")
    assert measure["AppConsistentFailedCount"] == 0
    assert pair.status("app")["last_app_consistent_time"]
    # The next cut is within the hour: crash-consistent, no hook runs.
    qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 8 0 65536")
    pair.sync("app")
    pair.wait_replica_applied("app")
    points = recovery_points(pair, "app")
    assert [p["consistency"] for p in points][-2:] == ["application", "crash"]
    assert len(hooks["log"].read_text().splitlines()) == 2
    pair.assert_identical("app", [disk])


def test_application_consistent_points_without_hooks_are_refused_and_change_nothing(pair, tmp_path):
    disk = make_disk(tmp_path / "plain.img", 4 * MiB)
    pair.agent.add_vm("plain", [disk])
    refused = pair.agent.hvrctl("vm", "enable", "plain", "--replica-server", "127.0.0.1", "--port",
                                str(pair.replica_port), "--key", str(pair.key_path), "--app-consistent-hours", "2",
                                check=False)
    assert refused.returncode == 2 and "freeze and thaw commands" in refused.stderr
    assert "[app_consistency]" in refused.stderr
    assert pair.agent.hvrctl("vm", "get", "plain", check=False).returncode == 3  # not enabled
    pair.agent.hvrctl("vm", "enable", "plain", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path))
    before = pair.status("plain")
    refused = pair.agent.hvrctl("vm", "set", "plain", "--app-consistent-hours", "1", check=False)
    assert refused.returncode == 2 and "freeze and thaw commands" in refused.stderr
    assert primary_settings(pair, "plain") == (before["recovery_history"], before["fine_window_min"], None)


@pytest.mark.parametrize("vm, expected_log, reason", [
    ("broken", ["freeze-failed broken freeze", "thaw broken thaw"], "freeze command 'broken'"),
])
def test_a_failed_freeze_gives_a_crash_consistent_point_and_counts(pair, tmp_path, hooks, vm, expected_log, reason):
    disk = make_disk(tmp_path / f"{vm}.img", 8 * MiB)
    enable(pair, vm, [disk], "--app-consistent-hours", "1")
    pair.initial(vm)
    point = wait_first_point(pair, vm)
    assert point["consistency"] == "crash", point
    assert hooks["log"].read_text().splitlines() == expected_log
    measure = pair.agent.hvrctl_json("vm", "measure", vm, "-o", "json")
    assert measure["AppConsistentFailedCount"] == 1
    assert pair.status(vm)["last_app_consistent_time"] is None
    failed = [json.loads(line) for line in pair.agent.stdout_path.read_text().splitlines()
              if '"app_consistent_failed"' in line]
    assert failed and failed[0]["vm"] == vm and reason.split("'")[0] in failed[0]["error"]
    assert "agent.toml [app_consistency]" in failed[0]["hint"]
    pair.assert_identical(vm, [disk])


def _freeze_a_cut_then_restart_the_agent(pair, disk: Path, hooks, tracking: str) -> int:
    """A frozen cut the replica server is away for; the agent is killed before the cycle got out and
    started again.  Returns the frozen cycle's sequence once the replica applied it."""
    enable(pair, "app", [disk], tracking=tracking)
    pair.initial("app")
    assert wait_first_point(pair, "app")["consistency"] == "crash"
    pair.agent.hvrctl("vm", "set", "app", "--app-consistent-hours", "1")
    wait_replica_settings(pair, "app", (0, 60, 1))
    # The replica server goes away; the next cut is frozen but cannot be shipped.
    pair.listener.kill()
    qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 9 4096 65536")
    pair.agent.hvrctl("vm", "sync-now", "app", "--no-wait")
    wait_for(lambda: len(hooks["log"].read_text().splitlines()) == 2 and pair.status("app")["last_app_consistent_time"],
             30, "the frozen cut", context=pair.agent.log_tail)
    frozen = pair.status("app")["next_sequence"]
    assert pair.status("app")["pending_cycles"] >= 1
    # The agent stops before the cycle got out; it sends it again after the restart.
    pair.agent.kill()
    pair.listener.start().wait_ready()
    pair.agent.start().wait_ready()
    wait_for(lambda: pair.replica("app")["last_applied_sequence"] >= frozen, 60, f"cycle {frozen} applied",
             context=lambda: pair.agent.log_tail() + "\n" + pair.listener.log_tail())
    return frozen


def test_a_frozen_cycle_shipped_after_an_agent_restart_is_still_application_consistent(pair, tmp_path, hooks):
    # journal mode: the frozen cycle's closed log survives the restart and is built again from it
    disk = make_disk(tmp_path / "app.img", 8 * MiB)
    frozen = _freeze_a_cut_then_restart_the_agent(pair, disk, hooks, "journal")
    points = {p["sequence"]: p["consistency"] for p in recovery_points(pair, "app")}
    assert points[frozen] == "application", points
    assert hooks["log"].read_text().splitlines() == ["freeze app freeze", "thaw app thaw"]  # no second freeze
    pair.assert_identical("app", [disk])


def test_a_frozen_bitmap_cycle_lost_in_an_agent_restart_is_not_called_application_consistent(pair, tmp_path,
                                                                                               hooks):
    # bitmap mode: the frozen cycle's dirty map and copies were in memory; it ships as an empty
    # stand-in (docs/bitmap-tracking.md, B7), which holds the replica's previous point: crash-consistent
    # only.  Its blocks come with the next cycle, and the replica converges.
    disk = make_disk(tmp_path / "app.img", 8 * MiB)
    frozen = _freeze_a_cut_then_restart_the_agent(pair, disk, hooks, "bitmap")
    points = {p["sequence"]: p["consistency"] for p in recovery_points(pair, "app")}
    assert points[frozen] == "crash", points
    assert hooks["log"].read_text().splitlines() == ["freeze app freeze", "thaw app thaw"]  # no second freeze
    pair.sync("app")
    pair.wait_replica_applied("app")
    pair.assert_identical("app", [disk])
