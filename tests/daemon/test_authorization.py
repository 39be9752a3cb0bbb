"""Authorization entries, trust groups, key rotation and the limit on failed authentications (real listener).

Every refusal checks its status, its JSON error code, and that the replica's
images and state did not change.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time

import pytest

from daemons import wait_for
from hvr_common.pure.token_auth import Key
from hvr_common.shell.key_file import write_key
from bundles import bundle, hrl_bytes
from hvr_common.pure.bundle import BundleKind
from listener_process import ListenerProcess, call, call_json, open_request, read_reply
from replica_vm import SIZE, Vm
from replication_pair import MiB, Pair, make_disk, qemu_io


def _refused(vm: Vm, reply, status: int, code: str, before) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.code == code, reply.body
    assert vm.snapshot() == before, "a refused request changed the replica"


def _as(lp: ListenerProcess, key: Key) -> ListenerProcess:
    lp.key = key
    return lp


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """A replica server for two organisations: site1 (a wildcard entry) and site2 (one exact entry)."""
    root = tmp_path_factory.mktemp("authz")
    lp = ListenerProcess(root / "listener")
    lp.start().wait_ready()
    lp.site1_a, _ = lp.new_key("a.site1.example")
    lp.site1_b, _ = lp.new_key("b.site1.example")
    lp.site2, _ = lp.new_key("c.site2.example")
    lp.stranger, _ = lp.new_key("d.elsewhere.example")
    lp.s1, lp.s2 = root / "site1", root / "site2"
    lp.hvrctl("authz", "add", "*.site1.example", "--storage", lp.s1, "--trust-group", "site1")
    lp.hvrctl("authz", "add", "c.site2.example", "--storage", lp.s2, "--trust-group", "site2")
    lp.hvrctl("server", "set", "--allow-any", "false")
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def web1(sites):
    vm = Vm(_as(sites, sites.site1_a), "web1")
    assert vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"1" * 4096)]])).status == 201
    vm.expected[0][0:4096] = b"1" * 4096
    vm.wait_applied(1)
    return vm


def test_entries_are_listed_and_replicas_go_to_per_vm_id_folders_of_their_entry(sites, web1):
    entries = sites.hvrctl_json("authz", "list")
    assert entries == [{"pattern": "*.site1.example", "storage": str(sites.s1), "trust_group": "site1"},
                       {"pattern": "c.site2.example", "storage": str(sites.s2), "trust_group": "site2"}]
    assert web1.folder() == sites.s1 / str(web1.vm_id)
    rep = sites.hvrctl_json("replica", "get", "web1")
    assert rep["trust_group"] == "site1" and rep["primary_server"] == "a.site1.example"
    web1.assert_images()
    table = sites.hvrctl("authz", "list").stdout
    assert "*.site1.example" in table and "site2" in table


def test_a_primary_of_another_trust_group_is_refused_for_every_request(sites, web1):
    before = web1.snapshot()
    base = f"/v1/replicas/{web1.vm_id}"
    gen = {"X-Hvr-Generation": "1"}
    k = sites.site2
    _refused(web1, web1.put_cycle(2, web1.cycle_body(2, [[("write", 0, b"x" * 4096)]]), key=k), 403,
             "other_trust_group", before)
    _refused(web1, call(sites.port, "GET", base, key=k), 403, "other_trust_group", before)
    _refused(web1, call_json(sites.port, "PUT", base, web1.enable_body(), key=k), 403, "other_trust_group", before)
    _refused(web1, call_json(sites.port, "POST", f"{base}/initial/complete", {"generation": 1, "next_sequence": 1},
                             key=k), 403, "other_trust_group", before)
    _refused(web1, call_json(sites.port, "PUT", f"{base}/settings", {"recovery_history": 2}, key=k, headers=gen),
             403, "other_trust_group", before)
    window = call(sites.port, "PUT", f"{base}/initial/{web1.disk_ids[0]}?offset=0&end={2 * MiB}", b"z" * 100,
                  key=k, headers=gen)
    _refused(web1, window, 403, "other_trust_group", before)
    assert "trust group" in window.json()["message"] and window.json()["detail"]["trust_group"] == "site2"
    for method, path, body in (  # the routes of streamed cycles, resync and the heartbeat too
            ("POST", f"{base}/cycles/2/commit", {"sha256": "0" * 64, "bytes": 0}),
            ("POST", f"{base}/digests/{web1.disk_ids[0]}", {"size_bytes": SIZE, "level": 0, "indices": [0]}),
            ("POST", f"{base}/resync/complete", {"generation": 1, "next_sequence": 2}),
            ("POST", f"{base}/heartbeat", {"running": False, "nbd_clients": 0})):
        _refused(web1, call_json(sites.port, method, path, body, key=k, headers=gen), 403, "other_trust_group",
                 before)
    streamed = web1.stream_cycle(2, web1.cycle_body(2, [[("write", 0, b"x" * 4096)]], streamed=True), key=k)
    _refused(web1, streamed, 403, "other_trust_group", before)
    log = sites.stdout_path.read_text() + sites.stderr_path.read_text()
    assert "other_trust_group" in log  # logged


def test_a_primary_no_entry_matches_is_refused(sites, web1):
    before = web1.snapshot()
    r = web1.put_cycle(2, web1.cycle_body(2, [[("write", 0, b"x" * 4096)]]), key=sites.stranger)
    _refused(web1, r, 403, "not_authorized", before)
    assert "hvrctl authz add" in r.json()["hint"]
    r = call(sites.port, "GET", "/v1/server", key=sites.stranger)
    assert r.status == 403 and r.code == "not_authorized"


def test_a_primary_of_the_same_trust_group_is_accepted(sites, web1):
    """The VM moved to another primary host of the same organisation: it goes on replicating."""
    data = b"2" * 4096
    r = web1.put_cycle(2, web1.cycle_body(2, [[("write", 8192, data)]]), key=sites.site1_b)
    assert r.status == 201, r.body
    web1.expected[0][8192:8192 + 4096] = data
    web1.wait_applied(2)
    web1.assert_images()
    assert call(sites.port, "GET", f"/v1/replicas/{web1.vm_id}", key=sites.site1_b).status == 200


def test_a_changed_storage_location_applies_only_to_new_replicas(sites, web1, tmp_path):
    moved = tmp_path / "site1-new"
    changed = sites.hvrctl_json("authz", "set", "*.site1.example", "--storage", moved)
    assert changed == {"pattern": "*.site1.example", "storage": str(moved), "trust_group": "site1"}
    web2 = Vm(_as(sites, sites.site1_b), "web2", initial=False)
    assert web2.folder() == moved / str(web2.vm_id)
    assert all(p.stat().st_size == SIZE for p in web2.image_paths())
    assert web1.folder() == sites.s1 / str(web1.vm_id)  # the existing replica stays where it is
    web1.assert_images()
    assert sites.hvrctl_json("replica", "get", "web2")["trust_group"] == "site1"
    sites.hvrctl("authz", "set", "*.site1.example", "--storage", sites.s1)


@pytest.mark.parametrize("args, exit_code, words", [
    (["add", "c.site2.example", "--storage", "/srv/x", "--trust-group", "g"], 4, "exists already"),
    (["add", "web*.site3.example", "--storage", "/srv/x", "--trust-group", "g"], 2, "pattern"),
    (["add", "e.site3.example", "--storage", "srv/x", "--trust-group", "g"], 2, "storage location"),
    (["add", "e.site3.example", "--storage", "/srv/../etc", "--trust-group", "g"], 2, "storage location"),
    (["add", "e.site3.example", "--storage", "/srv/x", "--trust-group", "a b"], 2, "trust group"),
    (["set", "nobody.example", "--trust-group", "g"], 3, "no authorization entry"),
    (["set", "c.site2.example"], 2, "nothing to change"),
    (["remove", "nobody.example"], 3, "no authorization entry"),
])
def test_bad_entry_commands_are_refused_and_change_nothing(sites, args, exit_code, words):
    before = sites.hvrctl_json("authz", "list")
    result = sites.hvrctl("authz", *args, check=False)
    assert result.returncode == exit_code, result.stderr
    assert words in result.stderr
    assert sites.hvrctl_json("authz", "list") == before


def test_removing_an_entry_refuses_its_primaries_from_the_next_request(sites, web1):
    assert call(sites.port, "GET", "/v1/server", key=sites.site2).status == 200
    site2_open = http.client.HTTPConnection("127.0.0.1", sites.port, timeout=30)
    site1_open = http.client.HTTPConnection("127.0.0.1", sites.port, timeout=30)
    assert _signed_keepalive_get(site2_open, sites.site2) == 200
    assert _signed_keepalive_get(site1_open, sites.site1_a) == 200
    removed = sites.hvrctl_json("authz", "remove", "c.site2.example")
    assert removed["removed"] == "c.site2.example"
    assert removed["connections_closed"] == 1  # the removed primary's open connection, not site1's
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine)):
        _signed_keepalive_get(site2_open, sites.site2)
    site2_open.close()
    assert _signed_keepalive_get(site1_open, sites.site1_a) == 200
    site1_open.close()
    r = call(sites.port, "GET", "/v1/server", key=sites.site2)
    assert r.status == 403 and r.code == "not_authorized"
    sites.hvrctl("authz", "add", "c.site2.example", "--storage", sites.s2, "--trust-group", "site2")
    assert call(sites.port, "GET", "/v1/server", key=sites.site2).status == 200


def test_allow_any_puts_new_replicas_in_the_default_storage_and_trust_group(tmp_path):
    """The default mode: every authenticated primary, trust group DEFAULT, the default storage location;
    entries are kept but not consulted."""
    lp = ListenerProcess(tmp_path / "l")
    lp.start().wait_ready()
    try:
        assert lp.hvrctl_json("server", "get")["allow_any_authenticated"] is True
        first, _ = lp.new_key("p1.example")
        second, _ = lp.new_key("p2.example")
        lp.hvrctl("authz", "add", "p2.example", "--storage", tmp_path / "elsewhere", "--trust-group", "g2")
        vm = Vm(_as(lp, first), "anyvm")
        assert vm.folder() == lp.storage / str(vm.vm_id)
        assert lp.hvrctl_json("replica", "get", "anyvm")["trust_group"] == "DEFAULT"
        data = b"2" * 4096  # another DEFAULT primary (the entry is not consulted) may go on replicating it
        r = vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, data)]]), key=second)
        assert r.status == 201, r.body
        vm.expected[0][0:4096] = data
        vm.wait_applied(1)
        vm.assert_images()
        assert not (tmp_path / "elsewhere").exists()
    finally:
        lp.close()


# --- keys: two per principal, removal closes connections ------------------------------------

def test_two_keys_per_principal_then_the_old_one_removed(tmp_path):
    lp = ListenerProcess(tmp_path / "l")
    lp.start().wait_ready()
    try:
        old, _ = lp.new_key("p1.example")
        new = Key.generate("p1.example")
        write_key(new, tmp_path / "new.key")
        added = lp.hvrctl_json("server", "key", "add", tmp_path / "new.key")
        assert added == {"principal": "p1.example", "key_id": new.key_id, "replaced": []}
        listed = lp.hvrctl_json("server", "key", "list")
        assert [k["key_id"] for k in listed] == [old.key_id, new.key_id]
        assert all(call(lp.port, "GET", "/v1/server", key=k).status == 200 for k in (old, new))
        third = Key.generate("p1.example")
        write_key(third, tmp_path / "third.key")
        refused = lp.hvrctl("server", "key", "add", tmp_path / "third.key", check=False)
        assert refused.returncode == 4 and "at most 2" in refused.stderr
        again = lp.hvrctl("server", "key", "add", tmp_path / "new.key", check=False)
        assert again.returncode == 4 and "installed already" in again.stderr
        lp.hvrctl("server", "key", "remove", "p1.example", "--key-id", old.key_id)
        assert call(lp.port, "GET", "/v1/server", key=old).status == 401
        assert call(lp.port, "GET", "/v1/server", key=new).status == 200
        unknown = lp.hvrctl("server", "key", "remove", "p1.example", "--key-id", old.key_id, check=False)
        assert unknown.returncode == 3
        replaced = lp.hvrctl_json("server", "key", "add", tmp_path / "third.key", "--replace")
        assert replaced["replaced"] == [new.key_id]
        assert call(lp.port, "GET", "/v1/server", key=new).status == 401
        assert call(lp.port, "GET", "/v1/server", key=third).status == 200
    finally:
        lp.close()


def _signed_keepalive_get(conn: http.client.HTTPConnection, key: Key) -> int:
    from hvr_common.pure.token_auth import EMPTY_SHA256, authorization
    conn.request("GET", "/v1/server", headers={
        "X-Hvr-Content-SHA256": EMPTY_SHA256,
        "Authorization": authorization(key, "GET", "/v1/server", EMPTY_SHA256, int(time.time()))})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_removing_a_principals_last_key_closes_its_open_connections(tmp_path):
    lp = ListenerProcess(tmp_path / "l")
    lp.start().wait_ready()
    try:
        p1_old, _ = lp.new_key("p1.example")
        p2, _ = lp.new_key("p2.example")
        p1_new = Key.generate("p1.example")
        write_key(p1_new, tmp_path / "p1-new.key")
        lp.hvrctl("server", "key", "add", tmp_path / "p1-new.key")
        idle = http.client.HTTPConnection("127.0.0.1", lp.port, timeout=30)
        other = http.client.HTTPConnection("127.0.0.1", lp.port, timeout=30)
        assert _signed_keepalive_get(idle, p1_old) == 200 and _signed_keepalive_get(other, p2) == 200
        vm = Vm(_as(lp, p1_new), "busy", initial=False)
        # an upload in flight: an initial window's head and the first bytes of its body sent
        disk_id = vm.disk_ids[0]
        log = hrl_bytes(vm.vm_id, disk_id, 1, 0, SIZE, [("write", 0, os.urandom(65536))])
        body = bundle(BundleKind.INITIAL, vm.vm_id, 1, 0, [(disk_id, SIZE, 0, 2 * MiB, log)])
        uploading = open_request(lp.port, "PUT", f"/v1/replicas/{vm.vm_id}/initial/{disk_id}?offset=0&end={2 * MiB}",
                                 body, key=p1_new, headers={"X-Hvr-Generation": "1"}, send_body=body[:10],
                                 content_length=len(body))
        # one of two keys removed: the principal is still allowed, nothing is closed
        kept = lp.hvrctl_json("server", "key", "remove", "p1.example", "--key-id", p1_old.key_id)
        assert kept["connections_closed"] == 0
        assert _signed_keepalive_get(idle, p1_new) == 200
        # its last key removed: every open connection of p1 is closed, p2's stays
        gone = lp.hvrctl_json("server", "key", "remove", "p1.example")
        assert gone["key_ids"] == [p1_new.key_id] and gone["connections_closed"] >= 1
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine)):
            _signed_keepalive_get(idle, p1_new)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine)):
            read_reply(uploading)  # the upload in flight was cut off
        uploading.close()
        assert _signed_keepalive_get(other, p2) == 200
        other.close()
        assert call(lp.port, "GET", f"/v1/replicas/{vm.vm_id}", key=p1_new).status == 401
    finally:
        lp.close()


# --- failed authentications -----------------------------------------------------------------

def test_failed_authentications_are_limited_per_address_with_a_clear_429(tmp_path):
    lp = ListenerProcess(tmp_path / "l")
    lp.start().wait_ready()
    try:
        lp.key, _ = lp.new_key("p1.example")
        vm = Vm(lp, "guarded")
        before = vm.snapshot()

        def images_and_record() -> tuple:  # without the replication API, which refuses this address for now
            rep = lp.hvrctl_json("replica", "get", "guarded")
            return (tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in vm.image_paths()),
                    rep["state"], rep["next_sequence"], rep["last_applied_sequence"])
        unchanged = images_and_record()
        forged = Key("p1.example", b"\x09" * 32)
        statuses = [vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"f" * 4096)]]), key=forged).status
                    for _ in range(10)]
        assert statuses == [401] * 10
        limited = vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"f" * 4096)]]), key=forged)
        assert limited.status == 429 and limited.code == "auth_rate_limited", limited.body
        doc = limited.json()
        assert 1 <= doc["detail"]["retry_after_s"] <= 10 and "too many failed authentications" in doc["message"]
        # even a good signature from that address waits: guessing gains nothing
        good = vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"g" * 4096)]]))
        assert good.status == 429 and good.code == "auth_rate_limited"
        assert images_and_record() == unchanged

        def allowed_again() -> bool:
            return call(lp.port, "GET", "/v1/server", key=lp.key).status == 200
        wait_for(allowed_again, 30, "the address to be allowed again", interval_s=0.5)
        assert vm.snapshot() == before
    finally:
        lp.close()


# --- rotation without downtime (agent and listener) -----------------------------------------

def test_replication_keeps_running_across_a_key_rotation(tmp_path):
    pair = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}).start()
    try:
        size = 8 * MiB
        disk = make_disk(tmp_path / "rot.img", size)
        pair.protect("rot", [disk])
        pair.initial("rot")
        uri = pair.agent.nbd_uri("rot", "rot")
        old_id = pair.listener.hvrctl_json("server", "key", "list")[0]["key_id"]

        def cycle(pattern: int) -> None:
            qemu_io(uri, f"write -P {pattern} {pattern * 65536} 65536")
            pair.sync("rot")
            pair.wait_replica_applied("rot")

        cycle(1)
        # 1. the new key is added on the listener beside the old one
        new = Key.generate("primary.example")
        write_key(new, tmp_path / "new.key")
        pair.listener.hvrctl("server", "key", "add", tmp_path / "new.key")
        cycle(2)
        # 2. the agent is switched: its key file replaced, read again at the next request
        write_key(new, pair.key_path, overwrite=True)
        cycle(3)
        # 3. the old key is removed
        removed = pair.listener.hvrctl_json("server", "key", "remove", "primary.example", "--key-id", old_id)
        assert removed["key_ids"] == [old_id] and removed["connections_closed"] == 0
        cycle(4)
        cycle(5)
        pair.assert_identical("rot", [disk])
        st = pair.status("rot")
        assert st["state"] == "Replicating", st
        measure = pair.agent.hvrctl_json("vm", "measure", "rot", "-o", "json")
        assert measure["ReplicationErrors"] == 0 and measure["SuccessfulReplicationCount"] >= 5, measure
        assert [k["key_id"] for k in pair.listener.hvrctl_json("server", "key", "list")] == [new.key_id]
        assert "key_file_unusable" not in pair.agent.log_tail(400)
    finally:
        pair.close()
