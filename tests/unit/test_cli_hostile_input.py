"""hvrctl given files it cannot use: a clear error and an exit code, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hvrctl.main import main


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_key_new_into_a_missing_folder(capsys, tmp_path):
    rc, err = run(capsys, "key", "new", "p.example", "--out", str(tmp_path / "missing" / "p.key"))
    assert rc == 2 and "does not exist" in err and "hint" in err
    assert not (tmp_path / "missing").exists()


def test_key_new_onto_a_folder(capsys, tmp_path):
    rc, err = run(capsys, "key", "new", "p.example", "--out", str(tmp_path))
    assert rc in (2, 4) and "error" in err


@pytest.mark.parametrize("content", [os.urandom(200), b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b"{}",
                                     b'{"kind": "hvr-key", "version": 1, "principal": "p\\n", "secret": "AA=="}',
                                     b"{" * 100_000, b"x" * 200_000])
def test_server_key_add_of_a_file_that_is_not_a_key(capsys, tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    rc, err = run(capsys, "--listener-socket", str(tmp_path / "no.sock"), "server", "key", "add", str(path))
    assert rc == 2 and "not valid" in err, err
    assert len(err) < 600


def test_server_key_add_of_a_folder(capsys, tmp_path):
    rc, err = run(capsys, "--listener-socket", str(tmp_path / "no.sock"), "server", "key", "add", str(tmp_path))
    assert rc == 2 and "not a regular file" in err


@pytest.mark.parametrize("verb", [["inspect"], ["apply"]])
def test_hrl_commands_on_a_folder(capsys, tmp_path, verb):
    extra = [str(tmp_path / "image")] if verb == ["apply"] else []
    rc, err = run(capsys, "hrl", *verb, str(tmp_path), *extra)
    assert rc == 2 and "is a folder" in err


def test_hrl_inspect_of_a_missing_file(capsys, tmp_path):
    rc, err = run(capsys, "hrl", "inspect", str(tmp_path / "none.hrl"))
    assert rc == 2 and "does not exist" in err


def test_an_unreadable_local_file_is_an_error_line_not_a_traceback(capsys, tmp_path):
    log = tmp_path / "x.hrl"
    log.write_bytes(b"not a log")
    rc, err = run(capsys, "hrl", "apply", str(log), str(tmp_path / "missing-dir" / "image"))
    assert rc != 0 and err.startswith("hvrctl: error:")


@pytest.mark.parametrize("interval", ["²h", "²", "١٢h", "9" * 5000, "h", "1.5d"])
def test_a_monitoring_interval_that_is_not_ascii_digits_is_a_usage_error(capsys, tmp_path, interval):
    rc, err = run(capsys, "--listener-socket", str(tmp_path / "no.sock"), "server", "set",
                  "--monitoring-interval", interval)
    assert rc == 2 and "is not a duration" in err and len(err) < 400, err


@pytest.mark.parametrize("limit", ["²m", "²", "١٢s", "9" * 5000, "m", "1.5h"])
def test_a_latency_limit_that_is_not_ascii_digits_is_a_usage_error(capsys, tmp_path, limit):
    rc, err = run(capsys, "--listener-socket", str(tmp_path / "no.sock"), "server", "set",
                  "--latency-limit", limit)
    assert rc == 2 and "is not a duration" in err and len(err) < 400, err


@pytest.mark.parametrize("flag", ["--key", "--ca", "--cert", "--cert-key"])
def test_vm_enable_with_a_folder_for_a_file_says_so(capsys, tmp_path, flag):
    files = {"--key": tmp_path / "k", "--ca": tmp_path / "ca.pem", "--cert": tmp_path / "c.pem",
             "--cert-key": tmp_path / "c-key.pem"}
    for f in files.values():
        f.write_text("x")
    files[flag] = tmp_path
    auth = ["--key", str(files["--key"])] if flag == "--key" else [
        "--auth", "certificate", "--cert", str(files["--cert"]), "--cert-key", str(files["--cert-key"])]
    rc, err = run(capsys, "--agent-socket", str(tmp_path / "no.sock"), "vm", "enable", "web", "--replica-server",
                  "replica1.example", "--port", "8443", *auth, "--ca", str(files["--ca"]))
    assert rc == 2 and f"{tmp_path} is a folder" in err and "does not exist" not in err, err


def _hvrctl_without_root_file_access(*argv: str) -> subprocess.CompletedProcess:
    """hvrctl in a child that may not bypass file modes (as root it otherwise reads and writes every file)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "hvrctl", *argv], capture_output=True, text=True,
                          timeout=60)


def test_key_new_into_a_folder_it_may_not_write(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    done = _hvrctl_without_root_file_access("key", "new", "p.example", "--out", str(folder / "p.key"))
    assert done.returncode == 2 and "permission denied" in done.stderr and "hint" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (folder / "p.key").exists()


def test_server_key_add_of_a_key_file_it_may_not_read(tmp_path):
    from hvr_common.pure.token_auth import Key
    from hvr_common.shell.key_file import write_key
    path = tmp_path / "p.key"
    write_key(Key.generate("p.example"), path)
    path.chmod(0)
    done = _hvrctl_without_root_file_access("--listener-socket", str(tmp_path / "no.sock"), "server", "key", "add",
                                            str(path))
    assert done.returncode == 2 and "not readable" in done.stderr and "hint" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("principal", ["p.example\n", "../p", "p p", "p/q", ""])
def test_key_new_for_a_principal_that_is_not_valid_is_bad_usage(capsys, tmp_path, principal):
    rc, err = run(capsys, "key", "new", principal, "--out", str(tmp_path / "p.key"))
    assert rc == 2 and "is not valid" in err and "hint" in err, err
    assert not (tmp_path / "p.key").exists()


@pytest.mark.parametrize("argv", [["vm", "get"], ["vm", "remove"], ["replica", "get"], ["recovery-points", "list"],
                                  ["vm", "sync-now"], ["backup", "get"]])
@pytest.mark.parametrize("name", ["web\n", "web#x", "web?x=1", "a b", "../status", "web/x", "web\x00"])
def test_a_vm_name_that_cannot_be_one_is_refused_before_any_request(capsys, tmp_path, argv, name):
    """'web#x' would have reached VM web (the fragment cut off), 'web\\n' a traceback in http.client."""
    rc, err = run(capsys, "--agent-socket", str(tmp_path / "no.sock"), "--listener-socket", str(tmp_path / "no.sock"),
                  *argv, name)
    assert rc == 2 and "VM name" in err and "is not valid" in err and "hint" in err, err


def test_a_route_with_a_control_character_is_a_usage_error_not_a_traceback(tmp_path):
    from hvr_common.pure.errors import UsageError
    from hvrctl.client import AdminClient
    with pytest.raises(UsageError) as info:
        AdminClient(tmp_path / "no.sock", "hvr-listener").request("DELETE", "/v1/keys/p q\n")
    assert info.value.exit_code == 2 and "no name can have" in info.value.message
