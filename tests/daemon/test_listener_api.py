"""The listener's replication API, driven by a hand-written signed HTTP client.

Every refusal test also checks that nothing changed: replica images (SHA-256)
and the replica's state as the API reports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from bundles import bundle, hrl_bytes
from daemons import wait_for
from hvr_common.pure.bundle import BundleKind
from hvr_common.pure.token_auth import Key
from hvrctl.client import AdminClient
from replica_vm import MiB, SIZE, Vm
from listener_process import ListenerProcess, call, call_json, open_request, read_reply

MiB = 1024 * 1024
@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    lp = ListenerProcess(tmp_path_factory.mktemp("listener"), extra_config={"max_bundle_bytes": 8 * MiB})
    lp.start().wait_ready()
    lp.key, _ = lp.new_key("primary1.example")
    lp.other_key, _ = lp.new_key("primary2.example")
    # two organisations: primary2 may replicate here, but never touch primary1's VMs
    lp.hvrctl("authz", "add", "primary1.example", "--storage", lp.storage, "--trust-group", "org1")
    lp.hvrctl("authz", "add", "primary2.example", "--storage", lp.storage, "--trust-group", "org2")
    lp.hvrctl("server", "set", "--allow-any", "false")
    yield lp
    lp.close()


def test_enable_creates_sparse_images_and_is_idempotent(listener):
    vm = Vm(listener, "enable1", disks=2, initial=False)
    for p in vm.image_paths():
        assert p.stat().st_size == SIZE and p.stat().st_blocks == 0
    again = call_json(listener.port, "PUT", f"/v1/replicas/{vm.vm_id}", vm.enable_body(), key=listener.key)
    assert again.status == 200
    changed = dict(vm.enable_body(), generation=2)
    r = call_json(listener.port, "PUT", f"/v1/replicas/{vm.vm_id}", changed, key=listener.key)
    assert r.status == 409 and r.code == "replica_conflict"
    assert vm.state()["state"] == "WaitingForInitialReplication"


def test_the_replica_stays_waiting_for_initial_replication_during_the_copy(listener):
    """As in Hyper-V: windows stored do not move the replica out of WaitingForInitialReplication (its health
    stays Warning, the copy is not complete); only the primary's completion does."""
    vm = Vm(listener, "copying", disks=2, initial=False)
    vm.send_initial_window(0, 0)
    vm.send_initial_window(1, 0)
    vm.send_initial_window(0, 2 * MiB)
    assert vm.state()["state"] == "WaitingForInitialReplication"
    seen = listener.hvrctl_json("replica", "get", "copying")
    assert seen["state"] == "WaitingForInitialReplication" and seen["health"] == "Warning"
    assert any("Initial replication" in d for d in seen["health_details"])
    vm.send_initial_window(1, 2 * MiB)  # every byte stored: still waiting for the primary's completion
    assert vm.state()["state"] == "WaitingForInitialReplication"
    vm.complete_initial()
    assert listener.hvrctl_json("replica", "get", "copying")["state"] == "Replicating"
    vm.assert_images()


def test_initial_then_cycles_are_applied_in_order(listener):
    vm = Vm(listener, "cycles1", disks=2)
    vm.assert_images()
    for seq in range(1, 4):
        ops = []
        for i in range(2):
            data = os.urandom(8192)
            off = 4096 * seq + i
            vm.expected[i][off:off + len(data)] = data
            ops.append([("write", off, data), ("zero", 3 * MiB, 4096)])
            vm.expected[i][3 * MiB:3 * MiB + 4096] = bytes(4096)
        r = vm.put_cycle(seq, vm.cycle_body(seq, ops))
        assert r.status == 201, r.body
        assert r.json()["next_sequence"] == seq + 1
    vm.wait_applied(3)
    vm.assert_images()
    history = listener.hvrctl_json("replica", "get", "cycles1")["cycles"]
    assert [c["sequence"] for c in history] == [1, 2, 3]
    assert all(c["applied_ns"] for c in history)


def test_resending_a_stored_cycle_is_idempotent(listener):
    vm = Vm(listener, "idem1")
    body = vm.cycle_body(1, [[("write", 0, b"x" * 4096)]])
    assert vm.put_cycle(1, body).status == 201
    assert vm.put_cycle(1, body).status == 200
    assert vm.state()["next_sequence"] == 2


