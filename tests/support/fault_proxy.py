"""TCP proxies on loopback for tests and benchmarks.

:class:`LoopbackProxy` listens on 127.0.0.1:<port>, connects each client to a
target and moves bytes both ways with one thread per direction; subclasses
say how (:meth:`LoopbackProxy._pipe`).

:class:`FaultProxy` (tests): while ``drop_after`` is set, each connection (new
or kept alive) is cut in both directions once a random number of bytes in that
range has gone from client to server, until ``max_drops`` (if set) were cut.  ``dropped`` counts the cuts;
``forwarded`` counts the client->server bytes that passed.  Between ``hold()``
and ``release()`` nothing goes from client to server (a stalled link).
"""

from __future__ import annotations

import random
import socket
import threading


def close_sockets(*socks: socket.socket, reset: bool = False) -> None:
    """Shut down and close ``socks``, ignoring what is already gone; ``reset`` sends RST, not FIN."""
    for s in socks:
        try:  # shutdown also wakes the other direction's thread blocked in recv()
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass


class LoopbackProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``, one thread per direction."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        close_sockets(self._sock, *list(self._open))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
            self._open.update((client, upstream))
            conn = self._connection(client, upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, True, conn), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False, conn), daemon=True).start()

    def _connection(self, client: socket.socket, upstream: socket.socket):
        """What both directions of a new connection share (handed to :meth:`_pipe`)."""
        return None

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool, conn) -> None:
        raise NotImplementedError


class FaultProxy(LoopbackProxy):
    def __init__(self, target_port: int, *, seed: int = 1):
        self.rng = random.Random(seed)
        self.drop_after: tuple[int, int] | None = None  # (min, max) bytes before a cut
        self.dropped = 0
        self.max_drops: int | None = None  # once this many connections were cut, cut no more
        self.forwarded = 0
        self._flowing = threading.Event()
        self._flowing.set()
        super().__init__(target_port)

    def hold(self) -> None:
        """Stop forwarding client->server bytes (connections stay open) until :meth:`release`."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def _connection(self, client, upstream) -> dict:
        return {"budget": None, "closed": False}

    def _end(self, a: socket.socket, b: socket.socket, state: dict, *, reset: bool) -> None:
        if not state["closed"]:
            state["closed"] = True
            close_sockets(a, b, reset=reset)
            self._open.difference_update((a, b))

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool, state: dict) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    while not self._flowing.wait(0.5):
                        if self._closed or state["closed"]:
                            return
                    cfg = self.drop_after  # read per chunk: applies to kept-alive connections too
                    if cfg is None:
                        state["budget"] = None
                    elif state["budget"] is None:
                        with self._lock:
                            state["budget"] = self.rng.randint(*cfg)
                if upstream and state["budget"] is not None:
                    if len(data) >= state["budget"]:
                        with self._lock:
                            cut = self.max_drops is None or self.dropped < self.max_drops
                            if cut:
                                self.dropped += 1
                        if cut:
                            dst.sendall(data[:state["budget"]])
                            with self._lock:
                                self.forwarded += state["budget"]
                            self._end(src, dst, state, reset=True)
                            return
                        state["budget"] = None
                    else:
                        state["budget"] -= len(data)
                dst.sendall(data)
                if upstream:
                    with self._lock:
                        self.forwarded += len(data)
        except OSError:
            pass
        finally:
            self._end(src, dst, state, reset=False)
