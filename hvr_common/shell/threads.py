"""Blocking work in worker threads, never abandoned (shared by both daemons)."""

from __future__ import annotations

import asyncio
from typing import Callable


async def finish_in_thread(fn, *args, undo: Callable[[object], None] | None = None):
    """Run blocking work in a thread and never abandon it: if the caller is cancelled (its
    client vanished, its task was stopped), wait for the thread before passing the
    cancellation on, so locks are released and files removed only when no thread still writes.

    ``undo``: called (in a thread) with the result when the work succeeded but its caller was
    cancelled meanwhile, so what it created (an open spool file, say) is not left behind with
    no one holding it."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if undo is not None and not task.cancelled() and task.exception() is None:
            await asyncio.wait([asyncio.ensure_future(asyncio.to_thread(undo, task.result()))])
        raise
