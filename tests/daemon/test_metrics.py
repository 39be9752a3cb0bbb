"""The HTTP probes and /metrics of both daemons, scraped from running daemons and parsed with
prometheus-client's own parser; the RPO gauge rises while the link is cut and falls after."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemons import free_tcp_port, wait_for
from fault_proxy import FaultProxy
from listener_process import ListenerProcess
from replication_pair import MiB, Pair, make_disk, qemu_io
from small_tmpfs import small_tmpfs


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def rpo(port: int, vm: str) -> float:
    return scrape(port)[("hvr_replication_rpo_seconds", (("vm", vm),))]


@pytest.fixture
def pair(request, tmp_path):
    agent_port, listener_port = free_tcp_port(), free_tcp_port()
    p = Pair(tmp_path, agent_config={"http_listen": f"127.0.0.1:{agent_port}"},
             listener_config={"http_listen": f"127.0.0.1:{listener_port}"},
             tracking=getattr(request, "param", None)).start()  # a test may name the tracking mode
    p.agent_http, p.listener_http = agent_port, listener_port
    yield p
    p.close()


def test_probes_answer_on_both_daemons(pair):
    for port in (pair.agent_http, pair.listener_http):
        assert get(port, "/healthz") == (200, "ok\n")
        status, body = get(port, "/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "problems": []}
    # the listener is not ready while replication is disabled on it, and says why
    pair.listener.hvrctl("server", "set", "--enabled", "false")
    status, body = get(pair.listener_http, "/readyz")
    assert status == 503 and "not enabled" in json.loads(body)["problems"][0]
    assert scrape(pair.listener_http)[("hvr_ready", ())] == 0
    pair.listener.hvrctl("server", "set", "--enabled", "true")
    assert get(pair.listener_http, "/readyz")[0] == 200


def test_the_listener_is_unready_while_its_storage_is_not_writable(tmp_path):
    """The storage's file system turned read-only under a running listener: /readyz says so (503), and
    ready again once it is writable."""
    http = free_tcp_port()
    listener = ListenerProcess(tmp_path / "listener", extra_config={"http_listen": f"127.0.0.1:{http}"})
    with small_tmpfs(listener.storage, "8m") as storage:
        listener.start().wait_ready()
        try:
            assert get(http, "/readyz")[0] == 200
            subprocess.run(["mount", "-o", "remount,ro", str(storage)], check=True)
            status, body = get(http, "/readyz")
            problems = json.loads(body)["problems"]
            assert status == 503 and problems and f"the storage {storage} is not writable" in problems[0], body
            assert scrape(http)[("hvr_ready", ())] == 0
            subprocess.run(["mount", "-o", "remount,rw", str(storage)], check=True)
            assert get(http, "/readyz") == (200, json.dumps({"ready": True, "problems": []}))
        finally:
            listener.close()


def test_an_unavailable_vm_makes_the_agent_unready(pair, tmp_path):
    disk = make_disk(tmp_path / "gone.img", MiB)
    pair.agent.add_vm("gone", [disk])
    pair.agent.terminate()
    disk.unlink()
    pair.agent.start().wait_ready()
    status, body = get(pair.agent_http, "/readyz")
    assert status == 503 and "VM gone is Unavailable" in json.loads(body)["problems"][0]
    assert scrape(pair.agent_http)[("hvr_vms_unavailable", ())] == 1


@pytest.mark.parametrize("pair", ["journal", "bitmap"], indirect=True)  # pending bytes in each mode
def test_rpo_rises_while_the_link_is_cut_and_falls_after(pair, tmp_path):
    proxy = FaultProxy(pair.listener.port)
    try:
        disk = make_disk(tmp_path / "web.img", 8 * MiB)
        pair.protect("web", [disk], frequency=30, port=proxy.port)
        before = scrape(pair.agent_http)
        assert before[("hvr_replication_state", (("state", "ReadyForInitialReplication"), ("vm", "web")))] == 1
        assert before[("hvr_replication_health", (("health", "Warning"), ("vm", "web")))] == 1
        # before the initial copy, what it has to send is pending (the disk's size: nothing is done)
        assert before[("hvr_replication_pending_bytes", (("vm", "web"),))] == 8 * MiB
        pair.initial("web")
        qemu_io(pair.agent.nbd_uri("web", "web"), "write -P 5 0 2M")
        pair.sync("web")
        pair.wait_replica_applied("web")
        samples = scrape(pair.agent_http)
        vm = (("vm", "web"),)
        assert samples[("hvr_replication_health", (("health", "Normal"), ("vm", "web")))] == 1
        assert samples[("hvr_replication_cycles_successful", vm)] >= 1
        assert ("hvr_replication_cycles_missed", vm) in samples and ("hvr_replication_errors", vm) in samples
        assert samples[("hvr_replication_sent_bytes", vm)] > 0
        assert samples[("hvr_replication_compression_ratio", vm)] >= 1
        assert samples[("hvr_replication_pending_bytes", vm)] == 0
        assert samples[("hvr_replication_resync_remaining_bytes", vm)] == 0
        assert samples[("hvr_replication_last_success_timestamp_seconds", vm)] > 0
        assert ("process_cpu_seconds_total", ()) in samples  # process metrics from the library
        replica = scrape(pair.listener_http)
        assert replica[("hvr_replica_health", (("health", "Normal"), ("vm", "web")))] == 1
        assert replica[("hvr_replica_apply_lag_cycles", vm)] == 0
        assert replica[("hvr_replica_applied_bytes", vm)] > 0
        assert replica[("hvr_replica_rpo_seconds", vm)] >= 0
        settled = rpo(pair.agent_http, "web")

        proxy.hold()  # the link is cut: nothing reaches the replica
        qemu_io(pair.agent.nbd_uri("web", "web"), "write -P 6 0 1M")
        held = [rpo(pair.agent_http, "web")]
        wait_for(lambda: held.append(rpo(pair.agent_http, "web")) or held[-1] > settled + 4, 60,
                 "the RPO to rise while the link is cut")
        assert held == sorted(held), f"the RPO went down while nothing could be applied: {held}"
        assert scrape(pair.agent_http)[("hvr_replication_pending_bytes", vm)] >= MiB

        proxy.release()
        pair.sync("web")
        pair.wait_replica_applied("web")
        after = rpo(pair.agent_http, "web")
        assert after < held[-1], f"the RPO did not fall after the link returned: {after} >= {held[-1]}"
    finally:
        proxy.close()
