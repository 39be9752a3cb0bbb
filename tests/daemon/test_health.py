"""A real pair driven into each health level, seen from the primary and from the replica; the
monitoring settings and Reset-VMReplicationStatistics through hvrctl."""

from __future__ import annotations

import datetime
import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemons import free_tcp_port, run, wait_for
from replication_pair import MiB, Pair, make_disk, qemu_io


@pytest.fixture
def pair(request, tmp_path):
    p = Pair(tmp_path, tracking=getattr(request, "param", None)).start()  # a test may name the tracking mode
    yield p
    p.close()


def _levels(pair: Pair, vm: str) -> tuple[str, str]:
    return pair.status(vm)["health"], pair.replica(vm)["health"]


def test_a_pair_goes_through_every_health_level(pair, tmp_path):
    disk = make_disk(tmp_path / "web.img", 8 * MiB)
    pair.protect("web", [disk], frequency=30)
    # initial replication not complete: Warning on both sides, as in Hyper-V
    primary, replica = pair.status("web"), pair.replica("web")
    assert (primary["health"], replica["health"]) == ("Warning", "Warning")
    assert any("Initial replication" in d for d in primary["health_details"])
    assert replica["state"] == "WaitingForInitialReplication"
    pair.initial("web")
    qemu_io(pair.agent.nbd_uri("web", "web"), "write -P 3 0 1M")
    pair.sync("web")
    pair.wait_replica_applied("web")
    assert _levels(pair, "web") == ("Normal", "Normal")
    assert pair.status("web")["health_details"] == []
    # paused on the primary: Warning there; the replica just sees no cycle (within the hour: Normal)
    pair.agent.hvrctl("vm", "suspend", "web")
    primary = pair.status("web")
    assert primary["health"] == "Warning" and "paused on the primary" in primary["health_details"][0]
    pair.agent.hvrctl("vm", "resume", "web")
    assert pair.status("web")["health"] == "Normal"
    # replication cannot proceed: the replica server no longer knows the primary's key -> Error, Critical
    pair.listener.hvrctl("server", "key", "remove", "primary.example")
    qemu_io(pair.agent.nbd_uri("web", "web"), "write -P 4 0 1M")
    pair.agent.hvrctl("vm", "sync-now", "web", check=False)
    wait_for(lambda: pair.status("web")["state"] == "Error", 60, "the primary to go to Error",
             context=pair.agent.log_tail)
    primary = pair.status("web")
    assert primary["health"] == "Critical" and "in error" in primary["health_details"][0]
    measure = pair.agent.hvrctl_json("vm", "measure", "web", "-o", "json")
    assert measure["Health"] == "Critical" and measure["ReplicationHealthDetails"]


def _replica_health_metrics(port: int, vm: str) -> dict[str, float]:
    """The listener's hvr_replica_health samples of ``vm``, scraped and parsed: {level: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {s.labels["health"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "hvr_replica_health" and s.labels.get("vm") == vm}


def test_a_replica_whose_apply_fails_is_critical_on_the_replica(tmp_path):
    """Replication cannot proceed on the replica (a stored cycle is damaged, its apply fails: Error): the replica
    server's own health is Critical, with its sentence, in hvrctl and in /metrics."""
    http_port = free_tcp_port()
    pair = Pair(tmp_path, listener_config={"http_listen": f"127.0.0.1:{http_port}"}).start()
    try:
        disk = make_disk(tmp_path / "app.img", 8 * MiB)
        pair.protect("app", [disk], frequency=30)
        pair.initial("app")
        qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 1 0 64k")
        pair.sync("app")
        pair.wait_replica_applied("app")
        assert pair.replica("app")["health"] == "Normal"
        assert _replica_health_metrics(http_port, "app") == {"Normal": 1, "Warning": 0, "Critical": 0}
        # the image is away while a cycle arrives: its apply is retried and the cycle stays stored
        image = pair.replica_image("app", "app")
        aside = image.with_name("aside.img")
        os.rename(image, aside)
        qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 2 0 64k")
        pair.sync("app")
        wait_for(lambda: '"apply_retry"' in pair.listener.stdout_path.read_text(), 60, "the apply to be retried",
                 context=pair.listener.log_tail)
        [stored] = list((pair.replica_dir("app") / "cycles").glob("*.bundle"))
        with open(stored, "r+b") as f:  # damaged: its apply now fails for good
            middle = os.fstat(f.fileno()).st_size // 2
            f.seek(middle)
            byte = f.read(1)
            f.seek(middle)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.rename(aside, image)
        wait_for(lambda: pair.replica("app")["state"] == "Error", 90, "the replica to go to Error",
                 context=pair.listener.log_tail)
        replica = pair.replica("app")
        assert replica["health"] == "Critical", replica
        assert "Replication for virtual machine 'app' is in error on the replica" in replica["health_details"][0]
        assert replica["health_details"][0].endswith("Fix the error(s) and resume replication.")
        assert _replica_health_metrics(http_port, "app") == {"Normal": 0, "Warning": 0, "Critical": 1}
    finally:
        pair.close()


