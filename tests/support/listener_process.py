"""A real ``python -m hvr_listener`` for tests, plus a signed HTTP client written for the tests.

The client (:func:`call`) builds requests by hand with ``http.client`` and
signs them with the documented scheme, so the listener is checked against the
protocol document rather than against the agent's own client.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from daemons import (REPO_ROOT, SupervisedProcess, free_tcp_port, python_executable, run, short_socket_dir,
                     wait_for)
from hvr_common.shell.key_file import write_key
from hvr_common.pure.token_auth import Key, authorization


class ListenerProcess(SupervisedProcess):
    name = "listener"

    def __init__(self, workdir: Path, *, extra_config: dict | None = None, enabled: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "state"
        self.storage = self.workdir / "replicas"
        self._socket_dir, self._own_socket_dir = short_socket_dir(self.workdir)
        self.admin_socket = self._socket_dir / "listener.sock"
        self.nbd_socket = self._socket_dir / "listener-nbd.sock"  # test failover views
        self.port = free_tcp_port()
        self.config_path = self.workdir / "listener.toml"
        self.stdout_path = self.workdir / "listener.stdout.log"
        self.stderr_path = self.workdir / "listener.stderr.log"
        self.extra_config = extra_config or {}
        self.enabled = enabled
        self.client_tls: ssl.SSLContext | None = None  # set when the listener speaks TLS: how clients connect
        self.process: subprocess.Popen | None = None
        self._log_files: list = []

    def write_config(self) -> None:
        entries = {"state_dir": str(self.state_dir), "admin_socket": str(self.admin_socket),
                   "listen": f"127.0.0.1:{self.port}", "storage": str(self.storage), "log_format": "json",
                   "nbd_socket": str(self.nbd_socket)}
        entries.update(self.extra_config)
        self.config_path.write_text("".join(
            f"{k} = {json.dumps(v) if isinstance(v, str) else v}\n" for k, v in entries.items()))

    def start(self) -> "ListenerProcess":
        self.write_config()
        self._spawn([python_executable(), "-m", "hvr_listener", "--config", self.config_path], cwd=REPO_ROOT,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return self

    def wait_ready(self, timeout_s: float = 20) -> "ListenerProcess":
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"listener exited with {self.process.returncode}\n{self.log_tail()}")
            return self.admin_socket.exists() and self.hvrctl("server", "get", check=False).returncode == 0
        wait_for(ready, timeout_s, "the listener to answer", interval_s=0.1, context=self.log_tail)
        if self.enabled:
            self.hvrctl("server", "set", "--enabled", "true")
        return self

    def hvrctl(self, *args, check: bool = True, timeout_s: float = 30) -> subprocess.CompletedProcess:
        cmd = [python_executable(), "-m", "hvrctl", "--listener-socket", str(self.admin_socket), *map(str, args)]
        return run(cmd, timeout_s, check=check, context=self.log_tail)

    def hvrctl_json(self, *args):
        return json.loads(self.hvrctl(*args, "-o", "json").stdout)

    def new_key(self, principal: str) -> tuple[Key, Path]:
        key = Key.generate(principal)
        path = self.workdir / f"{principal}.key"
        write_key(key, path, overwrite=True)
        self.hvrctl("server", "key", "add", path)
        return key, path

    def close(self) -> None:
        try:
            self.terminate()
        finally:
            if self._own_socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body else None

    @property
    def code(self) -> str | None:
        doc = self.json()
        return doc.get("code") if isinstance(doc, dict) else None


def call(port: int, method: str, path: str, body: bytes = b"", *, key: Key | None = None,
         headers: dict | None = None, ts: int | None = None, nonce: str | None = None,
         digest: str | None = None, send_body: bytes | None = None, content_length: int | None = None,
         sign: bool = True, half_close: bool = True, tls: ssl.SSLContext | None = None) -> Reply:
    """One request; ``send_body``/``content_length`` let a test lie about the body to the server.

    With ``tls``, over HTTPS to ``localhost`` (the name of the test server certificates).
    """
    conn = open_request(port, method, path, body, key=key, headers=headers, ts=ts, nonce=nonce, digest=digest,
                        send_body=send_body, content_length=content_length, sign=sign, tls=tls)
    try:
        payload = body if send_body is None else send_body
        if half_close and content_length is not None and content_length > len(payload):
            conn.sock.shutdown(1)  # the body ends early: the server sees a truncated body
        return read_reply(conn)
    finally:
        conn.close()


def open_request(port: int, method: str, path: str, body: bytes = b"", *, key: Key | None = None,
                 headers: dict | None = None, ts: int | None = None, nonce: str | None = None,
                 digest: str | None = None, send_body: bytes | None = None, content_length: int | None = None,
                 sign: bool = True, tls: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    """Send a signed request's head and ``send_body`` (default: all of ``body``); the caller reads the reply."""
    digest = digest or hashlib.sha256(body).hexdigest()
    hdrs = {"X-Hvr-Content-SHA256": digest}
    if sign and key is not None:
        hdrs["Authorization"] = authorization(key, method, path, digest, ts or int(time.time()),
                                              nonce or secrets.token_hex(16))
    hdrs.update(headers or {})
    payload = body if send_body is None else send_body
    conn = (http.client.HTTPSConnection("localhost", port, timeout=60, context=tls) if tls is not None
            else http.client.HTTPConnection("127.0.0.1", port, timeout=60))
    try:
        conn.putrequest(method, path)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(payload) if content_length is None else content_length))
        conn.endheaders()
        if payload:
            conn.send(payload)
    except BaseException:
        conn.close()
        raise
    return conn


def read_reply(conn: http.client.HTTPConnection) -> Reply:
    resp = conn.getresponse()
    return Reply(resp.status, resp.read())


def call_json(port: int, method: str, path: str, doc: dict | None, **kw) -> Reply:
    return call(port, method, path, json.dumps(doc).encode() if doc is not None else b"", **kw)
