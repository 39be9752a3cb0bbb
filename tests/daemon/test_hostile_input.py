"""The listener probed as an attacker would: each hostile request is a 4xx with a JSON error body and changes nothing.

Every refusal checks the status, the error code in the JSON body, and that the
victim replica's images (SHA-256) and state are unchanged.
"""

from __future__ import annotations

import json
import os
import uuid
from urllib.parse import quote

import pytest

from bundles import hrl_bytes
from hvr_common.pure.bundle import CODEC_ZSTD, FRAME, BundleHeader, BundleKind, DiskEntry
from listener_process import ListenerProcess, call, call_json
from raw_http import exchange, exchange_unix, request_bytes, signed
from replica_vm import SIZE, Vm
from small_tmpfs import small_tmpfs

MiB = 1024 * 1024
TOO_BIG = 2 ** 63  # one more than SQLite's INTEGER holds
GEN1 = {"X-Hvr-Generation": "1"}


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    lp = ListenerProcess(tmp_path_factory.mktemp("hostile"), extra_config={"max_bundle_bytes": 8 * MiB})
    lp.start().wait_ready()
    lp.key, _ = lp.new_key("primary1.example")
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def victim(listener):
    vm = Vm(listener, "victim")
    assert vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"v" * 4096)]])).status == 201
    vm.expected[0][0:4096] = b"v" * 4096
    vm.wait_applied(1)
    return vm


def refused(vm: Vm, reply, status: int, code: str, before) -> dict:
    assert reply.status == status, (reply.status, reply.body[:500])
    doc = json.loads(reply.body)
    assert doc["code"] == code, doc
    assert vm.snapshot() == before, "a refused request changed the replica"
    return doc


def storage_names(lp: ListenerProcess) -> set[str]:
    return {p.name for p in lp.storage.iterdir()} if lp.storage.exists() else set()


def enable_body(name: str, **changes) -> dict:
    body = {"name": name, "generation": 1, "frequency_s": 30, "compression": True,
            "disks": [{"disk_id": str(uuid.uuid4()), "name": "d0", "size_bytes": SIZE}]}
    body.update(changes)
    return body


# --- integers beyond SQLite's range ---------------------------------------------------------------

@pytest.mark.parametrize("field", ["generation", "frequency_s"])
def test_an_enable_with_an_integer_beyond_sqlite_is_400_and_leaves_no_files(listener, victim, field):
    before, names = victim.snapshot(), storage_names(listener)
    vm_id = uuid.uuid4()
    r = call_json(listener.port, "PUT", f"/v1/replicas/{vm_id}", enable_body("bigint", **{field: TOO_BIG}),
                  key=listener.key)
    refused(victim, r, 400, "bad_request", before)
    assert field in r.json()["message"]
    assert storage_names(listener) == names, "a refused enable left files behind"
    ok = call_json(listener.port, "PUT", f"/v1/replicas/{vm_id}", enable_body("bigint"), key=listener.key)
    assert ok.status == 201, ok.body  # the name is not blocked
    listener.hvrctl("replica", "remove", "bigint", "--delete-storage")


@pytest.mark.parametrize("field", ["generation", "next_sequence"])
def test_resync_complete_with_a_number_beyond_sqlite_is_400(listener, victim, field):
    before = victim.snapshot()
    body = {"generation": 1, "next_sequence": victim.state()["next_sequence"], field: TOO_BIG}
    r = call_json(listener.port, "POST", f"/v1/replicas/{victim.vm_id}/resync/complete", body, key=listener.key,
                  headers=GEN1)
    refused(victim, r, 400, "bad_request", before)
    assert field in r.json()["message"]


def test_initial_complete_with_next_sequence_beyond_sqlite_is_400(listener, victim):
    before = victim.snapshot()
    r = call_json(listener.port, "POST", f"/v1/replicas/{victim.vm_id}/initial/complete",
                  {"generation": 1, "next_sequence": TOO_BIG}, key=listener.key)
    refused(victim, r, 400, "bad_request", before)
    assert "next_sequence" in r.json()["message"]