# --- bad input: each refused, each changes nothing --------------------------

@pytest.fixture(scope="module")
def victim(listener):
    vm = Vm(listener, "victim")
    assert vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"v" * 4096)]])).status == 201
    vm.expected[0][0:4096] = b"v" * 4096
    vm.wait_applied(1)
    return vm


def _refused(vm: Vm, reply, status: int, code: str | None, before) -> None:
    assert reply.status == status, (reply.status, reply.body)
    if code is not None:
        assert reply.code == code, reply.body
    assert vm.snapshot() == before, "a refused request changed the replica"


def good_body(vm: Vm, seq: int = 2) -> bytes:
    return vm.cycle_body(seq, [[("write", 8192, b"n" * 4096)]])


def test_missing_signature_is_401(listener, victim):
    before = victim.snapshot()
    _refused(victim, victim.put_cycle(2, good_body(victim), sign=False), 401, "unauthenticated", before)


def test_wrong_key_is_401(listener, victim):
    before = victim.snapshot()
    forged = Key("primary1.example", b"\x01" * 32)
    _refused(victim, victim.put_cycle(2, good_body(victim), key=forged), 401, "unauthenticated", before)


def test_unknown_principal_is_401(listener, victim):
    before = victim.snapshot()
    stranger = Key.generate("stranger.example")
    r = victim.put_cycle(2, good_body(victim), key=stranger)
    _refused(victim, r, 401, "unauthenticated", before)
    assert "not known" in r.json()["message"]


def test_expired_signature_is_401(listener, victim):
    before = victim.snapshot()
    r = victim.put_cycle(2, good_body(victim), ts=int(time.time()) - 3600)
    _refused(victim, r, 401, "unauthenticated", before)
    assert "clock" in r.json()["message"]


def test_replayed_request_is_401(listener):
    nonce = "ab" * 16
    ts = int(time.time())
    first = call(listener.port, "GET", "/v1/server", key=listener.key, ts=ts, nonce=nonce)
    assert first.status == 200
    again = call(listener.port, "GET", "/v1/server", key=listener.key, ts=ts, nonce=nonce)
    assert again.status == 401 and "replayed" in again.json()["message"]


def test_other_primary_cannot_touch_the_vm(listener, victim):
    before = victim.snapshot()
    _refused(victim, victim.put_cycle(2, good_body(victim), key=listener.other_key), 403, "other_trust_group", before)


def test_unknown_vm_is_404(listener, victim):
    before = victim.snapshot()
    r = call(listener.port, "PUT", f"/v1/replicas/{uuid.uuid4()}/cycles/2", good_body(victim), key=listener.key,
             headers={"X-Hvr-Generation": "1"})
    _refused(victim, r, 404, "unknown_vm", before)


def test_out_of_order_sequence_is_409(listener, victim):
    before = victim.snapshot()
    _refused(victim, victim.put_cycle(3, good_body(victim, 3)), 409, "out_of_order", before)


def test_stale_generation_is_409(listener, victim):
    before = victim.snapshot()
    body = victim.cycle_body(2, [[("write", 0, b"s" * 4096)]], generation=0 + 1)
    _refused(victim, victim.put_cycle(2, body, generation=7), 409, "stale_generation", before)


def test_digest_mismatch_is_400(listener, victim):
    before = victim.snapshot()
    body = good_body(victim)
    r = victim.put_cycle(2, body, send_body=body[:-1] + bytes([body[-1] ^ 1]))
    _refused(victim, r, 400, None, before)
    assert r.code in ("digest_mismatch", "bundle_corrupt"), r.body


