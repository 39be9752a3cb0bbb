"""What ``/readyz`` means for the agent: the NBD socket listens, the state is loaded, no VM is
Unavailable, and the agent is not stopping."""

from __future__ import annotations

import stat
from pathlib import Path

from hvr_agent.vms import VmRegistry


class AgentReadiness:
    def __init__(self, registry: VmRegistry, nbd_socket: Path):
        self.registry = registry
        self.nbd_socket = nbd_socket
        self.state_loaded = False  # set by the composition root once every VM was loaded
        self.nbd_listening = False  # set once the NBD server listens on its socket
        self.stopping = False

    async def problems(self) -> list[str]:
        out = []
        if not self.state_loaded:
            out.append("the agent's state is not loaded yet")
        if not self.nbd_listening or not _is_socket(self.nbd_socket):
            out.append(f"the NBD socket {self.nbd_socket} is not listening")
        for rec, error in list(self.registry.unavailable.values()):
            out.append(f"VM {rec.name} is Unavailable: {error}")
        if self.stopping:
            out.append("the agent is stopping")
        return out


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False
