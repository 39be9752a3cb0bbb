"""A TCP forwarder on 127.0.0.1 that counts the bytes it carries in each direction (tests and benchmarks).

It moves data with ``splice(2)`` (socket to pipe to socket, no copy through
Python), so it costs little CPU and measures any two peers the same way,
independently of what either reports.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading

from fault_proxy import LoopbackProxy, close_sockets

MiB = 1024 * 1024
PIPE_BYTES = 1 * MiB  # pipe capacity the proxy asks for (F_SETPIPE_SZ)
SPLICE_BYTES = 1 * MiB
F_SETPIPE_SZ = 1031


class CountingProxy(LoopbackProxy):
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port`` and counts bytes per direction.

    ``up_bytes`` counts client to server (what the sender puts on the wire),
    ``down_bytes`` server to client.  :meth:`reset` zeroes both.  Bytes move
    with ``splice(2)``, never through Python.
    """

    def __init__(self, target_port: int):
        self.up_bytes = 0
        self.down_bytes = 0
        self.connections = 0
        super().__init__(target_port)

    def reset(self) -> None:
        with self._lock:
            self.up_bytes = self.down_bytes = 0
            self.connections = 0

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up_bytes, self.down_bytes

    def _connection(self, client: socket.socket, upstream: socket.socket) -> threading.Barrier:
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.connections += 1
        return threading.Barrier(2, action=lambda: self._finish(client, upstream))

    def _finish(self, a: socket.socket, b: socket.socket) -> None:
        self._open.difference_update((a, b))
        close_sockets(a, b)

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool, done: threading.Barrier) -> None:
        pipe_r, pipe_w = os.pipe()
        try:
            try:
                fcntl.fcntl(pipe_w, F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # the default 64 KiB pipe works, a little slower
            src_fd, dst_fd = src.fileno(), dst.fileno()
            while True:
                n = os.splice(src_fd, pipe_w, SPLICE_BYTES)
                if n == 0:
                    break
                left = n
                while left:
                    left -= os.splice(pipe_r, dst_fd, left)
                with self._lock:
                    if upstream:
                        self.up_bytes += n
                    else:
                        self.down_bytes += n
            try:
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on
            except OSError:
                pass
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the other direction; _finish closes both
                except OSError:
                    pass
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
            try:
                done.wait(timeout=600)
            except threading.BrokenBarrierError:
                pass
