"""What ``/readyz`` means for the listener: its storage is writable and the replication API
accepts (bound, replication enabled, not stopping)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from hvr_listener.settings import ServerSettings


class ListenerReadiness:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.stopping = False

    async def problems(self) -> list[str]:
        out = []
        storage = Path(self.settings.storage_dir())
        problem = await asyncio.to_thread(_write_problem, storage)
        if problem:
            out.append(f"the storage {storage} is not writable: {problem}")
        if self.settings.bound is None:
            out.append("the replication API is not listening")
        if not self.settings.current()["enabled"]:
            out.append("replication is not enabled on this server (hvrctl server set --enabled true)")
        if self.stopping:
            out.append("the listener is stopping")
        return out


def _write_problem(folder: Path) -> str | None:
    """Create, sync and remove a small file in ``folder``: None if that works, else why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".hvr-ready-", dir=folder)
        try:
            os.write(fd, b"ready")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
