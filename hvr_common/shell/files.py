"""File-system steps both daemons take the same way: a durable rename's directory fsync, a tolerant unlink."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a create, rename or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_if_exists(path: Path) -> bool:
    """Remove a file; True if it was there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
