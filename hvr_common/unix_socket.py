"""Preparing a unix socket path for a daemon to listen on."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from hvr_common.errors import ConflictError, UsageError


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
