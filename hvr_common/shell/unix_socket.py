"""Preparing a unix socket path for a daemon to listen on."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from hvr_common.pure.errors import ConflictError, UsageError


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free to bind: remove a stale socket, refuse a live one or a non-socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket", hint="remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ConflictError(f"another process is already listening on {path}",
                        hint="stop the other daemon or give this one another socket path")


def socket_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the socket at ``path``, to recognise our own socket at exit."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def release_socket_path(path: Path, identity: tuple[int, int] | None) -> None:
    """Remove ``path`` only if it is still the socket we bound (a successor may own it now)."""
    if identity is not None and socket_identity(path) == identity:
        path.unlink(missing_ok=True)
