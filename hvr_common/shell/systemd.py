"""A daemon's life as systemd sees it (``Type=notify``, watchdog), without a dependency.

``sd_notify`` is one datagram to the socket named by ``$NOTIFY_SOCKET``; when
the variable is unset (not under systemd, or in tests) every call is a no-op.
:func:`stop_on_signals` and :func:`serve_until` are the part both daemons'
composition roots share: SIGTERM/SIGINT ask for a stop; READY=1, the watchdog
fed while the daemon's work runs, STOPPING=1 once a stop was asked for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable, Coroutine


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


def stop_on_signals(request_stop: Callable[[str], None]) -> None:
    """SIGTERM (systemd's stop) and SIGINT call ``request_stop`` with the signal's name."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)


async def serve_until(stop: asyncio.Event, work: Coroutine, end_work: Callable[[asyncio.Task], None], *,
                      name: str | None = None) -> None:
    """Run ``work`` as a task (with the watchdog fed) between READY=1 and the stop.

    Once ``stop`` is set: STOPPING=1, ``end_work(task)`` (ask the work to end,
    or cancel it), and the task group waits for the work to end.
    """
    notify("READY=1")
    async with asyncio.TaskGroup() as tg:
        interval = watchdog_interval_s()
        watchdog = tg.create_task(keep_watchdog_fed(interval)) if interval else None
        task = tg.create_task(work, name=name)
        await stop.wait()
        notify("STOPPING=1")
        end_work(task)
        if watchdog is not None:
            watchdog.cancel()