@pytest.mark.parametrize("where", ["generation header", "sequence", "offset", "end"])
@pytest.mark.parametrize("number", [str(TOO_BIG), "9" * 5000, "²", "١٢", "+1", "1 2", "0x10", "1_0", "-1", ""])
def test_numbers_in_paths_queries_and_headers_are_ascii_digits_in_range(listener, victim, where, number):
    before = victim.snapshot()
    disk_id = victim.disk_ids[0]
    gen, seq, offset, end = "1", "2", "0", str(2 * MiB)
    if where == "generation header":
        gen = number
    elif where == "sequence":
        seq = number
    elif where == "offset":
        offset = number
    else:
        end = number
    if where in ("offset", "end"):
        path = f"/v1/replicas/{victim.vm_id}/initial/{disk_id}?offset={offset}&end={end}"
    else:
        path = f"/v1/replicas/{victim.vm_id}/cycles/{seq}"
    # the path and query percent-encoded as sent (and signed); a header's bytes as UTF-8
    r = signed(listener.port, "PUT", quote(path, safe="/?=&"), b"x" * 100, key=listener.key,
               headers={"X-Hvr-Generation": gen.encode("utf-8").decode("latin-1")})
    if where == "sequence" and number == "":  # no such route
        refused(victim, r, 404, "http_error", before)
        return
    doc = refused(victim, r, 400, "bad_request", before)
    assert len(doc["message"]) < 400, "the message repeats the whole hostile input"


# --- JSON nested 100,000 deep, and other oversized JSON ------------------------------------------

@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,
                                 b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                 b'{"a":' * 50 + b"1" + b"}" * 50,
                                 b'{"generation": ' + b"9" * 10_000 + b"}"])
def test_deep_or_huge_json_is_400(listener, victim, raw):
    before = victim.snapshot()
    r = call(listener.port, "PUT", f"/v1/replicas/{uuid.uuid4()}", raw, key=listener.key)
    refused(victim, r, 400, "bad_request", before)
    r = call(listener.port, "PUT", f"/v1/replicas/{victim.vm_id}/settings", raw, key=listener.key, headers=GEN1)
    refused(victim, r, 400, "bad_request", before)


# --- names that could reach a path ----------------------------------------------------------------

@pytest.mark.parametrize("vm_name, disk_name", [
    ("vm\n", "d0"), ("vm", "d0\n"), ("..", "d0"), ("vm", ".."), ("a/b", "d0"), ("vm", "../d0"), ("vm\x00", "d0"),
    ("vm", "d\x000"), (".hidden", "d0"), ("vm", "-d"), ("v" * 65, "d0"), ("vm ", "d0"), ("vm", "d0\r"),
    ("vé", "d0"), ("", "d0"), ("vm", ""),
])
def test_vm_and_disk_names_that_could_reach_a_path_are_400(listener, victim, vm_name, disk_name):
    before, names = victim.snapshot(), storage_names(listener)
    body = enable_body(vm_name)
    body["disks"][0]["name"] = disk_name
    r = call_json(listener.port, "PUT", f"/v1/replicas/{uuid.uuid4()}", body, key=listener.key)
    refused(victim, r, 400, "bad_request", before)
    assert storage_names(listener) == names


@pytest.mark.parametrize("location", ["relative/path", "/srv/../etc", "/srv/x\n", "/srv/\x00x", "/" + "a" * 5000])
def test_a_storage_location_that_is_not_a_plain_absolute_path_is_refused(listener, location):
    from hvrctl.client import AdminClient
    from hvr_common.pure.errors import HvrError
    before = listener.hvrctl_json("server", "get")["default_storage"]
    with pytest.raises(HvrError) as info:
        AdminClient(listener.admin_socket, "hvr-listener").request("PATCH", "/v1/server",
                                                                   {"default_storage": location})
    assert info.value.code == "bad_request"
    assert listener.hvrctl_json("server", "get")["default_storage"] == before