def test_truncated_body_is_400(listener, victim):
    before = victim.snapshot()
    body = good_body(victim)
    r = victim.put_cycle(2, body[:len(body) // 2], digest=hashlib.sha256(body[:len(body) // 2]).hexdigest())
    _refused(victim, r, 400, "body_truncated", before)


def test_connection_dropped_mid_body_stores_nothing(listener, victim):
    before = victim.snapshot()
    body = good_body(victim)
    with pytest.raises(ConnectionError):
        victim.put_cycle(2, body, send_body=body[:len(body) // 2], content_length=len(body))
    incoming = listener.storage / str(victim.vm_id) / "incoming"
    wait_for(lambda: not any(incoming.iterdir()), 30, "the partial upload to be removed")
    assert victim.snapshot() == before


def test_corrupt_zstd_frame_is_400(listener, victim):
    before = victim.snapshot()
    body = bytearray(victim.cycle_body(2, [[("write", 0, b"z" * 65536)]], compress=True))
    body[-10] ^= 0xFF  # inside the compressed frame
    r = victim.put_cycle(2, bytes(body))
    _refused(victim, r, 400, "bundle_corrupt", before)


def test_corrupt_hrl_record_is_400(listener, victim):
    before = victim.snapshot()
    body = bytearray(victim.cycle_body(2, [[("write", 0, os.urandom(4096))]], compress=False))
    body[-200] ^= 0x01  # inside the raw (uncompressed) record data: the record checksum fails
    r = victim.put_cycle(2, bytes(body))
    _refused(victim, r, 400, "bundle_corrupt", before)


def test_oversized_body_is_413(listener, victim):
    before = victim.snapshot()
    r = victim.put_cycle(2, b"", content_length=9 * MiB, send_body=b"", half_close=False)
    _refused(victim, r, 413, "body_too_large", before)


def test_an_unknown_cycle_consistency_is_400_naming_the_parameter(listener, victim):
    before = victim.snapshot()
    body = good_body(victim)
    r = call(listener.port, "PUT", f"/v1/replicas/{victim.vm_id}/cycles/2?consistency=vss", body, key=listener.key,
             headers={"X-Hvr-Generation": "1"})
    _refused(victim, r, 400, "bad_request", before)
    assert "'consistency'" in r.json()["message"] and "'vss'" in r.json()["message"]


# --- recovery history settings and application-consistent cycles -------------

GEN1 = {"X-Hvr-Generation": "1"}


def _settings_of(listener, name: str) -> tuple:
    rep = listener.hvrctl_json("replica", "get", name)
    return rep["recovery_history"], rep["fine_window_min"], rep["app_consistent_hours"]


def test_the_primary_sets_the_recovery_history_settings(listener):
    vm = Vm(listener, "settings1", initial=False)
    assert _settings_of(listener, "settings1") == (0, 60, None)
    wanted = {"recovery_history": 4, "fine_window_min": 15, "app_consistent_hours": 2}
    r = call_json(listener.port, "PUT", f"/v1/replicas/{vm.vm_id}/settings", wanted, key=listener.key, headers=GEN1)
    assert r.status == 200 and r.json() == wanted
    assert _settings_of(listener, "settings1") == (4, 15, 2)
    r = call_json(listener.port, "PUT", f"/v1/replicas/{vm.vm_id}/settings", {"recovery_history": 1},
                  key=listener.key, headers=GEN1)  # a field left out takes its default: the body is the whole settings
    assert r.status == 200 and r.json() == {"recovery_history": 1, "fine_window_min": 60, "app_consistent_hours": None}
    assert _settings_of(listener, "settings1") == (1, 60, None)


@pytest.mark.parametrize("body, field", [
    ({"recovery_history": 25}, "recovery_history"),
    ({"fine_window_min": -1}, "fine_window_min"),
    ({"app_consistent_hours": 13}, "app_consistent_hours"),
    ({"app_consistent_hours": "2"}, "app_consistent_hours"),
    ({"colour": 1}, "colour"),
])
def test_bad_settings_are_400_naming_the_field_and_change_nothing(listener, victim, body, field):
    before = victim.snapshot()
    r = call_json(listener.port, "PUT", f"/v1/replicas/{victim.vm_id}/settings", body, key=listener.key,
                  headers=GEN1)
    _refused(victim, r, 400, "bad_request", before)
    assert field in r.json()["message"]
    assert _settings_of(listener, "victim") == (0, 60, None)


def test_settings_of_another_primarys_vm_are_403_and_of_an_unknown_vm_404(listener, victim):
    before = victim.snapshot()
    good = {"recovery_history": 3}
    r = call_json(listener.port, "PUT", f"/v1/replicas/{victim.vm_id}/settings", good, key=listener.other_key,
                  headers=GEN1)
    _refused(victim, r, 403, "other_trust_group", before)
    r = call_json(listener.port, "PUT", f"/v1/replicas/{uuid.uuid4()}/settings", good, key=listener.key,
                  headers=GEN1)
    _refused(victim, r, 404, "unknown_vm", before)
    r = call_json(listener.port, "PUT", f"/v1/replicas/{victim.vm_id}/settings", good, key=listener.key,
                  headers={"X-Hvr-Generation": "7"})  # a stale or foreign generation is fenced off
    _refused(victim, r, 409, "stale_generation", before)
    r = call_json(listener.port, "PUT", f"/v1/replicas/{victim.vm_id}/settings", good, key=listener.key)
    _refused(victim, r, 400, "bad_request", before)
    assert _settings_of(listener, "victim") == (0, 60, None)


def test_an_application_consistent_cycle_makes_an_application_consistent_point(listener):
    vm = Vm(listener, "appcons1")
    path = f"/v1/replicas/{vm.vm_id}/cycles/1?consistency=application"
    r = call(listener.port, "PUT", path, vm.cycle_body(1, [[("write", 0, b"a" * 4096)]]), key=listener.key,
             headers={"X-Hvr-Generation": "1"})
    assert r.status == 201, r.body
    assert vm.put_cycle(2, vm.cycle_body(2, [[("write", 0, b"c" * 4096)]])).status == 201
    vm.wait_applied(2)
    points = AdminClient(listener.admin_socket, "hvr-listener").request("GET", "/v1/replicas/appcons1/recovery-points")
    assert [(p["sequence"], p["consistency"]) for p in points] == [(1, "application"), (2, "crash")]


def test_victim_still_accepts_a_good_cycle_after_all_that(listener, victim):
    data = b"g" * 4096
    assert victim.put_cycle(2, victim.cycle_body(2, [[("write", 8192, data)]])).status == 201
    victim.expected[0][8192:8192 + 4096] = data
    victim.wait_applied(2)
    victim.assert_images()


def test_disabled_server_refuses_clearly(tmp_path):
    lp = ListenerProcess(tmp_path / "l", enabled=False)
    lp.start().wait_ready()
    try:
        key, _ = lp.new_key("p.example")
        r = call(lp.port, "GET", "/v1/server", key=key)
        assert r.status == 403 and r.code == "replication_disabled"
        assert "hvrctl server set --enabled true" in r.json()["hint"]
    finally:
        lp.close()


def test_server_set_listen_rebinds_and_storage_applies_to_new_replicas(tmp_path):
    from daemons import free_tcp_port
    lp = ListenerProcess(tmp_path / "l2")
    lp.start().wait_ready()
    try:
        key, _ = lp.new_key("mover.example")
        old_port, new_port = lp.port, free_tcp_port()
        view = lp.hvrctl_json("server", "set", "--listen", f"127.0.0.1:{new_port}")
        assert view["listening_on"] == f"127.0.0.1:{new_port}"
        assert call(new_port, "GET", "/v1/server", key=key).status == 200
        with pytest.raises(ConnectionRefusedError):
            call(old_port, "GET", "/v1/server", key=key)
        bad = lp.hvrctl("server", "set", "--listen", "127.0.0.1:notaport", check=False)
        assert bad.returncode == 2 and "listen" in bad.stderr
        assert lp.hvrctl_json("server", "get")["listening_on"] == f"127.0.0.1:{new_port}"
        elsewhere = tmp_path / "other-storage"
        lp.hvrctl("server", "set", "--storage", str(elsewhere))
        lp.port = new_port
        vm = Vm(lp_with_key(lp, key), "moved", initial=False)
        assert (elsewhere / str(vm.vm_id) / "d0.img").stat().st_size == SIZE
        assert vm.state()["state"] == "WaitingForInitialReplication"
    finally:
        lp.close()


def lp_with_key(lp: ListenerProcess, key: Key) -> ListenerProcess:
    lp.key = key
    return lp


def test_requests_signed_before_a_restart_cannot_be_replayed(tmp_path):
    lp = ListenerProcess(tmp_path / "l3")
    lp.start().wait_ready()
    try:
        lp.key, _ = lp.new_key("replayer.example")
        vm = Vm(lp, "replayed", initial=False)
        ts, nonce = int(time.time()), "cd" * 16
        body = {"generation": 1, "next_sequence": 1}
        path = f"/v1/replicas/{vm.vm_id}/initial/complete"
        first = call_json(lp.port, "POST", path, body, key=lp.key, ts=ts, nonce=nonce)
        assert first.status == 409 and first.code == "initial_incomplete"
        lp.terminate()
        wait_for(lambda: int(time.time()) > ts, 5, "the clock to pass the signing second")
        lp.start().wait_ready()
        before = vm.snapshot()
        replay = call_json(lp.port, "POST", path, body, key=lp.key, ts=ts, nonce=nonce)
        assert replay.status == 503 and replay.code == "signed_before_restart", replay.body
        assert vm.snapshot() == before
    finally:
        lp.close()


def test_damaged_initial_window_does_not_advance_the_durable_offset(listener):
    vm = Vm(listener, "win1", initial=False)
    disk_id = vm.disk_ids[0]
    log = hrl_bytes(vm.vm_id, disk_id, 1, 0, SIZE, [("write", 0, os.urandom(65536))])
    body = bundle(BundleKind.INITIAL, vm.vm_id, 1, 0, [(disk_id, SIZE, 0, 2 * MiB, log)], compress=False)
    path = f"/v1/replicas/{vm.vm_id}/initial/{disk_id}?offset=0&end={2 * MiB}"
    headers = {"X-Hvr-Generation": "1"}
    damaged = bytearray(body)
    damaged[-300] ^= 1
    for bad, code in ((bytes(damaged), "bundle_corrupt"), (body[:-100], "body_truncated")):
        r = call(listener.port, "PUT", path, bad, key=listener.key, headers=headers)
        assert r.status == 400 and r.code == code, r.body
        assert vm.state()["initial"][str(disk_id)] == 0
    wrong_window = call(listener.port, "PUT", path.replace(f"end={2 * MiB}", f"end={3 * MiB}"), body,
                        key=listener.key, headers=headers)
    assert wrong_window.status == 400 and vm.state()["initial"][str(disk_id)] == 0
    good = call(listener.port, "PUT", path, body, key=listener.key, headers=headers)
    assert good.status == 200 and vm.state()["initial"][str(disk_id)] == 2 * MiB


# --- pipelined initial windows ------------------------------------------------------------------

class HeldUpload:
    """A signed window upload sent up to ``held`` bytes before its end, finished or dropped later."""

    def __init__(self, lp: ListenerProcess, vm: Vm, disk_id: uuid.UUID, start: int, end: int, body: bytes,
                 held: int = 1000):
        self.conn = open_request(lp.port, "PUT", f"/v1/replicas/{vm.vm_id}/initial/{disk_id}?offset={start}"
                                 f"&end={end}", body, key=lp.key, headers={"X-Hvr-Generation": "1"},
                                 send_body=body[:-held], content_length=len(body))
        self.rest = body[-held:]

    def finish(self):
        try:
            self.conn.send(self.rest)
            return read_reply(self.conn)
        finally:
            self.conn.close()

    def drop(self) -> None:
        self.conn.close()


def _window(vm: Vm, disk_id: uuid.UUID, start: int, end: int, data: bytes) -> bytes:
    log = hrl_bytes(vm.vm_id, disk_id, 1, 0, SIZE, [("write", start, data)])
    return bundle(BundleKind.INITIAL, vm.vm_id, 1, 0, [(disk_id, SIZE, start, end, log)], compress=False)


def _in_thread(fn, *args, **kwargs):
    """Start ``fn`` in a thread of its own; its future."""
    import concurrent.futures
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def _put_window_in_thread(lp: ListenerProcess, vm: Vm, disk_id: uuid.UUID, start: int, end: int, body: bytes):
    return _in_thread(call, lp.port, "PUT", f"/v1/replicas/{vm.vm_id}/initial/{disk_id}?offset={start}&end={end}",
                      body, key=lp.key, headers={"X-Hvr-Generation": "1"})


def _image_holds(vm: Vm, offset: int, data: bytes) -> bool:
    with open(vm.image_paths()[0], "rb") as f:
        f.seek(offset)
        return f.read(len(data)) == data


def test_a_window_may_follow_one_still_in_progress_and_they_commit_in_order(listener):
    vm = Vm(listener, "pipe1", initial=False)
    disk_id = vm.disk_ids[0]
    first_data, second_data = os.urandom(65536), os.urandom(65536)
    first = HeldUpload(listener, vm, disk_id, 0, 2 * MiB, _window(vm, disk_id, 0, 2 * MiB, first_data))
    # the second window starts where the first (not yet durable) ends: accepted, received, and held
    second = _put_window_in_thread(listener, vm, disk_id, 2 * MiB, SIZE,
                                   _window(vm, disk_id, 2 * MiB, SIZE, second_data))
    wait_for(lambda: _image_holds(vm, 2 * MiB, second_data), 20, "the second window written into the image",
             context=listener.log_tail)
    assert not second.done() and vm.state()["initial"][str(disk_id)] == 0  # it waits for the first
    assert first.finish().json() == {"offset": 2 * MiB}
    assert second.result(30).json() == {"offset": SIZE}
    assert vm.state()["initial"][str(disk_id)] == SIZE
    assert _image_holds(vm, 0, first_data)


def test_a_window_whose_predecessor_fails_is_refused_and_nothing_advances(listener):
    vm = Vm(listener, "pipe2", initial=False)
    disk_id = vm.disk_ids[0]
    second_data = os.urandom(65536)
    first = HeldUpload(listener, vm, disk_id, 0, 2 * MiB, _window(vm, disk_id, 0, 2 * MiB, os.urandom(65536)))
    second = _put_window_in_thread(listener, vm, disk_id, 2 * MiB, SIZE,
                                   _window(vm, disk_id, 2 * MiB, SIZE, second_data))
    wait_for(lambda: _image_holds(vm, 2 * MiB, second_data), 20, "the second window written into the image",
             context=listener.log_tail)
    first.drop()  # the first window's body never completes
    answer = second.result(30)
    assert answer.status == 409 and answer.code == "initial_gap", answer.body
    assert answer.json()["detail"]["offset"] == 0
    assert vm.state()["initial"][str(disk_id)] == 0
    # a window that follows nothing in progress is a gap (after a moment's wait for a predecessor)
    late = call(listener.port, "PUT", f"/v1/replicas/{vm.vm_id}/initial/{disk_id}?offset={2 * MiB}&end={SIZE}",
                _window(vm, disk_id, 2 * MiB, SIZE, second_data), key=listener.key,
                headers={"X-Hvr-Generation": "1"})
    assert late.status == 409 and late.code == "initial_gap"


def test_a_window_for_a_replica_removed_and_enabled_again_meanwhile_does_not_count(listener):
    vm = Vm(listener, "pipe3", initial=False)
    disk_id = vm.disk_ids[0]
    held = HeldUpload(listener, vm, disk_id, 0, 2 * MiB, _window(vm, disk_id, 0, 2 * MiB, os.urandom(65536)))
    listener.hvrctl("replica", "remove", "pipe3", "--delete-storage")
    r = call_json(listener.port, "PUT", f"/v1/replicas/{vm.vm_id}", vm.enable_body(), key=listener.key)
    assert r.status == 201, r.body
    answer = held.finish()
    assert answer.status == 404, answer.body
    assert vm.state()["initial"][str(disk_id)] == 0
    assert vm.image_paths()[0].read_bytes() == bytes(SIZE)  # the new replica's image got nothing


def test_initial_complete_waits_for_windows_still_being_received(listener):
    """A duplicate window on a slow connection must not write into the image after cycles may apply."""
    vm = Vm(listener, "pipe4", initial=False)
    disk_id = vm.disk_ids[0]
    slow = HeldUpload(listener, vm, disk_id, 0, SIZE, _window(vm, disk_id, 0, SIZE, os.urandom(65536)))
    fast = call(listener.port, "PUT", f"/v1/replicas/{vm.vm_id}/initial/{disk_id}?offset=0&end={SIZE}",
                _window(vm, disk_id, 0, SIZE, os.urandom(65536)), key=listener.key,
                headers={"X-Hvr-Generation": "1"})
    assert fast.status == 200 and vm.state()["initial"][str(disk_id)] == SIZE
    complete = _in_thread(call_json, listener.port, "POST", f"/v1/replicas/{vm.vm_id}/initial/complete",
                          {"generation": 1, "next_sequence": 1}, key=listener.key)
    with pytest.raises(TimeoutError):  # held back while the slow window is in progress
        wait_for(complete.done, 1.5, "initial/complete to answer")
    assert vm.state()["state"] != "Replicating"
    slow.finish()
    answer = complete.result(30)
    assert answer.status == 200 and answer.json()["state"] == "Replicating", answer.body
