"""Application-consistent cuts: the configured freeze command, the cut, then the thaw command.

The guest's file systems are frozen (for example ``virsh domfsfreeze`` through
the qemu-guest-agent) just before the cut and thawed right after it, so the
cycle holds what the applications had flushed: an application-consistent
point (VSS in Hyper-V).

Rules:

* The thaw command always runs once freeze was started: after a good freeze
  and the cut, after a failed or timed-out freeze, and when the cut fails.
* A freeze that fails (non-zero exit, cannot start) or outlives its timeout
  gives a crash-consistent cut instead, an ``app_consistent_failed`` event
  and a failure the caller counts; the cut is never skipped for it.
* A command that outlives its timeout is killed with its whole process
  group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from hvr_common.pure.config import FreezeHooks
from hvr_common.pure.recovery_points import Consistency
from hvr_common.shell.logs import event

log = logging.getLogger("hvr.agent.app_consistency")

T = TypeVar("T")
OUTPUT_KEPT_BYTES = 2000


class HookFailed(Exception):
    """A freeze or thaw command failed or timed out; the message says which and why."""


@dataclass(frozen=True)
class FrozenCut:
    consistency: Consistency
    failure: str | None  # why the cut is not application-consistent (None when it is)


async def run_hook(argv: list[str], timeout_s: float, *, vm: str, phase: str) -> float:
    """Run one hook command; return the seconds it took, or raise :class:`HookFailed`."""
    started = time.monotonic()
    env = dict(os.environ, HVR_VM=vm, HVR_PHASE=phase)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as exc:
        raise HookFailed(f"{phase} command {argv[0]!r} could not start: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            output, _ = await proc.communicate()
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise HookFailed(f"{phase} command {argv[0]!r} did not finish within {timeout_s:g} s and was killed") \
            from None
    except asyncio.CancelledError:
        _kill_group(proc)
        await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        said = output[-OUTPUT_KEPT_BYTES:].decode(errors="replace").strip()
        raise HookFailed(f"{phase} command {argv[0]!r} exited with status {proc.returncode}"
                         + (f": {said}" if said else ""))
    return time.monotonic() - started


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def frozen_cut(hooks: FreezeHooks, vm: str, cut: Callable[[], Awaitable[T]]) -> tuple[T, FrozenCut]:
    """Freeze, cut, thaw (thaw whatever happened); the cut's result and its consistency."""
    failure: str | None = None
    frozen_s = None
    try:
        frozen_s = await run_hook(hooks.argv("freeze", vm), hooks.timeout_s, vm=vm, phase="freeze")
    except HookFailed as exc:
        failure = str(exc)
    try:
        if failure is None:
            result = await cut()
    finally:
        try:
            await run_hook(hooks.argv("thaw", vm), hooks.timeout_s, vm=vm, phase="thaw")
        except HookFailed as exc:
            # The cut was taken while frozen, so the point is still consistent; the guest may not be.
            event(log, "app_thaw_failed", logging.ERROR, vm=vm, error=str(exc),
                  hint="check the guest: its file systems may still be frozen (virsh domfsthaw VM)")
    if failure is not None:
        event(log, "app_consistent_failed", logging.WARNING, vm=vm, error=failure,
              hint="this cycle is crash-consistent; fix the freeze command in agent.toml [app_consistency]")
        result = await cut()
        return result, FrozenCut(Consistency.CRASH, failure)
    event(log, "app_consistent_cut", vm=vm, latency_s=round(frozen_s, 3))
    return result, FrozenCut(Consistency.APPLICATION, None)