# --- a zstd frame followed by extra data ----------------------------------------------------------

def _bundle_with_junk_after_a_zstd_frame(vm: Vm, seq: int, junk: bytes) -> bytes:
    import zstandard
    disk_id = vm.disk_ids[0]
    log = hrl_bytes(vm.vm_id, disk_id, 1, seq, SIZE, [("write", 0, b"j" * 65536)])
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(log) + junk
    payload = FRAME.pack(CODEC_ZSTD, len(frame), len(log)) + frame
    entry = DiskEntry(disk_id, len(payload), len(log), 0, SIZE, 1)
    header = BundleHeader(BundleKind.CYCLE, vm.vm_id, 1, seq, 1, (entry,))
    return header.encode() + payload


@pytest.mark.parametrize("junk", [b"junk", b"\x28\xb5\x2f\xfd" + bytes(20)])
def test_a_zstd_frame_followed_by_extra_data_is_refused_and_not_stored(listener, victim, junk):
    before = victim.snapshot()
    body = _bundle_with_junk_after_a_zstd_frame(victim, 2, junk)
    r = victim.put_cycle(2, body)
    refused(victim, r, 400, "bundle_corrupt", before)
    assert not any((victim.folder() / "cycles").glob("0000000002.bundle"))
    assert not any((victim.folder() / "incoming").iterdir())


# --- HTTP framing errors are answered in JSON -----------------------------------------------------

FRAMING_ERRORS = [
    b"GARBAGE\r\n\r\n",
    b"GET /v1/server HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/server HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n",
    b"GET /v1/server HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    b"PUT /v1/server HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"PUT /v1/server HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"PUT /v1/server HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
    b"GET /v1/server HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"GET /v1/server HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
]
FRAMING_IDS = ["garbage", "version", "long-line", "long-header", "many-headers", "bad-length", "two-lengths",
               "bad-chunk", "bad-header-name", "nul-in-header"]


@pytest.mark.parametrize("request_bytes", FRAMING_ERRORS, ids=FRAMING_IDS)
def test_http_framing_errors_are_answered_with_the_json_error_body(listener, victim, request_bytes):
    before = victim.snapshot()
    r = exchange(listener.port, request_bytes)
    assert 400 <= r.status < 500, (r.status, r.body[:300])
    assert r.content_type.startswith("application/json"), (r.content_type, r.body[:300])
    doc = json.loads(r.body)
    assert doc["code"] == "http_malformed" and doc["message"], doc
    assert len(r.body) < 1000
    assert victim.snapshot() == before
    assert listener.is_alive()


@pytest.mark.parametrize("request_bytes", FRAMING_ERRORS, ids=FRAMING_IDS)
def test_http_framing_errors_on_both_admin_sockets_are_json_too(listener, victim, agent, request_bytes):
    before, vms = victim.snapshot(), _agent_state(agent)
    for socket_path in (listener.admin_socket, agent.admin_socket):
        r = exchange_unix(socket_path, request_bytes)
        assert r.status == 400 and r.content_type.startswith("application/json"), (socket_path, r.status, r.body)
        assert json.loads(r.body)["code"] == "http_malformed" and len(r.body) < 1000, r.body
    assert victim.snapshot() == before and _agent_state(agent) == vms
    assert listener.is_alive()
    agent.assert_alive()


