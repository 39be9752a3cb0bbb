"""One daemon per state directory: an exclusive lock taken before anything is touched.

Two agents (or two listeners) on the same state would both run recovery and
both write the same logs; the second one must refuse to start instead.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from hvr_common.pure.errors import ConflictError


class StateLock:
    def __init__(self, state_dir: Path, daemon: str):
        self.path = state_dir / f"{daemon}.lock"
        self.daemon = daemon
        self.fd = -1

    def acquire(self) -> "StateLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConflictError(f"another {self.daemon} (pid {holder}) is already using {self.path.parent}",
                                hint="stop it first, or give this one its own state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def claim_state_dir(state_dir: Path, daemon: str) -> StateLock:
    """Make a daemon's state folder private and take its lock (before anything in it is touched).

    The folder is set to 0700 at every start and the process umask to 077, so
    every file the daemon creates (logs, bitmaps, spool files, databases) is
    the owner's only.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    os.umask(0o077)
    return StateLock(state_dir, daemon).acquire()
