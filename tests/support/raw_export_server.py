"""The shared NBD server serving plain raw images: no tracking, no agent.

Run as a script, this is the smallest daemon the block layer allows: a
catalogue of :class:`~hvr_common.block.blockdev.RawImage` devices written
here, served by :class:`~hvr_common.block.nbd_server.NbdServer` on a unix
socket until SIGTERM.  SIGUSR1 withdraws every export (each is its own
group): lookups fail from then on and their connections are dropped.

    python raw_export_server.py SOCKET NAME=PATH[:ro] ...

:class:`RawExportServer` runs it for a test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from daemons import REPO_ROOT, SupervisedProcess, python_executable, run, short_socket_dir, wait_for
from hvr_common.block.blockdev import RawImage
from hvr_common.block.catalogue import Export, Withdrawn
from hvr_common.block.nbd_server import NbdServer
from hvr_common.pure.nbd_events import ExportInfo
from hvr_common.shell import logs

WITHDRAWN_REASON = "export_withdrawn"


class ImageCatalogue:
    """Each image is one export, and its own group."""

    def __init__(self, images: dict[str, RawImage]):
        self.images = dict(images)
        self.withdrawn: list[RawImage] = []
        self._callbacks: list[Withdrawn] = []

    def lookup(self, name: str) -> Export | None:
        image = self.images.get(name)
        if image is None:
            return None
        info = ExportInfo(name=name, size=image.size, read_only=image.read_only,
                          description=f"raw image {image.path.name}")
        return Export(info, image, name)

    def exports(self) -> list[ExportInfo]:
        return [self.lookup(name).info for name in sorted(self.images)]

    def on_withdrawn(self, callback: Withdrawn) -> None:
        self._callbacks.append(callback)

    def withdraw_all(self) -> None:
        names = sorted(self.images)
        self.withdrawn += self.images.values()
        self.images.clear()
        for name in names:
            for callback in self._callbacks:
                callback(name, WITHDRAWN_REASON)


async def serve(socket_path: Path, images: dict[str, RawImage]) -> None:
    catalogue = ImageCatalogue(images)
    server = NbdServer(catalogue, logging.getLogger("hvr.test.nbd"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, catalogue.withdraw_all)
    try:
        await server.listen_unix(socket_path)
        await stop.wait()
    finally:
        await server.close()
        for image in [*catalogue.images.values(), *catalogue.withdrawn]:
            await image.close()


def main(argv: list[str]) -> None:
    logs.configure("debug", "json", sys.stderr)
    socket_path, *specs = argv
    images = {}
    for spec in specs:
        name, _, where = spec.partition("=")
        path, _, mode = where.partition(":")
        images[name] = RawImage(Path(path), read_only=mode == "ro")
    asyncio.run(serve(Path(socket_path), images))


# --- the test's side --------------------------------------------------------------
class RawExportServer(SupervisedProcess):
    """This module run as a process, serving ``exports`` (name -> (image, read_only))."""

    name = "raw-export-server"

    def __init__(self, workdir: Path, exports: dict[str, tuple[Path, bool]]):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.exports = exports
        self._socket_dir, self._own_socket_dir = short_socket_dir(self.workdir)
        self.nbd_socket = self._socket_dir / "raw-nbd.sock"
        self.stdout_path = self.workdir / "raw-export-server.stdout.log"
        self.stderr_path = self.workdir / "raw-export-server.stderr.log"
        self.process: subprocess.Popen | None = None
        self._log_files: list = []

    def start(self) -> RawExportServer:
        specs = [f"{name}={path}{':ro' if read_only else ''}" for name, (path, read_only) in self.exports.items()]
        self._spawn([python_executable(), __file__, self.nbd_socket, *specs], cwd=REPO_ROOT,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def accepts() -> bool:
            self.assert_alive()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.nbd_socket))
                except (ConnectionRefusedError, FileNotFoundError):
                    return False
            return True

        wait_for(accepts, 20, f"the server to listen on {self.nbd_socket}", context=self.log_tail)
        return self

    def nbd_uri(self, name: str | None = None) -> str:
        return f"nbd+unix:///{name or ''}?socket={self.nbd_socket}"

    def withdraw_all(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def run(self, cmd: Sequence[str | os.PathLike], timeout_s: float = 60,
            *, check: bool = True) -> subprocess.CompletedProcess:
        return run(cmd, timeout_s, check=check, context=self.log_tail)

    def close(self) -> None:
        try:
            self.terminate()
        finally:
            if self._own_socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> RawExportServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


if __name__ == "__main__":
    main(sys.argv[1:])
