"""Certificate, key and CA files: every refusal with ``certificate_invalid``; the lab CA's files and modes."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from hvr_agent.replica_credentials import ReplicaCredentials
from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.shell.certificate_authority import issue, new_ca
from hvr_common.shell.certificate_files import CLIENT, SERVER, TlsFiles, peer_principal
from hvrctl.main import main as hvrctl

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def ca(tmp_path):
    folder = tmp_path / "ca"
    new_ca(folder)
    return folder


def _files(ca, tmp_path, usage="client", **kw) -> TlsFiles:
    cert, key = issue(ca, "host1.example", tmp_path / "out", usage, **kw)
    return TlsFiles(ca=ca / "ca.pem", cert=cert, key=key)


def _refused(files: TlsFiles, usage: str, words: str) -> None:
    with pytest.raises(HvrError) as info:
        files.check(usage)
    assert info.value.code == "certificate_invalid" and info.value.exit_code == 78 and info.value.hint
    assert words in info.value.message


def test_a_good_certificate_names_its_principal(ca, tmp_path):
    assert _files(ca, tmp_path).check(CLIENT) == "host1.example"


def test_expired(ca, tmp_path):
    _refused(_files(ca, tmp_path, not_before=NOW - dt.timedelta(days=3), not_after=NOW - dt.timedelta(days=1)),
             CLIENT, "expired")


def test_not_yet_valid(ca, tmp_path):
    _refused(_files(ca, tmp_path, not_before=NOW + dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=3)),
             CLIENT, "not valid before")


def test_wrong_usage_either_way(ca, tmp_path):
    _refused(_files(ca, tmp_path, "server"), CLIENT, "clientAuth")
    _refused(_files(ca, tmp_path / "b", "client"), SERVER, "serverAuth")


def test_key_readable_by_others(ca, tmp_path):
    files = _files(ca, tmp_path)
    files.key.chmod(0o604)
    _refused(files, CLIENT, "readable by others")


def test_key_of_another_certificate(ca, tmp_path):
    files = _files(ca, tmp_path)
    other = _files(ca, tmp_path / "other")
    _refused(TlsFiles(ca=files.ca, cert=files.cert, key=other.key), CLIENT, "does not belong")


@pytest.mark.parametrize("which", ["cert", "key", "ca"])
def test_missing_or_not_pem(ca, tmp_path, which):
    files = _files(ca, tmp_path)
    path = getattr(files, which)
    path.unlink()
    _refused(files, CLIENT, "does not exist")
    path.write_bytes(b"not pem\n")
    path.chmod(0o600)
    _refused(files, CLIENT, "PEM")


def test_unreadable(ca, tmp_path):
    files = _files(ca, tmp_path)
    files.cert.chmod(0)
    if os.geteuid() != 0:
        _refused(files, CLIENT, "not readable")
        return
    # root reads every file: check in a child that lacks the capabilities to
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: as root every file is readable")
    probe = ("import sys; from hvr_common.shell.certificate_files import CLIENT, TlsFiles\n"
             "try:\n    TlsFiles(ca=sys.argv[1], cert=sys.argv[2], key=sys.argv[3]).check(CLIENT)\n"
             "except Exception as exc:\n    print(exc.code, exc.exit_code, exc.message, sep='|')\n")
    out = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", probe,
                          str(files.ca), str(files.cert), str(files.key)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    code, exit_code, message = out.strip().split("|", 2)
    assert code == "certificate_invalid" and exit_code == "78" and "not readable" in message, out


def test_certificate_without_san_uses_its_cn(ca, tmp_path):
    assert _files(ca, tmp_path, san=False).check(CLIENT) == "host1.example"


def test_peer_principal_refuses_missing_and_server_only_certificates(ca, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    server = _files(ca, tmp_path, "server")
    der = x509.load_pem_x509_certificate(server.cert.read_bytes()).public_bytes(Encoding.DER)
    for value in (None, b"", der):
        with pytest.raises(HvrError) as info:
            peer_principal(value)
        assert info.value.code == "unauthenticated"


def test_lab_ca_files_are_private_whatever_the_umask(tmp_path, capsys):
    old = os.umask(0)
    try:
        assert hvrctl(["-o", "json", "cert", "ca", "new", str(tmp_path / "ca")]) == 0
        assert hvrctl(["-o", "json", "cert", "issue", "replica1.example", "--ca", str(tmp_path / "ca"),
                       "--out", str(tmp_path / "r1"), "--server"]) == 0
    finally:
        os.umask(old)
    issued = json.loads(capsys.readouterr().out.split("}\n", 1)[1])
    assert issued["usage"] == "server" and issued["hostname"] == "replica1.example"
    for folder in (tmp_path / "ca", tmp_path / "r1"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    files = TlsFiles(ca=tmp_path / "r1" / "ca.pem", cert=tmp_path / "r1" / "replica1.example.pem",
                     key=tmp_path / "r1" / "replica1.example-key.pem")
    assert files.check(SERVER) == "replica1.example"


def test_lab_ca_cli_errors_are_clear(tmp_path, capsys):
    assert hvrctl(["cert", "issue", "bad name", "--ca", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--client"]) == 2
    assert hvrctl(["cert", "issue", "h.example", "--ca", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                   "--client"]) == 2
    assert hvrctl(["cert", "ca", "new", str(tmp_path / "ca")]) == 0
    assert hvrctl(["cert", "ca", "new", str(tmp_path / "ca")]) == 4  # exists: --force to overwrite
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a host name" in err and "not a CA folder" in err


@pytest.mark.parametrize("fields, words", [
    ({"auth": "kerberos", "key_file": "/k"}, "auth must be"),
    ({"auth": "token"}, "needs a key file"),
    ({"auth": "token", "key_file": "k"}, "absolute"),
    ({"auth": "token", "key_file": "/k", "tls": True}, "CA bundle"),
    ({"auth": "token", "key_file": "/k", "ca_file": "/ca"}, "add --tls"),
    ({"auth": "token", "key_file": "/k", "cert_file": "/c"}, "--auth certificate"),
    ({"auth": "certificate", "cert_file": "/c", "cert_key_file": "/k"}, "certificate, its key and the CA"),
    ({"auth": "certificate", "cert_file": "/c", "cert_key_file": "/k", "ca_file": "/ca", "key_file": "/t"},
     "key file is for token"),
])
def test_credentials_refuse_inconsistent_fields(fields, words):
    with pytest.raises(UsageError, match=words):
        ReplicaCredentials.of(**fields)


def test_credentials_of_each_mode():
    assert not ReplicaCredentials.of(key_file="/k").tls
    assert ReplicaCredentials.of(key_file="/k", tls=True, ca_file="/ca").tls
    cert = ReplicaCredentials.of(auth="certificate", cert_file="/c", cert_key_file="/ck", ca_file="/ca")
    assert cert.tls and cert.to_json() == {"auth": "certificate", "tls": True, "ca_file": "/ca", "cert_file": "/c",
                                           "cert_key_file": "/ck"}


def test_chains_to_follows_the_bundle_in_force(ca, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from hvr_common.shell.certificate_files import chains_to, check_ca_bundle

    other = tmp_path / "other"
    new_ca(other, "another lab CA")
    cert, _ = issue(ca, "host1.example", tmp_path / "out", "client")
    der = x509.load_pem_x509_certificates(cert.read_bytes())[0].public_bytes(Encoding.DER)
    ours, theirs = check_ca_bundle(ca / "ca.pem"), check_ca_bundle(other / "ca.pem")
    assert chains_to(der, ours)
    assert not chains_to(der, theirs)
    assert chains_to(der, theirs + ours)
    assert not chains_to(der, [])
    assert not chains_to(b"not a certificate", ours)


def test_issuing_again_with_force_replaces_the_files_by_rename(ca, tmp_path):
    cert, key = issue(ca, "host1.example", tmp_path / "out", "client")
    before = {p: os.stat(p).st_ino for p in (cert, key)}
    assert issue(ca, "host1.example", tmp_path / "out", "client", overwrite=True) == (cert, key)
    for path, inode in before.items():
        st = os.stat(path)
        assert st.st_ino != inode and stat.S_IMODE(st.st_mode) == 0o600  # a new file, never rewritten in place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ca.pem", "host1.example-key.pem",
                                                                   "host1.example.pem"]
    TlsFiles(ca=ca / "ca.pem", cert=cert, key=key).check(CLIENT)


def test_lab_ca_folders_made_on_the_way_are_private_too(tmp_path, capsys):
    old = os.umask(0)
    try:
        assert hvrctl(["cert", "ca", "new", str(tmp_path / "a" / "b" / "ca")]) == 0
        assert hvrctl(["cert", "issue", "h.example", "--ca", str(tmp_path / "a" / "b" / "ca"),
                       "--out", str(tmp_path / "x" / "y" / "h"), "--client"]) == 0
    finally:
        os.umask(old)
    for folder in ("a", "a/b", "a/b/ca", "x", "x/y", "x/y/h"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder
