"""What the agent's /readyz answers: not ready until its state is loaded and its NBD socket listens, nor while
a VM is Unavailable or it stops; each unmet condition is one sentence."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from hvr_agent.probes import AgentReadiness


def problems(readiness: AgentReadiness) -> list[str]:
    return asyncio.run(readiness.problems())


def test_ready_only_once_loaded_and_listening(tmp_path):
    path = tmp_path / "nbd.sock"
    registry = SimpleNamespace(unavailable={})
    readiness = AgentReadiness(registry, path)
    assert problems(readiness) == ["the agent's state is not loaded yet", f"the NBD socket {path} is not listening"]
    readiness.state_loaded = True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        assert problems(readiness) == [f"the NBD socket {path} is not listening"]  # bound, but not yet said
        readiness.nbd_listening = True
        assert problems(readiness) == []
    path.unlink()  # the socket file removed under the agent
    assert problems(readiness) == [f"the NBD socket {path} is not listening"]


def test_an_unavailable_vm_and_a_stop_are_named(tmp_path):
    path = tmp_path / "nbd.sock"
    registry = SimpleNamespace(unavailable={"db": (SimpleNamespace(name="db"), "image /x is missing")})
    readiness = AgentReadiness(registry, path)
    readiness.state_loaded = readiness.nbd_listening = True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        readiness.stopping = True
        assert problems(readiness) == ["VM db is Unavailable: image /x is missing", "the agent is stopping"]
