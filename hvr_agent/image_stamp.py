"""The image stamp: was a disk image changed while the agent did not serve it?

At a clean close (the agent stops, the VM is removed) each image's identity
is recorded beside its logs in ``<log base>.stamp`` (JSON, written durably):
size, mtime and ctime (nanoseconds), inode and device.  At the next open the
stamp is compared with the image and deleted, whatever the answer, so a stamp
never outlives the close it describes.  A difference means someone wrote,
replaced or resized the image meanwhile: the agent's logs do not hold those
writes, so the VM must be compared with its replica (``Action.REQUIRE_RESYNC``,
never a full copy).  No stamp (a first open, a crash) proves nothing: after a
crash the write-intent bitmap bounds what the agent itself may have left
unshipped, and a change made while the agent was down after a crash is not
detected (``docs/resync.md``).  A block device has no meaningful mtime: only
its size and identity are compared.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from hvr_common.shell.files import unlink_if_exists, write_file_durably

FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")


def stamp_path(log_base: Path) -> Path:
    return log_base.with_name(log_base.name + ".stamp")


def identity(image: Path) -> dict:
    """The image's size, mtime and ctime (ns), inode and device (a block device: size and identity only)."""
    st = os.stat(image)
    if stat.S_ISBLK(st.st_mode):
        with open(image, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
        return {"size": size, "mtime_ns": None, "ctime_ns": None, "ino": st.st_ino, "dev": st.st_rdev}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def write_stamp(image: Path, log_base: Path) -> None:
    """After a clean close (the image flushed and closed): record its identity (blocking)."""
    write_file_durably(stamp_path(log_base), json.dumps(identity(image), sort_keys=True).encode())


def changed_since_close(image: Path, log_base: Path) -> str | None:
    """At open: how the image differs from its stamp (None: it does not, or there is no stamp); the stamp is
    deleted (blocking)."""
    path = stamp_path(log_base)
    try:
        recorded = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        recorded = {}
    now = identity(image)
    unlink_if_exists(path)
    if not isinstance(recorded, dict) or set(recorded) != set(FIELDS):
        return "its stamp from the last clean stop is unreadable"
    changed = [f for f in FIELDS if recorded[f] != now[f]]
    if not changed:
        return None
    return f"it changed while the agent was not serving it ({', '.join(changed)} differ from the last clean stop)"
