"""A long-lived ``qemu-io`` attached to an NBD export the way a VM's disk is: with ``reconnect-delay``.

QEMU's NBD client (the one a running VM uses) is driven through qemu-io's
interactive mode: commands go to its stdin one line at a time, and a thread
collects what it prints.  With ``reconnect-delay=N``, requests made while the
server is gone wait up to N seconds for it to come back and are then sent
again, exactly as a VM's would.
"""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

from daemons import client_env, wait_for


class ReconnectingQemuIo:
    def __init__(self, socket_path: Path, export: str, *, reconnect_delay_s: int = 60):
        opts = (f"driver=nbd,server.type=unix,server.path={socket_path},export={export},"
                f"reconnect-delay={reconnect_delay_s}")
        self.process = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=client_env())
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            chunk = self.process.stdout.read1(65536)
            if not chunk:
                return
            with self._lock:
                self._output += chunk

    @property
    def output(self) -> str:
        with self._lock:
            return self._output.decode(errors="replace")

    def send(self, command: str) -> None:
        """One command.  qemu-io reads its stdin a line per wake-up: send the next command only once this
        one is done (:meth:`write_each`), or lines sent together wait for more input."""
        self.process.stdin.write((command + "\n").encode())
        self.process.stdin.flush()

    def write_each(self, commands: list[str], timeout_s: float) -> None:
        """Each write command in turn, each once the one before completed."""
        for command in commands:
            done = self.writes_done()
            self.send(command)
            self.wait_writes(done + 1, timeout_s, f"{command!r} to complete")

    def writes_done(self) -> int:
        return len(re.findall(r"^(?:qemu-io> )*wrote \d+/\d+ bytes", self.output, re.MULTILINE))

    def failures(self) -> list[str]:
        return re.findall(r"[a-z]+ failed: .*", self.output)

    def wait_writes(self, count: int, timeout_s: float, what: str) -> None:
        def done() -> bool:
            assert not self.failures(), f"qemu-io reported failures: {self.failures()}\n{self.output[-2000:]}"
            assert self.process.poll() is None, f"qemu-io exited\n{self.output[-2000:]}"
            return self.writes_done() >= count
        wait_for(done, timeout_s, what, context=lambda: self.output[-2000:])

    def close(self, timeout_s: float = 30) -> str:
        if self.process.poll() is None:
            try:
                self.send("quit")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        return self.output
