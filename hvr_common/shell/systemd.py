"""systemd service notifications (``Type=notify``, watchdog) without a dependency.

``sd_notify`` is one datagram to the socket named by ``$NOTIFY_SOCKET``; when
the variable is unset (not under systemd, or in tests) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for, or None if no watchdog is armed."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def keep_watchdog_fed(interval_s: float) -> None:
    """Tell systemd every ``interval_s`` that the daemon's event loop is alive (until cancelled)."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)