def test_a_json_body_over_1_mib_on_either_admin_socket_is_413(listener, victim, agent):
    before, vms, keys = victim.snapshot(), _agent_state(agent), listener.hvrctl_json("server", "key", "list")
    big = json.dumps({"principal": "p.example", "secret": "A" * (2 * MiB)}).encode()
    for socket_path, target in ((listener.admin_socket, "/v1/keys"), (agent.admin_socket, "/v1/vms")):
        r = exchange_unix(socket_path, request_bytes("POST", target, big, {"Content-Type": "application/json"}))
        assert r.status == 413 and r.content_type.startswith("application/json"), (r.status, r.body[:300])
        assert json.loads(r.body)["code"] == "http_error"
    assert victim.snapshot() == before and _agent_state(agent) == vms
    assert listener.hvrctl_json("server", "key", "list") == keys


def test_an_unknown_route_and_a_wrong_method_are_json_too(listener):
    for method, path, status in (("GET", "/nowhere", 404), ("DELETE", "/v1/server", 405)):
        r = signed(listener.port, method, path, key=listener.key)
        assert r.status == status and r.content_type.startswith("application/json"), (r.status, r.body)
        assert json.loads(r.body)["code"] == "http_error"


# --- numbers and times of the admin API: ASCII digits in range, or 400 -----------------------------
# str.isdigit() takes '²' (int() then fails: a 500) and '١٢' (int() reads 12: a wrong value accepted)

ODD_NUMBERS = ["²", "١٢", "+1", "1_0", " 1", str(TOO_BIG), "9" * 5000]


def server_settings(lp: ListenerProcess) -> dict:
    """The server's settings as hvrctl shows them, without the applies running at this instant."""
    view = lp.hvrctl_json("server", "get")
    view.pop("active_applies", None)
    return view


def admin(lp: ListenerProcess, method: str, target: str, body: dict | None = None):
    raw = json.dumps(body).encode() if body is not None else b""
    return exchange_unix(lp.admin_socket, request_bytes(method, quote(target, safe="/?=&"), raw,
                                                        {"Content-Type": "application/json"}))


@pytest.mark.parametrize("number", ODD_NUMBERS)
@pytest.mark.parametrize("route", ["backup data offset", "backup data length", "backup extents offset",
                                   "recovery point release"])
def test_numbers_in_admin_paths_and_queries_are_ascii_digits_in_range(listener, victim, route, number):
    before, server = victim.snapshot(), server_settings(listener)
    target = {"backup data offset": f"/v1/replicas/victim/backup/disks/d0/data?offset={number}&length=1",
              "backup data length": f"/v1/replicas/victim/backup/disks/d0/data?offset=0&length={number}",
              "backup extents offset": f"/v1/replicas/victim/backup/disks/d0/extents?offset={number}",
              "recovery point release": f"/v1/replicas/victim/recovery-points/{number}/release"}[route]
    r = admin(listener, "GET" if "backup" in route else "POST", target)
    doc = refused(victim, r, 400, "bad_request", before)
    assert len(doc["message"]) < 400, "the message repeats the whole hostile input"
    assert server_settings(listener) == server


@pytest.mark.parametrize("route", ["backup", "test-failover", "failover"])
@pytest.mark.parametrize("point", [TOO_BIG, 2 ** 80, 0, -1, "1", 1.0, True])
def test_a_recovery_point_id_outside_sqlite_or_not_an_integer_is_400(listener, victim, route, point):
    """2^80 was taken as a point not applied yet (a 503 a backup product retries forever) or an unknown one."""
    before, server = victim.snapshot(), server_settings(listener)
    r = admin(listener, "POST", f"/v1/replicas/victim/{route}", {"recovery_point": point})
    doc = refused(victim, r, 400, "bad_request", before)
    assert "recovery_point" in doc["message"] and len(doc["message"]) < 400
    assert server_settings(listener) == server


@pytest.mark.parametrize("change", [{"monitoring_start": "²²:00"}, {"monitoring_start": "١٠:٠٠"},
                                    {"monitoring_start": "10:00\n"}, {"listen": "127.0.0.1:٢٨٧١١"},
                                    {"listen": "127.0.0.1:²"}], ids=["superscript", "arabic", "newline",
                                                                     "arabic-port", "superscript-port"])
