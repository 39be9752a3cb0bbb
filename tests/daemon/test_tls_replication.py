"""Replication end to end over TLS 1.3: certificate mode and token mode inside TLS.

A real agent and listener on loopback; the agent connects to ``localhost``,
the name of the listener's certificate.  Each run: enable, initial copy,
cycles, ``qemu-img compare``.  Also: the agent refuses to enable with
unusable certificate files, and the listener refuses to start with them; the
agent refuses a replica server it cannot verify (another CA, another name,
a certificate without serverAuth, TLS 1.2 only: the last two played by
``openssl s_server``).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import socket
import subprocess

import pytest

from daemons import free_tcp_port, python_executable, REPO_ROOT, wait_for
from lab_pki import SERVER_NAME, LabPki
from listener_process import ListenerProcess, call
from replication_pair import MiB, Pair, make_disk, qemu_io


def _replicate(pair: Pair, tmp_path, credentials: list[str]) -> dict:
    size = 8 * MiB
    disks = [make_disk(tmp_path / "sys.img", size), make_disk(tmp_path / "data.img", size)]
    rng = random.Random(11)
    pair.agent.add_vm("web", disks)
    for d in disks:
        qemu_io(pair.agent.nbd_uri("web", d.stem), *(f"write -P {rng.randrange(256)} {rng.randrange(0, size - 65536)}"
                                                     f" 65536" for _ in range(10)))
    pair.agent.hvrctl("vm", "enable", "web", "--replica-server", SERVER_NAME, "--port", str(pair.replica_port),
                      *credentials, "--frequency", "30")
    pair.initial("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", disks)
    for _ in range(2):
        for d in disks:
            qemu_io(pair.agent.nbd_uri("web", d.stem),
                    *(f"write -P {rng.randrange(256)} {rng.randrange(0, size - 4096)} 4096" for _ in range(20)))
        pair.sync("web")
        pair.wait_replica_applied("web")
        pair.assert_identical("web", disks)
    measure = pair.agent.hvrctl_json("vm", "measure", "web", "-o", "json")
    assert measure["SuccessfulReplicationCount"] >= 2 and measure["ReplicationErrors"] == 0
    return pair.replica("web")


@pytest.fixture
def pki(tmp_path):
    return LabPki(tmp_path / "pki")


def test_certificate_mode_replicates_end_to_end(tmp_path, pki):
    pair = Pair(tmp_path, listener_config=pki.listener_config())
    try:
        pair.start()
        pair.listener.hvrctl("server", "set", "--auth", "certificate")
        cert, key = pki.issue("host1.example", "client")
        replica = _replicate(pair, tmp_path, ["--auth", "certificate", "--cert", str(cert), "--cert-key", str(key),
                                              "--ca", str(pki.ca)])
        assert replica["primary_server"] == "host1.example"
        assert pair.status("web")["principal"] == "host1.example"
    finally:
        pair.close()


def test_certificate_mode_keeps_replicating_across_a_rotation_of_the_primarys_certificate(tmp_path, pki):
    """A new certificate from the same CA replaces the primary's files: the agent's next connection presents it,
    and no cycle fails."""
    pair = Pair(tmp_path, listener_config=pki.listener_config())
    try:
        pair.start()
        pair.listener.hvrctl("server", "set", "--auth", "certificate")
        cert, key = pki.issue("host1.example", "client")
        disk = make_disk(tmp_path / "rot.img", 8 * MiB)
        pair.agent.add_vm("rot", [disk])
        pair.agent.hvrctl("vm", "enable", "rot", "--replica-server", SERVER_NAME, "--port", str(pair.replica_port),
                          "--auth", "certificate", "--cert", cert, "--cert-key", key, "--ca", pki.ca,
                          "--frequency", "30")
        pair.initial("rot")
        pair.wait_replica_applied("rot")
        uri = pair.agent.nbd_uri("rot", "rot")

        def cycle(pattern: int) -> None:
            qemu_io(uri, f"write -P {pattern} {pattern * 65536} 65536")
            pair.sync("rot")
            pair.wait_replica_applied("rot")

        cycle(1)
        old = pki.fingerprint(cert)
        assert old in pair.listener.log_tail(400)
        assert pki.issue("host1.example", "client", overwrite=True) == (cert, key)  # the same files, replaced
        new = pki.fingerprint(cert)
        assert new != old
        cycle(2)
        cycle(3)
        wait_for(lambda: new in pair.listener.log_tail(400), 30, "a connection with the new certificate",
                 context=pair.listener.log_tail)
        pair.assert_identical("rot", [disk])
        measure = pair.agent.hvrctl_json("vm", "measure", "rot", "-o", "json")
        assert measure["ReplicationErrors"] == 0 and measure["SuccessfulReplicationCount"] >= 3, measure
        assert pair.status("rot")["state"] == "Replicating"
    finally:
        pair.close()


def test_token_mode_inside_tls_replicates_end_to_end(tmp_path, pki):
    pair = Pair(tmp_path, listener_config=pki.listener_config())
    try:
        pair.start()
        replica = _replicate(pair, tmp_path, ["--key", str(pair.key_path), "--tls", "--ca", str(pki.ca)])
        assert replica["primary_server"] == "primary.example"
    finally:
        pair.close()


def test_switching_the_listener_to_tls_rebinds_on_the_same_port(tmp_path, pki):
    lp = ListenerProcess(tmp_path / "listener")
    try:
        lp.start().wait_ready()
        before = lp.hvrctl_json("server", "get")
        assert before["tls"] is None
        refused = lp.hvrctl("server", "set", "--auth", "certificate", check=False)
        assert refused.returncode == 2 and "needs the server's certificate" in refused.stderr, refused.stderr
        refused = lp.hvrctl("server", "set", "--cert", pki.server_cert, check=False)  # without its key and CA
        assert refused.returncode == 2 and "all three or none" in refused.stderr, refused.stderr
        expired, _ = pki.issue(SERVER_NAME, "server", folder="old", not_before=dt.datetime(2020, 1, 1,
                               tzinfo=dt.timezone.utc), not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc))
        refused = lp.hvrctl("server", "set", "--cert", expired, "--cert-key", pki.server_key, "--ca", pki.ca,
                            check=False)
        assert refused.returncode == 78 and "expired" in refused.stderr, refused.stderr
        assert lp.hvrctl_json("server", "get") == before  # nothing changed
        after = lp.hvrctl_json("server", "set", "--auth", "token,certificate", "--cert", pki.server_cert,
                               "--cert-key", pki.server_key, "--ca", pki.ca)
        assert after["listening_on"] == before["listening_on"] and after["tls"]["client_certificate"] == "optional"
        ctx = pki.client_context(pki.issue("host1.example", "client"))
        assert call(lp.port, "GET", "/v1/server", tls=ctx).status == 200
    finally:
        lp.close()


# --- unusable files: refused by the agent at enable, by the listener at start and by --check-config ---------

@pytest.fixture
def bad_files(tmp_path, pki):
    now = dt.datetime.now(dt.timezone.utc)
    good_cert, good_key = pki.issue("host1.example", "client")
    expired = pki.issue("host1.example", "client", folder="expired", not_before=now - dt.timedelta(days=9),
                        not_after=now - dt.timedelta(days=2))
    future = pki.issue("host1.example", "client", folder="future", not_before=now + dt.timedelta(days=2),
                       not_after=now + dt.timedelta(days=9))
    server_only = pki.issue("host1.example", "server", folder="server-only")
    open_key = pki.issue("host1.example", "client", folder="open-key")
    open_key[1].chmod(0o644)
    return {"expired": (expired, "expired"), "not yet valid": (future, "not valid before"),
            "wrong usage": (server_only, "clientAuth"), "key readable by others": (open_key, "readable by others"),
            "missing": ((tmp_path / "nope.pem", good_key), "does not exist")}


@pytest.mark.parametrize("case", ["expired", "not yet valid", "wrong usage", "key readable by others", "missing"])
def test_agent_refuses_to_enable_with_an_unusable_certificate(tmp_path, pki, bad_files, case):
    (cert, key), words = bad_files[case]
    pair = Pair(tmp_path, listener_config=pki.listener_config())
    try:
        pair.start()
        disk = make_disk(tmp_path / "d.img", MiB)
        pair.agent.add_vm("web", [disk])
        r = pair.agent.hvrctl("-o", "json", "vm", "enable", "web", "--replica-server", SERVER_NAME, "--port",
                              str(pair.replica_port), "--auth", "certificate", "--cert", str(cert), "--cert-key",
                              str(key), "--ca", str(pki.ca), check=False)
        assert r.returncode != 0 and words in r.stderr, r.stderr
        # (a path that does not exist is refused by hvrctl itself)
        assert case == "missing" or '"code": "certificate_invalid"' in r.stderr, r.stderr
        assert pair.agent.hvrctl("vm", "get", "web", check=False).returncode == 3  # nothing was enabled
        assert pair.listener.hvrctl_json("replica", "get") in ([], {"replicas": []}), "the replica was created"
    finally:
        pair.close()


def _without_root_file_access() -> list[str]:
    """A command prefix that takes from root the power to read any file, so a mode-0 file is unreadable."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: as root every file is readable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("case", ["expired", "not yet valid", "wrong usage", "key readable by others",
                                  "unreadable"])
