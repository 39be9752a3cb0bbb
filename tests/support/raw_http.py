"""HTTP requests written byte by byte, for hostile-input tests: broken framing, odd paths, huge headers.

:func:`exchange` sends whatever bytes it is given and parses the answer;
:func:`signed` builds a signed request with any request target and header
values (written as Latin-1 bytes, so UTF-8 text arrives as its bytes).
"""

from __future__ import annotations

import hashlib
import http.client
import secrets
import socket
import time

from hvr_common.pure.token_auth import Key, authorization
from listener_process import Reply


def exchange(port: int, data: bytes, timeout_s: float = 60) -> Reply:
    """Send ``data`` on a fresh connection; the server's answer (status and body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        return _exchange_on(sock, data)


def exchange_unix(path, data: bytes, timeout_s: float = 60) -> Reply:
    """The same on a unix socket (the daemons' admin APIs)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        return _exchange_on(sock, data)


def request_bytes(method: str, target: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """An HTTP/1.1 request, its header values written as Latin-1."""
    hdrs = {"Host": "localhost", "Content-Length": str(len(body)), "Connection": "close"}
    hdrs.update(headers or {})
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode("latin-1") + body


def _exchange_on(sock: socket.socket, data: bytes) -> Reply:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before reading everything
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    reply = Reply(resp.status, resp.read())
    reply.content_type = resp.getheader("Content-Type")
    return reply


def signed(port: int, method: str, target: str, body: bytes = b"", *, key: Key,
           headers: dict | None = None) -> Reply:
    """A signed request for ``target`` (the request target as sent and signed, percent-encoded)."""
    digest = hashlib.sha256(body).hexdigest()
    hdrs = {"X-Hvr-Content-SHA256": digest,
            "Authorization": authorization(key, method, target, digest, int(time.time()), secrets.token_hex(16))}
    hdrs.update(headers or {})
    return exchange(port, request_bytes(method, target, body, hdrs))
