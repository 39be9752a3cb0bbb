"""systemd integration with a real notify socket: READY=1 only once the sockets listen, watchdog pings,
STOPPING=1; and the shipped units pass ``systemd-analyze verify``."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemons import AgentProcess, free_tcp_port
from listener_process import ListenerProcess

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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


# --- readiness only once the sockets listen; the listener too; the units verify ----------------DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _notify_socket(tmp_path, monkeypatch) -> socket.socket:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return sock


def _wait_message(sock: socket.socket, wanted: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if wanted in sock.recv(4096).decode().split("\n"):
            return
    raise AssertionError(f"no {wanted} within 30 s")


def _connects(family: int, address) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(address)
        except OSError:
            return False
    return True


def test_agent_is_ready_only_once_every_socket_listens(tmp_path, monkeypatch):
    sock = _notify_socket(tmp_path, monkeypatch)
    http = free_tcp_port()
    agent = AgentProcess(tmp_path / "agent", extra_config={"http_listen": f"127.0.0.1:{http}"})
    agent.start()
    try:
        _wait_message(sock, "READY=1")
        # the moment READY=1 arrives, every socket must accept
        assert _connects(socket.AF_UNIX, str(agent.nbd_socket))
        assert _connects(socket.AF_UNIX, str(agent.admin_socket))
        assert _connects(socket.AF_INET, ("127.0.0.1", agent.tcp_port))
        assert _connects(socket.AF_INET, ("127.0.0.1", http))
    finally:
        agent.close()
        sock.close()


def test_listener_is_ready_once_it_listens_and_says_stopping_on_sigterm(tmp_path, monkeypatch):
    sock = _notify_socket(tmp_path, monkeypatch)
    listener = ListenerProcess(tmp_path / "listener")
    listener.start()
    try:
        _wait_message(sock, "READY=1")
        assert _connects(socket.AF_INET, ("127.0.0.1", listener.port))
        assert _connects(socket.AF_UNIX, str(listener.admin_socket))
        listener.terminate()
        _wait_message(sock, "STOPPING=1")
    finally:
        listener.close()
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", ["hvr-agent.service", "hvr-listener.service"])
def test_units_pass_systemd_analyze_verify(tmp_path, unit):
    """The shipped units, with ExecStart pointing at this installation's programs (verify checks that
    they exist); any warning about the unit fails the test, not only an error."""
    text = (DEPLOY / unit).read_text()
    scripts = Path(sys.executable).parent
    assert "/usr/local/bin/hvr-" in text
    local = text.replace("/usr/local/bin/", f"{scripts}/")
    for program in set(re.findall(rf"{re.escape(str(scripts))}/(hvr-[a-z]+)", local)):
        if not (scripts / program).exists():
            pytest.skip(f"{program} is not installed as a script in {scripts}")
    path = tmp_path / unit
    path.write_text(local)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if unit in line]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr
