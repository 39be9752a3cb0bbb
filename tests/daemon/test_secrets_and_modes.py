"""No secret in any log line or error body; every file, key and socket private, whatever the umask.

A real pair (agent and listener) replicates a small VM, started with umask
000; hostile requests are thrown at the listener meanwhile (a forged
signature of the same principal, key uploads that are refused).  Then every
log line of both daemons and every error body is searched for the key's
secret in each form it could take, and every path the daemons created is
checked for its mode.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from daemons import make_image
from hvr_common.pure.token_auth import Key
from hvrctl.client import AdminClient
from listener_process import call
from raw_http import exchange_unix, request_bytes
from replication_pair import Pair

MiB = 1024 * 1024


def secret_forms(secret: bytes) -> list[str]:
    return [base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode(), secret.hex(),
            secret.hex().upper(), base64.b64encode(secret).decode().rstrip("="), repr(secret)[2:-1]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    work = tmp_path_factory.mktemp("private")
    old = os.umask(0)  # the daemons inherit the most permissive umask there is
    try:
        p = Pair(work).start()
    finally:
        os.umask(old)
    image = make_image(work / "images" / "disk0.img", 8 * MiB)
    with open(image, "r+b") as fh:
        fh.write(os.urandom(MiB))
    try:
        p.protect("private", [image], frequency=30)
        p.initial("private")
        p.sync("private")
        p.wait_replica_applied("private")
        p.work = work
        yield p
    finally:
        p.close()


def test_no_secret_in_any_log_line_or_error_body(pair):
    key_doc = json.loads(Path(pair.key_path).read_text())
    secret = base64.b64decode(key_doc["secret"])
    lp = pair.listener
    bodies = []
    forged = Key(key_doc["principal"], bytes(32))  # the right principal, a wrong secret
    bodies.append(call(lp.port, "GET", "/v1/server", key=forged).body)
    for doc in ({"principal": "p\n", "secret": key_doc["secret"]},
                {"principal": "p.example", "secret": key_doc["secret"] + "A"},
                {"principal": "p.example", "secret": key_doc["secret"], "replace": {"x": key_doc["secret"]}},
                {"principal": "p.example", "secret": key_doc["secret"][:-4]},
                {"principal": "p.example", key_doc["secret"]: key_doc["secret"]}):
        reply = exchange_unix(lp.admin_socket, request_bytes("POST", "/v1/keys", json.dumps(doc).encode()))
        assert reply.status == 400, reply.body
        bodies.append(reply.body)
    for reply_body in bodies:
        text = reply_body.decode("utf-8", "replace")
        assert not any(form in text for form in secret_forms(secret)), text
    logs = ""
    for process in (pair.agent, lp):
        for path in (process.stdout_path, process.stderr_path):
            logs += Path(path).read_text(errors="replace")
    assert "cycle" in logs or "replica" in logs, "the logs are empty: nothing was checked"
    for form in secret_forms(secret):
        assert form not in logs, f"the secret appears in a log ({form[:6]}...)"


def _created_paths(pair) -> list[Path]:
    roots = [pair.agent.state_dir, pair.listener.state_dir, pair.listener.storage]
    found = []
    for root in roots:
        found.append(root)
        found.extend(root.rglob("*"))
    found.extend((pair.work / "images").glob("disk0.img.*"))  # the agent's logs and bitmap beside the image
    return found


def test_files_folders_keys_and_sockets_are_private_under_umask_000(pair):
    problems = []
    paths = _created_paths(pair)
    assert any(p.name.endswith(".wib") for p in paths) and any(p.suffix == ".img" for p in paths)
    for path in paths:
        mode = os.lstat(path).st_mode
        perms = stat.S_IMODE(mode)
        if stat.S_ISDIR(mode) and perms & 0o077:
            problems.append(f"folder {path} is {perms:04o}")
        elif stat.S_ISREG(mode) and perms & 0o077:
            problems.append(f"file {path} is {perms:04o}")
    for sock in (pair.agent.admin_socket, pair.listener.admin_socket):
        perms = stat.S_IMODE(os.stat(sock).st_mode)
        if perms != 0o600:
            problems.append(f"admin socket {sock} is {perms:04o}")
    for sock in (pair.agent.nbd_socket, pair.listener.nbd_socket):  # QEMU's group may connect; others never
        if sock.exists() and stat.S_IMODE(os.stat(sock).st_mode) & 0o007:
            problems.append(f"NBD socket {sock} is {stat.S_IMODE(os.stat(sock).st_mode):04o}")
    key_perms = stat.S_IMODE(os.stat(pair.key_path).st_mode)
    if key_perms != 0o600:
        problems.append(f"key file {pair.key_path} is {key_perms:04o}")
    assert not problems, "\n".join(problems)


def test_hvrctl_key_new_is_0600_under_umask_000(tmp_path):
    from hvrctl.main import main
    old = os.umask(0)
    try:
        assert main(["key", "new", "umask.example", "--out", str(tmp_path / "k.key")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600


def test_the_admin_api_still_answers(pair):
    assert AdminClient(pair.listener.admin_socket, "hvr-listener").request("GET", "/v1/server")["enabled"]
