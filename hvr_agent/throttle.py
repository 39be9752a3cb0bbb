"""``Throttle``: every upload of the agent paced under one bandwidth cap and its schedule.

The replica client sends every upload body (initial windows, cycles, and
whatever else uploads through it) through :meth:`Throttle.pieces`: the body's
chunks are cut into pieces of about 50 ms at the cap, and each piece waits
for its tokens (:class:`hvr_common.pure.token_bucket.TokenBucket`).  One
bucket serves every upload of the agent, so the cap holds for their sum;
pieces take their turn first come, first served.  The cap in force is asked
of the schedule at every piece (:class:`hvr_common.pure.bandwidth.BandwidthSchedule`),
so a window boundary or a ``hvrctl server set`` takes effect within a piece.
The clocks and the sleep are passed in, so a test can drive the schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from hvr_common.pure.bandwidth import BandwidthSchedule
from hvr_common.pure.token_bucket import TokenBucket

PIECE_S = 0.05
MIN_PIECE_BYTES = 16 * 1024
MAX_PIECE_BYTES = 1024 * 1024


def local_second_of_day() -> float:
    now = time.time()
    t = time.localtime(now)
    return t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec + (now % 1.0)


class Throttle:
    def __init__(self, schedule: BandwidthSchedule, *, clock: Callable[[], float] = time.monotonic,
                 second_of_day: Callable[[], float] = local_second_of_day,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.schedule = schedule
        self._clock = clock
        self._second_of_day = second_of_day
        self._sleep = sleep
        self._bucket: TokenBucket | None = None
        self._turn = asyncio.Lock()
        self.sent_bytes = 0

    def set_schedule(self, schedule: BandwidthSchedule) -> None:
        self.schedule = schedule

    def rate_now(self) -> int | None:
        return self.schedule.rate_at(self._second_of_day())

    async def pieces(self, chunk: bytes | bytearray | memoryview) -> AsyncIterator[memoryview | bytes]:
        """``chunk`` in pieces, each yielded once the cap allows it to be sent."""
        view = memoryview(chunk)
        offset = 0
        while offset < len(view):
            rate = self.rate_now()
            if rate is None:  # no cap in force: the rest at once (the chunk itself when it is all of it)
                piece = chunk if offset == 0 else view[offset:]
            else:
                size = min(max(int(rate * PIECE_S), MIN_PIECE_BYTES), MAX_PIECE_BYTES)
                piece = view[offset:offset + size]
                await self._wait_turn(rate, len(piece))
            offset += len(piece)
            self.sent_bytes += len(piece)
            yield piece

    async def _wait_turn(self, rate: int, nbytes: int) -> None:
        async with self._turn:
            now = self._clock()
            if self._bucket is None:
                self._bucket = TokenBucket(rate, now)
            elif self._bucket.rate != rate:
                self._bucket.set_rate(rate, now)
            delay = self._bucket.take(nbytes, now)
            if delay > 0:
                await self._sleep(delay)
