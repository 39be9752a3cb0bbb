"""The watchdog is fed from the event loop: while the loop is blocked no WATCHDOG=1 goes out, and
feeding resumes when it runs again (a real datagram socket stands for systemd's)."""

from __future__ import annotations

import asyncio
import socket
import time

from hvr_common.shell import systemd


def _drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    return out


def test_a_blocked_event_loop_stops_the_watchdog_pings(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    seen: dict[str, list[str]] = {}

    async def work() -> None:
        async def wait_pings(n: int) -> None:
            async with asyncio.timeout(30):
                got = 0
                while got < n:
                    await asyncio.sleep(0.05)
                    got += _drain(sock).count("WATCHDOG=1")
        await wait_pings(2)  # fed while the loop runs
        _drain(sock)
        time.sleep(0.5)  # the loop is blocked: ten periods pass
        seen["blocked"] = _drain(sock)
        await wait_pings(2)  # fed again once it runs

    async def main() -> None:
        stop = asyncio.Event()

        async def run_then_stop() -> None:
            try:
                await work()
            finally:
                stop.set()
        await systemd.serve_until(stop, run_then_stop(), lambda task: None, name="work")

    asyncio.run(main())
    sock.close()
    # at most the one ping sent just before the block began may arrive late
    assert seen["blocked"].count("WATCHDOG=1") <= 1, seen["blocked"]
