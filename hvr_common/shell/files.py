"""Small file-system steps both daemons take: removing a file that may be gone, syncing a directory."""

from __future__ import annotations

import os
from pathlib import Path


def unlink_if_exists(path: Path) -> None:
    """Remove ``path``; a file already gone is no error (a crash or an earlier attempt removed it)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (after a create, rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