def test_listener_refuses_to_start_and_check_config_with_an_unusable_certificate(tmp_path, pki, case):
    now = dt.datetime.now(dt.timezone.utc)
    window = {"expired": (now - dt.timedelta(days=9), now - dt.timedelta(days=2)),
              "not yet valid": (now + dt.timedelta(days=2), now + dt.timedelta(days=9))}.get(case, (None, None))
    cert, key = pki.issue(SERVER_NAME, "client" if case == "wrong usage" else "server", folder="bad-server",
                          not_before=window[0], not_after=window[1])
    prefix = []
    if case == "key readable by others":
        key.chmod(0o640)
    if case == "unreadable":
        cert.chmod(0)
        prefix = _without_root_file_access()
    lp = ListenerProcess(tmp_path / "listener",
                         extra_config={"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(pki.ca)})
    lp.write_config()
    check = subprocess.run([*prefix, python_executable(), "-m", "hvr_listener", "--config", str(lp.config_path),
                            "--check-config"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 78, check.stdout + check.stderr
    start = subprocess.run([*prefix, python_executable(), "-m", "hvr_listener", "--config", str(lp.config_path)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert start.returncode == 78, start.stderr
    words = {"expired": "expired", "not yet valid": "not valid before", "wrong usage": "serverAuth",
             "key readable by others": "readable by others", "unreadable": "not readable"}[case]
    assert words in check.stderr and words in start.stderr, (check.stderr, start.stderr)


@pytest.mark.parametrize("case", ["server from an untrusted CA", "server for another name"])
def test_agent_refuses_a_replica_server_it_cannot_verify(tmp_path, pki, case):
    pair = Pair(tmp_path, listener_config=pki.listener_config())
    try:
        pair.start()
        disk = make_disk(tmp_path / "d.img", MiB)
        pair.agent.add_vm("web", [disk])
        ca, name = pki.ca, SERVER_NAME
        if case == "server from an untrusted CA":
            ca = pki.other_ca_dir / "ca.pem"
        else:
            name = "127.0.0.1"  # the listener's certificate names localhost only
        r = pair.agent.hvrctl("-o", "json", "vm", "enable", "web", "--replica-server", name, "--port",
                              str(pair.replica_port), "--key", str(pair.key_path), "--tls", "--ca", str(ca),
                              check=False)
        assert r.returncode == 77 and '"code": "tls_refused"' in r.stderr, r.stderr
        assert pair.listener.hvrctl_json("replica", "get") in ([], {"replicas": []}), "the replica was created"
    finally:
        pair.close()


@pytest.fixture
def foreign_server(tmp_path):
    """``openssl s_server`` on a free port with the given certificate and protocol flags (an independent server)."""
    started = []

    def start(cert: tuple, *flags: str) -> int:
        port = free_tcp_port()
        proc = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert[0]),
                                 "-key", str(cert[1]), "-www", "-quiet", *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, "openssl s_server exited"
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 30, "openssl s_server to listen", interval_s=0.1)
        return port
    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("case", ["server certificate with clientAuth only", "server limited to TLS 1.2"])
def test_agent_refuses_a_replica_server_with_the_wrong_usage_or_an_old_tls(tmp_path, pki, foreign_server, case):
    if case == "server certificate with clientAuth only":
        port = foreign_server(pki.issue(SERVER_NAME, "client", folder="client-only"))
    else:
        port = foreign_server((pki.server_cert, pki.server_key), "-tls1_2", "-cipher", "DEFAULT:@SECLEVEL=0")
    pair = Pair(tmp_path, listener_config=pki.listener_config())
    try:
        pair.start()
        pair.agent.add_vm("web", [make_disk(tmp_path / "d.img", MiB)])
        r = pair.agent.hvrctl("-o", "json", "vm", "enable", "web", "--replica-server", SERVER_NAME, "--port",
                              str(port), "--key", str(pair.key_path), "--tls", "--ca", str(pki.ca), check=False)
        assert r.returncode == 77 and '"code": "tls_refused"' in r.stderr, r.stderr
        assert ("certificate purpose" if "clientAuth" in case else "protocol version") in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        pair.close()
