"""Certificate authentication and TLS 1.3 of the replication API, against a real listener.

Each refusal has its own test: the request is refused (in the handshake, or
with a JSON error) and the victim replica's images and state are unchanged.
"""

from __future__ import annotations

import datetime as dt
import http.client
import shutil
import ssl
import subprocess
import time

import pytest

from daemons import wait_for
from lab_pki import LabPki
from listener_process import ListenerProcess, call
from replica_vm import Vm

NOW = dt.datetime.now(dt.timezone.utc)
HANDSHAKE_REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError)
REQUEST = "GET /v1/server HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return LabPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cert_listener(tmp_path_factory, pki):
    """Certificate mode only: a client certificate is required in the handshake."""
    lp = ListenerProcess(tmp_path_factory.mktemp("cert-listener"), extra_config=pki.listener_config())
    lp.start().wait_ready()
    lp.hvrctl("server", "set", "--auth", "certificate")
    # two organisations: certificate principals are authorised like token principals
    lp.hvrctl("authz", "add", "primary1.example", "--storage", lp.storage, "--trust-group", "org1")
    lp.hvrctl("authz", "add", "primary2.example", "--storage", lp.storage, "--trust-group", "org2")
    lp.hvrctl("server", "set", "--allow-any", "false")
    lp.primary1 = pki.issue("primary1.example", "client")
    lp.client_tls = pki.client_context(lp.primary1)
    lp.key = None  # certificate mode signs nothing
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def victim(cert_listener):
    vm = Vm(cert_listener, "tlsvictim")
    assert vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"v" * 4096)]])).status == 201
    vm.expected[0][0:4096] = b"v" * 4096
    vm.wait_applied(1)
    return vm


def _attempt(vm: Vm, tls: ssl.SSLContext):
    """A cycle upload with the given client; the reply, or the handshake's refusal."""
    try:
        return vm.put_cycle(2, vm.cycle_body(2, [[("write", 8192, b"n" * 4096)]]), tls=tls)
    except HANDSHAKE_REFUSED as exc:
        return exc


def _refused_in_handshake(vm: Vm, tls: ssl.SSLContext, alert: str) -> None:
    before = vm.snapshot()
    outcome = _attempt(vm, tls)
    assert isinstance(outcome, HANDSHAKE_REFUSED), f"accepted: {outcome}"
    if isinstance(outcome, ssl.SSLError) and not isinstance(outcome, ssl.SSLEOFError):
        assert alert in str(outcome).lower(), outcome  # the server's alert (else it just closed: EOF)
    assert vm.snapshot() == before, "a refused client changed the replica"


def test_certificate_mode_replicates_with_the_certificates_principal(cert_listener, victim):
    victim.assert_images()
    view = cert_listener.hvrctl_json("replica", "get", "tlsvictim")
    assert view["primary_server"] == "primary1.example"
    server = cert_listener.hvrctl_json("server", "get")
    assert server["auth_modes"] == ["certificate"] and server["tls"]["client_certificate"] == "required"


def test_client_certificate_from_another_ca_is_refused(pki, victim):
    stranger = pki.issue("primary1.example", "client", ca_dir=pki.other_ca_dir, folder="stranger")
    _refused_in_handshake(victim, pki.client_context(stranger), "unknown ca")


def test_expired_client_certificate_is_refused(pki, victim):
    expired = pki.issue("primary1.example", "client", folder="expired", not_before=NOW - dt.timedelta(days=30),
                        not_after=NOW - dt.timedelta(days=1))
    _refused_in_handshake(victim, pki.client_context(expired), "certificate expired")


def test_client_certificate_with_server_auth_only_is_refused(pki, victim):
    server_only = pki.issue("primary1.example", "server", folder="server-only")
    _refused_in_handshake(victim, pki.client_context(server_only), "unsupported certificate")


def test_no_client_certificate_is_refused(pki, victim):
    _refused_in_handshake(victim, pki.client_context(None), "certificate required")


def test_client_limited_to_tls_1_2_is_refused(pki, victim, cert_listener):
    _refused_in_handshake(victim, pki.client_context(cert_listener.primary1, maximum=ssl.TLSVersion.TLSv1_2),
                          "protocol version")


def test_client_certificate_of_another_trust_group_cannot_touch_the_vm(pki, victim):
    before = victim.snapshot()
    other = pki.issue("primary2.example", "client")
    reply = _attempt(victim, pki.client_context(other))
    assert reply.status == 403 and reply.code == "other_trust_group", reply.body
    assert victim.snapshot() == before


def test_client_certificate_no_entry_allows_is_refused(pki, victim):
    before = victim.snapshot()
    stranger = pki.issue("primary3.example", "client", folder="stranger")
    reply = _attempt(victim, pki.client_context(stranger))
    assert reply.status == 403 and reply.code == "not_authorized", reply.body
    assert victim.snapshot() == before


