"""systemd integration with a real notify socket: READY=1, watchdog pings, STOPPING=1."""

from __future__ import annotations

import socket
import time

from daemons import AgentProcess


def test_agent_notifies_ready_feeds_the_watchdog_and_says_stopping(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    agent = AgentProcess(tmp_path / "agent")
    agent.start()
    try:
        messages = []
        deadline = time.monotonic() + 20
        while messages.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert "READY=1" in messages
        assert messages.count("WATCHDOG=1") >= 3
        assert messages.index("READY=1") < messages.index("WATCHDOG=1")
        agent.terminate()
        rest = []
        sock.settimeout(0.5)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        agent.close()
        sock.close()