@pytest.mark.parametrize("pair", ["journal", "bitmap"], indirect=True)  # a cycle of each form arrives paused
def test_paused_on_the_replica_is_critical_there_and_cycles_wait_for_the_resume(pair, tmp_path):
    disk = make_disk(tmp_path / "app.img", 8 * MiB)
    pair.protect("app", [disk], frequency=30)
    pair.initial("app")
    qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 1 0 64k")
    pair.sync("app")
    pair.wait_replica_applied("app")
    paused = pair.listener.hvrctl_json("replica", "suspend", "app", "-o", "json")
    assert paused["state"] == "Suspended"
    replica = pair.replica("app")
    assert replica["health"] == "Critical"
    assert replica["health_details"][0] == "Replication for virtual machine 'app' is paused on the replica."
    # the primary goes on: its cycle is received and stored, not applied
    qemu_io(pair.agent.nbd_uri("app", "app"), "write -P 2 64k 64k")
    pair.sync("app")
    replica = pair.replica("app")
    assert replica["last_received_sequence"] > replica["last_applied_sequence"], replica
    assert pair.status("app")["state"] == "Replicating"
    again = pair.listener.hvrctl("replica", "suspend", "app", check=False)
    assert again.returncode == 4 and "Suspended" in again.stderr
    assert pair.listener.hvrctl_json("replica", "resume", "app", "-o", "json")["state"] == "Replicating"
    pair.wait_replica_applied("app")
    assert pair.replica("app")["health"] == "Normal"
    pair.assert_identical("app", [disk])


@pytest.mark.parametrize("pair", ["journal", "bitmap"], indirect=True)  # pending bytes in each mode
def test_monitoring_settings_and_reset_statistics(pair, tmp_path):
    disk = make_disk(tmp_path / "db.img", 4 * MiB)
    pair.protect("db", [disk], frequency=30)
    pair.initial("db")
    qemu_io(pair.agent.nbd_uri("db", "db"), "write -P 1 0 64k")
    pair.sync("db")
    # the window is fixed on the clock: 12 h from 00:00 UTC by default
    m = pair.agent.hvrctl_json("vm", "measure", "db", "-o", "json")
    start = datetime.datetime.fromisoformat(m["MonitoringStartTime"])
    end = datetime.datetime.fromisoformat(m["MonitoringEndTime"])
    assert end - start == datetime.timedelta(hours=12) and start.hour in (0, 12) and start.minute == 0
    assert m["SuccessfulReplicationCount"] >= 1
    # the agent's server settings (no listener on this socket path: the agent's view is shown)
    view = pair.agent.hvrctl_json("server", "set", "--monitoring-interval", "6h", "--monitoring-start", "03:00",
                                  "-o", "json")
    assert view["monitoring_interval_s"] == 6 * 3600 and view["monitoring_start"] == "03:00"
    m = pair.agent.hvrctl_json("vm", "measure", "db", "-o", "json")
    start = datetime.datetime.fromisoformat(m["MonitoringStartTime"])
    assert start.hour in (3, 9, 15, 21) and start.minute == 0
    # the listener's: validated, stored, shown
    view = pair.listener.hvrctl_json("server", "set", "--monitoring-interval", "1d", "--monitoring-start", "09:30")
    assert view["monitoring_interval_s"] == 86400 and view["monitoring_start"] == "09:30"
    assert pair.listener.hvrctl_json("server", "get")["monitoring_start"] == "09:30"
    bad = pair.listener.hvrctl("server", "set", "--monitoring-interval", "90m", check=False)
    assert bad.returncode != 0
    bad = pair.agent.hvrctl("server", "set", "--monitoring-start", "25:00", check=False)
    assert bad.returncode != 0 and "monitoring_start" in bad.stderr
    # Reset-VMReplicationStatistics: a new collection starts now
    reset = pair.agent.hvrctl_json("vm", "measure", "db", "--reset", "-o", "json")
    assert reset["SuccessfulReplicationCount"] == 0 and reset["MissedReplicationCount"] == 0
    assert reset["MonitoringStartTime"] >= m["MonitoringStartTime"]
    assert reset["PendingReplicationSize"] == 0  # nothing waits: not the header of an empty log
    qemu_io(pair.agent.nbd_uri("db", "db"), "write -P 2 0 64k")
    assert pair.agent.hvrctl_json("vm", "measure", "db", "-o", "json")["PendingReplicationSize"] >= 64 * 1024
    pair.sync("db")
    again = pair.agent.hvrctl_json("vm", "measure", "db", "-o", "json")
    assert again["SuccessfulReplicationCount"] == 1 and again["PendingReplicationSize"] == 0


def test_the_latency_limit_is_a_server_setting_of_the_primary(pair, tmp_path):
    """A cycle paced by the bandwidth cap takes seconds from cut to acknowledgement: over a latency limit of
    1 s the primary's health is Warning with its sentence; with the default limit (5 minutes) it is Normal."""
    disk = make_disk(tmp_path / "slow.img", 4 * MiB)
    pair.protect("slow", [disk], frequency=300)
    pair.initial("slow")
    pair.agent.hvrctl("server", "set", "--bandwidth", "64KiB/s")
    script = f"import os\nh.pwrite(os.urandom({256 * 1024}), 0)\nh.flush()\n"  # random: nothing to compress
    run(["nbdsh", "-u", pair.agent.nbd_uri("slow", "slow"), "-c", script], timeout_s=60)
    pair.sync("slow")
    assert pair.status("slow")["health"] == "Normal"
    view = pair.agent.hvrctl_json("server", "set", "--latency-limit", "1s", "-o", "json")
    assert view["latency_limit_s"] == 1
    status = pair.status("slow")
    assert status["health"] == "Warning", status
    assert any("average replication latency" in d and "over the limit of 1 s" in d for d in status["health_details"])
    assert pair.agent.hvrctl_json("server", "set", "--latency-limit", "5m", "-o", "json")["latency_limit_s"] == 300
    assert pair.status("slow")["health"] == "Normal"
    bad = pair.agent.hvrctl("server", "set", "--latency-limit", "soon", check=False)
    assert bad.returncode == 2 and "latency limit 'soon' is not a duration" in bad.stderr
