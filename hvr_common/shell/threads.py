"""Blocking work in worker threads, never abandoned (shared by both daemons)."""

from __future__ import annotations

import asyncio


async def finish_in_thread(fn, *args):
    """Run blocking work in a thread and never abandon it: if the caller is cancelled (its
    client vanished, its task was stopped), wait for the thread before passing the
    cancellation on, so locks are released and files removed only when no thread still writes."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
