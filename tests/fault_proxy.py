"""A small fault-injecting TCP proxy for tests (loopback only).

Forwards 127.0.0.1:<port> to a target; while ``drop_after`` is set, each
connection (new or kept alive) is cut in both directions once a random number
of bytes in that range has gone from client to server.  ``dropped`` counts the cuts; ``forwarded``
counts the client->server bytes that passed.
"""

from __future__ import annotations

import random
import socket
import threading


class FaultProxy:
    def __init__(self, target_port: int, *, seed: int = 1):
        self.target = ("127.0.0.1", target_port)
        self.rng = random.Random(seed)
        self.drop_after: tuple[int, int] | None = None  # (min, max) bytes before a cut
        self.dropped = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            state = {"budget": None, "closed": False}
            threading.Thread(target=self._pipe, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, state, False), daemon=True).start()

    def _cut(self, a: socket.socket, b: socket.socket, state: dict) -> None:
        if state["closed"]:
            return
        state["closed"] = True
        for s in (a, b):
            try:  # shutdown also wakes the other direction's thread blocked in recv()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict, upstream_dir: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream_dir:
                    cfg = self.drop_after  # read per chunk: applies to kept-alive connections too
                    if cfg is None:
                        state["budget"] = None
                    elif state["budget"] is None:
                        with self._lock:
                            state["budget"] = self.rng.randint(*cfg)
                if upstream_dir and state["budget"] is not None:
                    if len(data) >= state["budget"]:
                        dst.sendall(data[:state["budget"]])
                        with self._lock:
                            self.forwarded += state["budget"]
                            self.dropped += 1
                        self._cut(src, dst, state)
                        return
                    state["budget"] -= len(data)
                dst.sendall(data)
                if upstream_dir:
                    with self._lock:
                        self.forwarded += len(data)
        except OSError:
            pass
        finally:
            if not state["closed"]:
                state["closed"] = True
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    try:
                        s.close()
                    except OSError:
                        pass
