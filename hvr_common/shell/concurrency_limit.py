"""``ConcurrencyLimit``: at most ``limit`` holders at once, a limit that can change while it is held.

The agent's parallel transfers (``max_active_transfers``) and the listener's
parallel applies (``max_active_applies``) are each one of these.  Lowering
the limit never interrupts a holder: newcomers wait until the holders are
fewer than the new limit.  Waiters are served first come, first served; a
place is handed to a waiter when it is freed, so a newcomer never jumps the
queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager


class ConcurrencyLimit:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self.active = 0
        self.most_active = 0  # the highest number of holders seen at once
        self._waiters: deque[asyncio.Future] = deque()

    def set_limit(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self._hand_over()

    @asynccontextmanager
    async def held(self):
        """Hold one of the places for the ``async with`` block (waiting for one if none is free)."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Take a place, waiting for one if none is free; :meth:`release` gives it back."""
        if self.active < self.limit and not self._waiters:
            self._take()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # the place was handed over just before the cancel
                self.active -= 1
                self._hand_over()
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.active -= 1
        self._hand_over()

    def _take(self) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)

    def _hand_over(self) -> None:
        while self._waiters and self.active < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)

    def statistics(self) -> dict:
        return {"limit": self.limit, "active": self.active, "waiting": len(self._waiters),
                "most_active": self.most_active}
