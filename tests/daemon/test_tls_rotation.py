"""Rotation of the trusted CA bundle on a running listener, with real certificates and keep-alive connections.

Removing a trusted CA takes effect on the next request: an open connection of a
primary whose certificate chains only to the removed CA is closed at once, and
a new handshake with that certificate is refused; a primary whose CA stays
trusted keeps its connection.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl

import pytest

from lab_pki import LabPki
from listener_process import ListenerProcess
from replica_vm import Vm

CONNECTION_GONE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLError)
HANDSHAKE_REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError)


@pytest.fixture
def pki(tmp_path):
    return LabPki(tmp_path / "pki")


@pytest.fixture
def listener(tmp_path, pki):
    lp = ListenerProcess(tmp_path / "listener", extra_config=pki.listener_config())
    lp.start().wait_ready()
    lp.hvrctl("server", "set", "--auth", "certificate")
    lp.primary1 = pki.issue("primary1.example", "client")
    lp.client_tls = pki.client_context(lp.primary1)
    lp.key = None  # certificate mode signs nothing
    yield lp
    lp.close()


def _keep_alive(lp: ListenerProcess, vm: Vm) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("localhost", lp.port, timeout=30, context=lp.client_tls)
    assert _get_state(conn, vm) == 200
    return conn


def _get_state(conn: http.client.HTTPSConnection, vm: Vm) -> int:
    conn.request("GET", f"/v1/replicas/{vm.vm_id}")
    reply = conn.getresponse()
    reply.read()
    assert reply.getheader("Connection", "").lower() != "close"
    return reply.status


def _replica_as_stored(lp: ListenerProcess, vm: Vm) -> tuple:
    """The images and the record as the replica server's admin API sees them (the primary is locked out)."""
    view = lp.hvrctl_json("replica", "get", vm.name)
    images = tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in vm.image_paths())
    return images, view["state"], view["cycles"]


def _set_ca(lp: ListenerProcess, pki: LabPki, bundle) -> None:
    lp.hvrctl("server", "set", "--cert", pki.server_cert, "--cert-key", pki.server_key, "--ca", bundle)


def test_removing_the_trusted_ca_closes_the_open_connection_and_refuses_the_next(tmp_path, pki, listener):
    vm = Vm(listener, "rotated")
    conn = _keep_alive(listener, vm)
    before = _replica_as_stored(listener, vm)
    _set_ca(listener, pki, pki.other_ca_dir / "ca.pem")  # the primary's CA is no longer trusted
    with pytest.raises(CONNECTION_GONE):
        _get_state(conn, vm)
    conn.close()
    with pytest.raises(HANDSHAKE_REFUSED):
        vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"x" * 4096)]]))
    assert _replica_as_stored(listener, vm) == before
    assert "peer_connection_closed" in listener.log_tail()


def test_a_primary_whose_ca_stays_trusted_keeps_its_connection(tmp_path, pki, listener):
    vm = Vm(listener, "kept")
    conn = _keep_alive(listener, vm)
    both = tmp_path / "both.pem"
    both.write_bytes((pki.other_ca_dir / "ca.pem").read_bytes() + pki.ca.read_bytes())
    _set_ca(listener, pki, both)
    assert _get_state(conn, vm) == 200  # the same connection answers
    conn.close()
    assert vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"k" * 4096)]])).status == 201