@pytest.mark.parametrize("folder, odd", [
    ("no-eku", {"common_name": "primary1.example", "san": "primary1.example", "client_auth": False}),
    ("no-name", {"common_name": None, "san": None, "client_auth": True}),
    ("cn-not-a-host", {"common_name": "Primary One, Org1", "san": None, "client_auth": True}),
])
def test_a_chaining_client_certificate_without_client_auth_or_a_host_name_is_401(pki, victim, folder, odd):
    """OpenSSL takes a certificate without any extended key usage as good for every purpose, and one without a
    name: the listener itself refuses them, before any authorization."""
    before = victim.snapshot()
    reply = _attempt(victim, pki.client_context(pki.issue_odd(folder, **odd)))
    assert not isinstance(reply, Exception), f"refused in the handshake: {reply}"
    assert reply.status == 401 and reply.code == "unauthenticated", reply.body
    assert victim.snapshot() == before


def test_a_listener_that_does_not_match_the_replica_server_name_is_refused(pki, victim, cert_listener):
    ctx = pki.client_context(cert_listener.primary1)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
        conn = http.client.HTTPSConnection("127.0.0.1", cert_listener.port, timeout=30, context=ctx)
        try:
            conn.request("GET", "/v1/server")
        finally:
            conn.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_sees_only_tls_1_3_and_a_required_client_certificate(pki, cert_listener):
    def s_client(*flags: str) -> str:
        result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{cert_listener.port}",
                                 "-servername", "localhost", "-CAfile", str(pki.ca), "-ign_eof", *flags],
                                input=REQUEST, capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    for old in ("-tls1_2", "-tls1_1"):  # no session: no cipher agreed
        out = s_client(old, "-cipher", "DEFAULT:@SECLEVEL=0")
        assert "Cipher is (NONE)" in out or "no protocols available" in out, out
        assert "HTTP/1.1" not in out, out
    out = s_client("-tls1_3", "-msg")
    assert "New, TLSv1.3" in out and "CertificateRequest" in out, out  # the server asks for a certificate
    assert "HTTP/1.1" not in out, out  # and answers nothing to a client without one
    out = s_client("-tls1_3", "-cert", str(cert_listener.primary1[0]), "-key", str(cert_listener.primary1[1]))
    assert "Verify return code: 0 (ok)" in out and "HTTP/1.1 200" in out, out


# --- token mode inside TLS: replay and clock skew are refused as over plain HTTP ---------------

@pytest.fixture(scope="module")
def token_tls_listener(tmp_path_factory, pki):
    lp = ListenerProcess(tmp_path_factory.mktemp("token-tls-listener"), extra_config=pki.listener_config())
    lp.start().wait_ready()
    lp.client_tls = pki.client_context(None)
    lp.key, _ = lp.new_key("primary1.example")
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def token_http_listener(tmp_path_factory):
    lp = ListenerProcess(tmp_path_factory.mktemp("token-http-listener"))
    lp.start().wait_ready()
    lp.key, _ = lp.new_key("primary1.example")
    yield lp
    lp.close()


@pytest.fixture(params=["tls", "http"])
def token_listener(request):
    return request.getfixturevalue(f"token_{request.param}_listener")


def test_token_mode_refuses_a_replayed_request(token_listener):
    lp = token_listener
    ts, nonce = int(time.time()), "cd" * 16
    first = call(lp.port, "GET", "/v1/server", key=lp.key, ts=ts, nonce=nonce, tls=lp.client_tls)
    assert first.status == 200, first.body
    again = call(lp.port, "GET", "/v1/server", key=lp.key, ts=ts, nonce=nonce, tls=lp.client_tls)
    assert again.status == 401 and again.code == "unauthenticated" and "replayed" in again.json()["message"]


@pytest.mark.parametrize("skew_s", [-360, 360])
def test_token_mode_refuses_timestamps_six_minutes_off(token_listener, skew_s):
    lp = token_listener
    vm = Vm(lp, f"skew{skew_s + 1000}")
    before = vm.snapshot()
    r = vm.put_cycle(1, vm.cycle_body(1, [[("write", 0, b"s" * 4096)]]), ts=int(time.time()) + skew_s)
    assert r.status == 401 and r.code == "unauthenticated" and "clock" in r.json()["message"], r.body
    assert vm.snapshot() == before


def test_token_over_tls_without_a_token_is_401(token_tls_listener):
    r = call(token_tls_listener.port, "GET", "/v1/server", tls=token_tls_listener.client_tls)
    assert r.status == 401 and r.code == "unauthenticated", r.body


def test_plain_http_to_a_tls_listener_is_not_served(token_tls_listener):
    try:
        r = call(token_tls_listener.port, "GET", "/v1/server", key=token_tls_listener.key)
    except (ConnectionError, http.client.HTTPException):
        return  # the TLS server closed the connection
    assert r.status >= 400, r.body