def test_times_and_ports_of_the_server_settings_are_ascii_digits(listener, victim, change):
    before, server = victim.snapshot(), server_settings(listener)
    r = admin(listener, "PATCH", "/v1/server", change)
    refused(victim, r, 400, "bad_request", before)
    assert server_settings(listener) == server, "a refused setting was stored"


def test_the_victim_still_takes_a_good_cycle_after_all_that(listener, victim):
    data = os.urandom(4096)
    assert victim.put_cycle(2, victim.cycle_body(2, [[("write", 8192, data)]])).status == 201
    victim.expected[0][8192:8192 + 4096] = data
    victim.wait_applied(2)
    victim.assert_images()


# --- a full replica disk: a transient 507 the agent retries on ------------------------------------

@pytest.fixture
def small_storage(tmp_path):
    with small_tmpfs(tmp_path / "small", "16m", mode="0700") as mnt:
        yield mnt


def test_a_full_replica_disk_is_a_transient_507_and_stores_nothing(tmp_path, small_storage):
    from hvr_common.pure.wire.error_catalogue import CATALOGUE
    lp = ListenerProcess(tmp_path / "full", extra_config={"storage": str(small_storage / "replicas"),
                                                          "max_bundle_bytes": 8 * MiB})
    lp.storage = small_storage / "replicas"
    lp.start().wait_ready()
    try:
        lp.key, _ = lp.new_key("primary1.example")
        vm = Vm(lp, "fullvm")
        filler = small_storage / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill the file system up, to the last byte
            for size in (MiB, 4096, 1):
                try:
                    while os.write(fd, bytes(size)):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)
        before = vm.snapshot()
        body = vm.cycle_body(1, [[("write", 0, os.urandom(2 * MiB))]], compress=False)
        r = vm.put_cycle(1, body)
        doc = refused(vm, r, 507, "storage_full", before)
        assert CATALOGUE["storage_full"].transient and "free space" in doc["hint"]
        assert not any((vm.folder() / "incoming").iterdir()), "a partial spool file was left"
        assert not any((vm.folder() / "cycles").iterdir())
        filler.unlink()
        again = vm.put_cycle(1, body)  # with space back, the same cycle is taken
        assert again.status == 201, again.body
        vm.wait_applied(1)
    finally:
        lp.close()


# --- the agent checks the same rules ----------------------------------------------------------------

@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    from daemons import AgentProcess, make_image
    work = tmp_path_factory.mktemp("hostile-agent")
    ag = AgentProcess(work / "agent")
    ag.start().wait_ready()
    ag.image = make_image(work / "disk0.img", 4 * MiB)
    ag.add_vm("vm1", [ag.image])
    yield ag
    ag.close()


def _agent_state(ag) -> str:
    from hvrctl.client import AdminClient
    admin = AdminClient(ag.admin_socket, "hvr-agent")
    return json.dumps([admin.request("GET", "/v1/vms"), admin.request("GET", "/v1/replication")], sort_keys=True)


@pytest.mark.parametrize("body", [
    {"name": "vm\n", "disks": ["{image}"]},
    {"name": "..", "disks": ["{image}"]},
    {"name": "vm2", "disks": ["{image}\n"]},
    {"name": "vm2", "disks": ["{dir}/a\x00b.img"]},
    {"name": "vm2", "disks": ["{dir}/../{dir_name}/disk0.img"]},
    {"name": "vm2", "disks": ["relative.img"]},
    {"name": "vm2", "disks": ["/" + "a" * 5000]},
    {"name": "vm2", "disks": ["{dir}"]},
])
def test_the_agent_refuses_names_and_paths_that_could_reach_elsewhere(agent, body):
    from raw_http import exchange_unix, request_bytes
    image = str(agent.image)
    fill = {"image": image, "dir": str(agent.image.parent), "dir_name": agent.image.parent.name}
    body = dict(body, disks=[d.format(**fill) for d in body["disks"]])
    before = _agent_state(agent)
    r = exchange_unix(agent.admin_socket, request_bytes("POST", "/v1/vms", json.dumps(body).encode()))
    assert r.status == 400 and json.loads(r.body)["code"] == "bad_request", (r.status, r.body[:300])
    assert len(r.body) < 600
    assert _agent_state(agent) == before


