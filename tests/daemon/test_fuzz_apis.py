"""Fuzzing every route of the replication API and of both admin APIs, against the real daemons.

hypothesis builds requests from each route's shape with hostile path
segments, query values, headers and bodies (random JSON, deep JSON, bytes).
Every answer must be a JSON body with an error code or a success, never a
500 (a 503/507 only with a transient code of the catalogue: "try later");
after every refusal (4xx) the state is as it was: the victim replica's
images and record, the listener's settings, keys, entries and replicas, the agent's
VMs and relationships.  An input that happens to be valid may change state;
the baseline is then taken again.  The default run takes a few dozen requests
per API; the ``slow`` suite many more.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from daemons import AgentProcess, make_image
from hvr_common.pure.wire.error_catalogue import CATALOGUE
from hvrctl.client import AdminClient
from listener_process import ListenerProcess
from raw_http import exchange_unix, request_bytes, signed
from replica_vm import Vm

QUICK = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
DEEP = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))

HOSTILE_TEXT = st.one_of(
    st.sampled_from(["..", ".", "../victim", "a/b", "victim\n", "vm\x00", "%00", "x" * 70, "²", "١٢", "-1", "9" * 30,
                     str(2 ** 63), "", " ", "\r\n", "d0\n", "victim/../x"]),
    st.text(max_size=40))
NUMBERS = st.one_of(st.integers(-2 ** 70, 2 ** 70).map(str), st.sampled_from(["²", "١٢", "1e3", "0x10", "9" * 5000]),
                    HOSTILE_TEXT)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                    | HOSTILE_TEXT, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(HOSTILE_TEXT, inner, max_size=4), max_leaves=12)


def bodies(fields: list[str]):
    objects = st.dictionaries(st.one_of(st.sampled_from(fields), HOSTILE_TEXT) if fields else HOSTILE_TEXT,
                              JSON, max_size=6)
    return st.one_of(objects.map(lambda d: json.dumps(d).encode()), JSON.map(lambda v: json.dumps(v).encode()),
                     st.binary(max_size=300), st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
                     st.just(b'{"a": ' * 20_000 + b"1" + b"}" * 20_000))


def segment(value: str) -> str:
    return quote(value, safe="")


def _json_answer(reply) -> dict | list | None:
    """A JSON answer; never a failure of the server (500): a 5xx only as a documented transient refusal
    (503 or 507 whose code the catalogue marks transient, e.g. a backup of a point not applied yet)."""
    assert reply.status != 500, (reply.status, reply.body[:300])
    assert (reply.content_type or "").startswith("application/json"), (reply.status, reply.content_type,
                                                                       reply.body[:300])
    doc = json.loads(reply.body) if reply.body else None
    if reply.status >= 400:
        assert isinstance(doc, dict) and isinstance(doc.get("code"), str), doc
    if reply.status >= 500:
        entry = CATALOGUE.get(doc["code"])
        assert entry is not None and entry.transient and entry.status == reply.status, (reply.status, doc)
    return doc


# --- the listener: replication API and admin API --------------------------------------------------

@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    lp = ListenerProcess(tmp_path_factory.mktemp("fuzz-listener"), extra_config={"max_bundle_bytes": 4 * 1024 ** 2})
    lp.start().wait_ready()
    lp.key, _ = lp.new_key("primary1.example")
    lp.victim = Vm(lp, "victim")
    yield lp
    lp.close()


def listener_state(lp: ListenerProcess) -> tuple:
    admin = AdminClient(lp.admin_socket, "hvr-listener")
    images = tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in lp.victim.image_paths())
    replicas = sorted((r["name"], r["state"], r.get("next_sequence")) for r in admin.request("GET", "/v1/replicas"))
    return (images, json.dumps(admin.request("GET", "/v1/server"), sort_keys=True),
            json.dumps(admin.request("GET", "/v1/keys"), sort_keys=True), replicas,
            json.dumps(admin.request("GET", "/v1/authorization"), sort_keys=True))


def replication_requests(lp: ListenerProcess):
    vm_ids = st.one_of(st.just(str(lp.victim.vm_id)), st.uuids().map(str), HOSTILE_TEXT)
    disk_ids = st.one_of(st.just(str(lp.victim.disk_ids[0])), st.uuids().map(str), HOSTILE_TEXT)
    query = st.dictionaries(st.sampled_from(["offset", "end", "consistency"]) | HOSTILE_TEXT, NUMBERS, max_size=3)
    generation = st.one_of(st.none(), NUMBERS.filter(lambda v: v.isprintable() and v.isascii()))

    @st.composite
    def build(draw):
        route = draw(st.sampled_from(["server", "replica", "initial", "complete", "cycle", "settings", "stream",
                                      "commit", "digests", "resync", "heartbeat"]))
        vm = segment(draw(vm_ids))
        method, path, fields = {
            "server": ("GET", "/v1/server", []),
            "replica": (draw(st.sampled_from(["PUT", "GET"])), f"/v1/replicas/{vm}",
                        ["name", "generation", "frequency_s", "compression", "disks"]),
            "initial": ("PUT", f"/v1/replicas/{vm}/initial/{segment(draw(disk_ids))}", []),
            "complete": ("POST", f"/v1/replicas/{vm}/initial/complete", ["generation", "next_sequence"]),
            "cycle": ("PUT", f"/v1/replicas/{vm}/cycles/{segment(draw(NUMBERS))}", []),
            "settings": ("PUT", f"/v1/replicas/{vm}/settings",
                         ["recovery_history", "fine_window_min", "app_consistent_hours"]),
            "stream": ("PUT", f"/v1/replicas/{vm}/cycles/{segment(draw(NUMBERS))}/stream", []),
            "commit": ("POST", f"/v1/replicas/{vm}/cycles/{segment(draw(NUMBERS))}/commit", ["sha256", "bytes"]),
            "digests": ("POST", f"/v1/replicas/{vm}/digests/{segment(draw(disk_ids))}", ["level", "indices"]),
            "resync": ("POST", f"/v1/replicas/{vm}/resync/complete", ["generation", "next_sequence"]),
            "heartbeat": ("POST", f"/v1/replicas/{vm}/heartbeat", ["running", "nbd_clients"]),
        }[route]
        q = draw(query)
        target = path + ("?" + urlencode(q) if q else "")
        body = draw(bodies(fields))
        gen = draw(generation)
        headers = {"X-Hvr-Generation": gen} if gen is not None else {}
        return method, target, body, headers
    return build()


def _fuzz_replication_api(lp: ListenerProcess, profile: settings) -> None:
    baseline = [listener_state(lp)]

    @profile
    @given(case=replication_requests(lp))
    def run(case):
        method, target, body, headers = case
        reply = signed(lp.port, method, target, body, key=lp.key, headers=headers)
        _json_answer(reply)
        if reply.status >= 400:
            assert listener_state(lp) == baseline[0], f"refused {method} {target} changed the state"
        else:
            baseline[0] = listener_state(lp)
    run()
    assert lp.is_alive()


def test_fuzz_the_replication_api(listener):
    _fuzz_replication_api(listener, QUICK)


@pytest.mark.slow
def test_fuzz_the_replication_api_deep(listener):
    _fuzz_replication_api(listener, DEEP)


def listener_admin_requests():
    names = st.one_of(st.just("victim"), HOSTILE_TEXT)

    @st.composite
    def build(draw):
        hostile = segment(draw(HOSTILE_TEXT.filter(lambda t: t not in ("victim", "primary1.example"))))
        name = segment(draw(names))
        method, path, fields = draw(st.sampled_from([
            # default_storage and listen are left out: a valid "/" or a new port would send the other
            # tests elsewhere (their hostile values are tested in test_hostile_input.py)
            ("GET", "/v1/server", []),
            ("PATCH", "/v1/server", ["enabled", "auth_modes", "allow_any_authenticated", "max_active_applies",
                                     "monitoring_interval_s", "monitoring_start"]),
            ("GET", "/v1/keys", []), ("POST", "/v1/keys", ["principal", "secret", "replace"]),
            ("DELETE", "/v1/keys/{hostile}", []), ("GET", "/v1/replicas", []), ("GET", "/v1/replicas/{name}", []),
            ("DELETE", "/v1/replicas/{hostile}", ["delete_storage"]),
            ("POST", "/v1/replicas/{name}/resume", []), ("GET", "/v1/replicas/{name}/recovery-points", []),
            ("POST", "/v1/replicas/{name}/test-failover", ["point", "recovery_point"]),
            ("DELETE", "/v1/replicas/{hostile}/test-failover", []),
            ("GET", "/v1/authorization", []), ("POST", "/v1/authorization", ["pattern", "storage", "trust_group"]),
            ("PATCH", "/v1/authorization/{hostile}", ["storage", "trust_group"]),
            ("DELETE", "/v1/authorization/{hostile}", []),
            ("POST", "/v1/adoptions", ["name", "vm_id", "disk_ids", "disks", "keep_aside"]),
            ("GET", "/v1/adoptions/{name}", []),
            ("POST", "/v1/replicas/{name}/recovery-points/{hostile}/release", []),
            ("POST", "/v1/replicas/{hostile}/initial/import", ["directory"]),
            ("GET", "/v1/backups", []), ("POST", "/v1/replicas/{name}/backup", ["recovery_point"]),
            ("GET", "/v1/replicas/{name}/backup", []), ("DELETE", "/v1/replicas/{hostile}/backup", []),
            ("GET", "/v1/replicas/{name}/backup/disks/{hostile}/extents", []),
            ("GET", "/v1/replicas/{name}/backup/disks/{hostile}/data", []),
            ("POST", "/v1/replicas/{hostile}/failover", ["recovery_point", "force"]),
            ("DELETE", "/v1/replicas/{hostile}/failover", []),
            ("POST", "/v1/replicas/{hostile}/failover/complete", []),
        ]))
        query = draw(st.dictionaries(st.sampled_from(["offset", "length", "key_id", "delete_storage"]) | HOSTILE_TEXT,
                                     NUMBERS, max_size=2))
        target = path.format(name=name, hostile=hostile) + ("?" + urlencode(query) if query else "")
        return method, target, draw(bodies(fields))
    return build()


def _fuzz_listener_admin(lp: ListenerProcess, profile: settings) -> None:
    baseline = [listener_state(lp)]

    @profile
    @given(case=listener_admin_requests())
    def run(case):
        method, target, body = case
        reply = exchange_unix(lp.admin_socket, request_bytes(method, target, body,
                                                             {"Content-Type": "application/json"}))
        _json_answer(reply)
        if reply.status >= 400:
            assert listener_state(lp) == baseline[0], f"refused {method} {target} changed the state"
        else:
            baseline[0] = listener_state(lp)
            AdminClient(lp.admin_socket, "hvr-listener").request(
                "PATCH", "/v1/server", {"enabled": True, "allow_any_authenticated": True,
                                        "auth_modes": ["token"]})  # keep the replication API reachable
            baseline[0] = listener_state(lp)
    run()
    assert lp.is_alive()


def test_fuzz_the_listener_admin_api(listener):
    _fuzz_listener_admin(listener, QUICK)


@pytest.mark.slow
def test_fuzz_the_listener_admin_api_deep(listener):
    _fuzz_listener_admin(listener, DEEP)


# --- the agent's admin API ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz-agent")
    ag = AgentProcess(work / "agent")
    ag.start().wait_ready()
    image = make_image(work / "disk0.img", 4 * 1024 ** 2)
    ag.add_vm("vm1", [image])
    ag.work = work
    yield ag
    ag.close()


def agent_state(ag: AgentProcess) -> tuple:
    admin = AdminClient(ag.admin_socket, "hvr-agent")
    vms = sorted((v["name"], v.get("state"), v.get("generation"), v.get("sequence")) for v in admin.request("GET", "/v1/vms"))
    return vms, json.dumps(admin.request("GET", "/v1/replication"), sort_keys=True)


def agent_requests(ag: AgentProcess):
    disk_paths = st.one_of(st.sampled_from([str(ag.work / "missing.img"), str(ag.work), "relative.img", "",
                                            str(ag.work / "a\x00b.img"), str(ag.work / "x\n.img"),
                                            str(ag.work / ".." / "y.img")]), HOSTILE_TEXT.map(lambda t: "/nonexistent/" + t))

    @st.composite
    def build(draw):
        hostile = segment(draw(HOSTILE_TEXT.filter(lambda t: t != "vm1")))
        name = segment(draw(st.one_of(st.just("vm1"), HOSTILE_TEXT)))
        method, path, fields = draw(st.sampled_from([
            ("GET", "/v1/status", []), ("GET", "/v1/vms", []), ("POST", "/v1/vms", ["name", "disks", "read_only"]),
            ("GET", "/v1/vms/{name}", []), ("DELETE", "/v1/vms/{hostile}", []), ("POST", "/v1/vms/{name}/cut", []),
            ("POST", "/v1/vms/{name}/replication", ["replica_server", "port", "key_file", "frequency_s", "compression",
                                                    "recovery_history", "fine_window_min", "app_consistent_hours",
                                                    "auth", "tls", "ca_file", "cert_file", "cert_key_file"]),
            ("PATCH", "/v1/vms/{name}/replication", ["frequency_s", "compression", "recovery_history"]),
            ("DELETE", "/v1/vms/{hostile}/replication", []), ("GET", "/v1/vms/{name}/replication/measure", []),
            ("POST", "/v1/vms/{name}/replication/initial", ["at_ns", "use_existing"]),
            ("POST", "/v1/vms/{name}/replication/sync-now", ["wait"]),
            ("POST", "/v1/vms/{name}/replication/suspend", []), ("POST", "/v1/vms/{name}/replication/resume", []),
            ("GET", "/v1/replication", []), ("GET", "/v1/replication/{name}", []),
            ("GET", "/v1/settings", []), ("PATCH", "/v1/settings", ["bandwidth_limit", "bandwidth_schedule",
                                                "max_active_transfers"]),
            ("DELETE", "/v1/settings", []), ("PATCH", "/v1/vms/{name}", ["tracking"]),
            ("POST", "/v1/vms/{name}/replication/statistics/reset", []),
            ("GET", "/v1/server", []), ("PATCH", "/v1/server", ["monitoring_interval_s", "monitoring_start"]),
            ("POST", "/v1/vms/{name}/replication/initial/export", ["directory", "chunk_bytes"]),
            ("POST", "/v1/vms/{name}/replication/resync", ["at_ns", "cancel"]),
            ("POST", "/v1/vms/{name}/replication/verify", ["repair"]),
            ("POST", "/v1/vms/{hostile}/failover/prepare", []),
            ("DELETE", "/v1/vms/{hostile}/failover/prepare", []),
            ("POST", "/v1/vms/{hostile}/failover/serve", ["vm_id", "generation", "recovery_point", "disks"]),
            ("DELETE", "/v1/vms/{hostile}/failover/serve", []),
            ("POST", "/v1/vms/{hostile}/failover/serve/complete", []),
            ("POST", "/v1/vms/{hostile}/failover/reverse", ["replica_server", "port", "key_file", "frequency_s"]),
        ]))
        target = path.format(name=name, hostile=hostile)
        if path == "/v1/vms" and method == "POST" and draw(st.booleans()):
            body = json.dumps({"name": draw(HOSTILE_TEXT), "disks": draw(st.lists(disk_paths, max_size=3)),
                               "read_only": draw(st.booleans())}).encode()
        else:
            body = draw(bodies(fields))
        return method, target, body
    return build()


def _fuzz_agent_admin(ag: AgentProcess, profile: settings) -> None:
    baseline = [agent_state(ag)]

    @profile
    @given(case=agent_requests(ag))
    def run(case):
        method, target, body = case
        reply = exchange_unix(ag.admin_socket, request_bytes(method, target, body,
                                                             {"Content-Type": "application/json"}))
        _json_answer(reply)
        if reply.status >= 400:
            assert agent_state(ag) == baseline[0], f"refused {method} {target} changed the state"
        else:
            baseline[0] = agent_state(ag)
    run()
    ag.assert_alive()


def test_fuzz_the_agent_admin_api(agent):
    _fuzz_agent_admin(agent, QUICK)


@pytest.mark.slow
def test_fuzz_the_agent_admin_api_deep(agent):
    _fuzz_agent_admin(agent, DEEP)
