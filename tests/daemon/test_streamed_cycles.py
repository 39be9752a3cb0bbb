"""The streamed cycle upload (PUT .../cycles/{n}/stream, then POST .../commit) against a real listener.

A streamed body is staged, never recorded nor applied until a commit names
its digest; a commit whose digest does not verify is refused and drops the
staged body; a bundle of the other form than its request is refused, never
misread (docs/replication-protocol.md, "Streamed cycles").
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from daemons import wait_for
from listener_process import ListenerProcess
from replica_vm import MiB, Vm


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    lp = ListenerProcess(tmp_path_factory.mktemp("listener"), extra_config={"max_bundle_bytes": 8 * MiB})
    lp.start().wait_ready()
    lp.key, _ = lp.new_key("primary1.example")
    yield lp
    lp.close()


def _incoming(vm: Vm) -> Path:
    return vm.folder() / "incoming"


def _staged(vm: Vm) -> list[Path]:
    return sorted(_incoming(vm).glob("*.staged"))


def test_a_streamed_cycle_is_stored_only_at_its_commit_and_is_idempotent(listener):
    vm = Vm(listener, "stream1", disks=2)
    data = [b"a" * 8192, b"b" * 4096]
    body = vm.cycle_body(1, [[("write", 4096, data[0])], [("write", MiB, data[1])]], streamed=True)
    r = vm.stream_cycle(1, body)
    assert r.status == 202, r.body
    assert r.json() == {"sequence": 1, "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    assert len(_staged(vm)) == 1
    assert vm.state()["next_sequence"] == 1, "a staged body is not a received cycle"
    r = vm.commit_cycle(1, hashlib.sha256(body).hexdigest(), len(body))
    assert r.status == 201, r.body
    assert r.json()["next_sequence"] == 2
    assert not _staged(vm)
    vm.expected[0][4096:4096 + 8192] = data[0]
    vm.expected[1][MiB:MiB + 4096] = data[1]
    vm.wait_applied(1)
    vm.assert_images()
    # sent again (the agent did not see the acknowledgement): the same digest is 200, another 409
    assert vm.stream_cycle(1, body).status == 202
    r = vm.commit_cycle(1, hashlib.sha256(body).hexdigest(), len(body))
    assert r.status == 200, r.body
    assert not _staged(vm)
    other = vm.cycle_body(1, [[("write", 0, b"x" * 4096)], []], streamed=True)
    assert vm.stream_cycle(1, other).status == 202
    r = vm.commit_cycle(1, hashlib.sha256(other).hexdigest(), len(other))
    assert r.status == 409 and r.code == "out_of_order", r.body
    assert vm.state()["next_sequence"] == 2


def test_a_commit_whose_digest_does_not_match_the_staged_body_is_refused_and_nothing_is_applied(listener):
    vm = Vm(listener, "stream2")
    good = vm.cycle_body(1, [[("write", 0, b"g" * 4096)]], streamed=True)
    before = vm.snapshot()
    assert vm.stream_cycle(1, good).status == 202
    wrong = hashlib.sha256(good + b"\0").hexdigest()  # the body changed on the way: its digest is not this
    r = vm.commit_cycle(1, wrong, len(good))
    assert r.status == 400 and r.code == "digest_mismatch", r.body
    assert not _staged(vm), "the staged body that did not verify was kept"
    assert vm.snapshot() == before
    r = vm.commit_cycle(1, hashlib.sha256(good).hexdigest(), len(good))  # its body is gone: send it again
    assert r.status == 409 and r.code == "cycle_not_staged", r.body
    assert vm.snapshot() == before
    assert vm.stream_cycle(1, good).status == 202
    assert vm.commit_cycle(1, hashlib.sha256(good).hexdigest(), len(good)).status == 201
    vm.expected[0][0:4096] = b"g" * 4096
    vm.wait_applied(1)
    vm.assert_images()


def test_a_bundle_of_the_other_form_is_refused_not_misread(listener):
    vm = Vm(listener, "stream3")
    before = vm.snapshot()
    counted = vm.cycle_body(1, [[("write", 0, b"c" * 4096)]])
    streamed = vm.cycle_body(1, [[("write", 0, b"s" * 4096)]], streamed=True)
    r = vm.stream_cycle(1, counted)  # the previous upload form's bundle on the streamed route
    assert r.status == 400 and r.code == "upload_form_mismatch", r.body
    r = vm.put_cycle(1, streamed)  # a streamed bundle in the counted upload
    assert r.status == 400 and r.code == "upload_form_mismatch", r.body
    r = vm.put_cycle(1, streamed, digest="0" * 64, send_body=streamed)  # the streamed digest header there
    assert r.status == 400, r.body
    assert not _staged(vm)
    assert vm.snapshot() == before
    assert vm.put_cycle(1, counted).status == 201  # the counted form (journal mode, earlier agents) still works


def test_a_streamed_body_cut_short_stages_nothing(listener):
    vm = Vm(listener, "stream4")
    body = vm.cycle_body(1, [[("write", 0, b"t" * 65536)]], streamed=True, compress=False)
    before = vm.snapshot()
    with pytest.raises(ConnectionError):  # the connection drops mid-body
        vm.stream_cycle(1, body, send_body=body[:len(body) // 2], content_length=len(body))
    r = vm.stream_cycle(1, body[:-12])  # ends without its last end-of-disk frame
    assert r.status == 400 and r.code == "body_truncated", r.body
    wait_for(lambda: not any(_incoming(vm).iterdir()), 10, "the partial uploads to be removed")
    r = vm.commit_cycle(1, hashlib.sha256(body).hexdigest(), len(body))
    assert r.status == 409 and r.code == "cycle_not_staged", r.body
    assert vm.snapshot() == before
