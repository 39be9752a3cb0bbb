"""A small JSON client for the daemons' admin APIs on unix sockets."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable
from pathlib import Path

from hvr_common.pure.errors import HvrError, UnavailableError, UsageError
from hvr_common.pure.wire.error_catalogue import error_from_body
from hvr_common.pure.wire.routes import JSON_CONTENT_TYPE


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float):
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    def __init__(self, path: Path, daemon: str, *, timeout_s: float = 120.0):
        self.path = Path(path)
        self.daemon = daemon
        self.timeout_s = timeout_s

    def request(self, method: str, route: str, body: dict | None = None):
        status, raw = self._exchange(method, route, body)
        return self._json(status, raw)

    def request_bytes(self, route: str) -> bytes:
        """GET a route that answers raw bytes (an error answer is JSON, raised as its error)."""
        status, raw = self._exchange("GET", route, None)
        if status >= 400:
            self._json(status, raw)
        return raw

    def _exchange(self, method: str, route: str, body: dict | None) -> tuple[int, bytes]:
        conn = _UnixConnection(self.path, self.timeout_s)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": JSON_CONTENT_TYPE} if payload is not None else {}
        try:
            conn.request(method, route, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except http.client.InvalidURL:  # a control character or a space in a name given to hvrctl
            raise UsageError(f"{route!r:.120} holds a character no name can have",
                             hint="names are letters, digits, '.', '_' and '-'") from None
        except (OSError, socket.timeout) as exc:
            raise self._unreachable(exc) from None
        finally:
            conn.close()
        return resp.status, raw

    def _json(self, status: int, raw: bytes):
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise HvrError(f"{self.daemon} sent a reply that is not JSON (HTTP {status})") from None
        if status >= 400:
            raise error_from_body(status, data if isinstance(data, dict) else {})
        return data

    def _unreachable(self, exc: OSError) -> HvrError:
        """The daemon could not be asked (or did not answer): what to tell the operator."""
        if isinstance(exc, FileNotFoundError):
            return UnavailableError(f"{self.daemon} admin socket {self.path} does not exist",
                                    hint=f"is {self.daemon} running? pass the socket with --{self._flag()}")
        if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
            return UnavailableError(f"{self.daemon} is not answering on {self.path}",
                                    hint=f"check that {self.daemon} is running")
        if isinstance(exc, PermissionError):
            return UnavailableError(f"no permission to use {self.path}", hint="run as the daemon's user or root")
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return UnavailableError(f"{self.daemon} did not answer within {self.timeout_s:.0f} s")
        raise exc

    def stream(self, method: str, route: str, body: dict, on_progress: Callable[[dict], None]):
        """A request answered with progress lines (NDJSON, see hvr_common.shell.progress_stream): each
        ``progress`` object goes to ``on_progress``; returns the result, raises the error of the last line.
        An answer that is plain JSON is a request over before any progress (or refused at once)."""
        conn = _UnixConnection(self.path, self.timeout_s)
        try:
            conn.request(method, route, body=json.dumps(body).encode(), headers={"Content-Type": JSON_CONTENT_TYPE})
            resp = conn.getresponse()
            if not resp.getheader("Content-Type", "").startswith("application/x-ndjson"):
                raw = resp.read()
                data = json.loads(raw) if raw else None
                if resp.status >= 400:
                    raise error_from_body(resp.status, data if isinstance(data, dict) else {})
                return data
            last: dict = {}
            for line in resp:
                if not line.strip():
                    continue
                last = json.loads(line)
                if "progress" in last:
                    on_progress(last["progress"])
            if "result" in last:
                return last["result"]
            if "error" in last:
                raise error_from_body(int(last.get("status", 500)), last["error"])
            raise UnavailableError(f"{self.daemon} ended the answer before the result (did it stop?)",
                                   hint="see its log; the command can be run again")
        except (OSError, socket.timeout, http.client.HTTPException) as exc:
            if isinstance(exc, http.client.HTTPException):
                raise UnavailableError(f"{self.daemon} broke off the answer ({type(exc).__name__})",
                                       hint="see its log; the command can be run again") from None
            raise self._unreachable(exc) from None
        finally:
            conn.close()

    def _flag(self) -> str:
        return "agent-socket" if self.daemon == "hvr-agent" else "listener-socket"