@pytest.mark.parametrize("server", ["127.0.0.1\n", "replica example", "a/b", "x" * 300, "replica.example\x00"])
def test_the_agent_refuses_a_replica_server_that_is_not_a_host(agent, server, tmp_path):
    from raw_http import exchange_unix, request_bytes
    before = _agent_state(agent)
    body = {"replica_server": server, "port": 8443, "key_file": str(tmp_path / "k.key"), "frequency_s": 30}
    r = exchange_unix(agent.admin_socket, request_bytes("POST", "/v1/vms/vm1/replication", json.dumps(body).encode()))
    assert r.status == 400 and "replica_server" in json.loads(r.body)["message"], r.body[:300]
    assert _agent_state(agent) == before


@pytest.mark.parametrize("change", [{"bandwidth_limit": "9" * 400 + "MiB/s"}, {"bandwidth_limit": 2 ** 80},
                                    {"bandwidth_limit": "١٠MiB/s"},
                                    {"bandwidth_schedule": [{"start": "²:00", "end": "06:00", "limit": "1MiB/s"}]},
                                    {"bandwidth_schedule": [{"start": "01:00", "end": "06:00",
                                                             "limit": "9" * 400 + "GiB/s"}]}],
                         ids=["huge-rate-text", "huge-rate-int", "arabic-rate", "superscript-time", "huge-window-rate"])
def test_the_agents_transfer_settings_refuse_odd_or_huge_numbers(agent, change):
    from hvrctl.client import AdminClient
    admin = AdminClient(agent.admin_socket, "hvr-agent")
    before = admin.request("GET", "/v1/settings")
    r = exchange_unix(agent.admin_socket, request_bytes("PATCH", "/v1/settings", json.dumps(change).encode(),
                                                        {"Content-Type": "application/json"}))
    assert r.status == 400 and json.loads(r.body)["code"] == "bad_request", (r.status, r.body[:300])
    assert len(r.body) < 1000
    assert admin.request("GET", "/v1/settings") == before


def test_a_start_time_beyond_sqlite_is_400_not_a_crash_of_the_clock(tmp_path):
    """at_ns past 2^63 - 1 (year 2262) overflowed the date conversion of a VM ready for its initial copy: a 500."""
    from daemons import make_image
    from hvrctl.client import AdminClient
    from replication_pair import Pair
    pair = Pair(tmp_path).start()
    try:
        pair.protect("ready", [make_image(tmp_path / "ready.img", 4 * MiB)])
        admin = AdminClient(pair.agent.admin_socket, "hvr-agent")
        before = admin.request("GET", "/v1/replication/ready")
        for route in ("initial", "resync"):
            for at_ns in (TOO_BIG, 2 ** 80, -1, 1.5, True):
                r = exchange_unix(pair.agent.admin_socket, request_bytes(
                    "POST", f"/v1/vms/ready/replication/{route}", json.dumps({"at_ns": at_ns}).encode(),
                    {"Content-Type": "application/json"}))
                assert r.status == 400 and json.loads(r.body)["code"] == "bad_request", (route, at_ns, r.body[:300])
        assert admin.request("GET", "/v1/replication/ready") == before
        late = pair.agent.hvrctl("initial", "start", "ready", "--at", "+9999999999999h", check=False)
        assert late.returncode == 2 and "at_ns" in late.stderr and "Traceback" not in late.stderr, late.stderr
        assert admin.request("GET", "/v1/replication/ready") == before
    finally:
        pair.close()
