"""The agent's throttle and its parallel-transfer places, with injected clocks (no daemon)."""

from __future__ import annotations

import asyncio

import pytest

from hvr_common.pure.bandwidth import BandwidthSchedule
from hvr_common.shell.concurrency_limit import ConcurrencyLimit
from hvr_agent.throttle import Throttle

MiB = 1024 * 1024
H = 3600


class FakeTime:
    """A monotonic clock and a wall clock that only move when the throttle sleeps."""

    def __init__(self, second_of_day: float):
        self.now = 1000.0
        self.day_offset = second_of_day - self.now

    def clock(self) -> float:
        return self.now

    def second_of_day(self) -> float:
        return (self.now + self.day_offset) % 86400

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def send(throttle: Throttle, nbytes: int, chunk: int = MiB) -> list[tuple[float, int]]:
    """Send ``nbytes`` in chunks; (time, bytes) of every piece let through."""
    log = []
    left = nbytes
    while left:
        size = min(chunk, left)
        async for piece in throttle.pieces(bytes(size)):
            log.append((throttle._clock(), len(piece)))
        left -= size
    return log


def rate_between(log, start: float, end: float) -> float:
    return sum(n for t, n in log if start <= t < end) / (end - start)


def test_the_cap_holds_and_switches_at_the_schedule_boundary():
    schedule = BandwidthSchedule.from_json("8MiB/s", [{"start": "08:00", "end": "18:00", "limit": "2MiB/s"}])
    t = FakeTime(8 * H - 10)  # ten seconds before the window opens
    throttle = Throttle(schedule, clock=t.clock, second_of_day=t.second_of_day, sleep=t.sleep)
    log = asyncio.run(send(throttle, 8 * MiB * 10 + 2 * MiB * 10))
    start = log[0][0]
    assert rate_between(log, start + 1, start + 9) == pytest.approx(8 * MiB, rel=0.03)
    assert rate_between(log, start + 11, start + 19) == pytest.approx(2 * MiB, rel=0.03)
    # 80.8 MiB (80 and the burst) go before 08:00, the other 19.2 MiB at 2 MiB/s after it
    assert t.now - start == pytest.approx(10 + 19.2 / 2, abs=0.1)


def test_the_cap_lifts_when_the_window_closes_and_nothing_waits_uncapped():
    schedule = BandwidthSchedule.from_json("unlimited", [{"start": "23:59", "end": "24:00", "limit": "1MiB/s"}])
    t = FakeTime(86400 - 5)  # inside the window, five seconds before midnight
    throttle = Throttle(schedule, clock=t.clock, second_of_day=t.second_of_day, sleep=t.sleep)
    asyncio.run(send(throttle, 5 * MiB))
    capped_until = t.now
    assert capped_until - 1000.0 == pytest.approx(4.9, abs=0.2)
    asyncio.run(send(throttle, 100 * MiB))  # the first piece waits for midnight, the rest goes uncapped
    assert 86400 - 5 + (t.now - 1000.0) == pytest.approx(86400, abs=0.1)
    assert throttle.sent_bytes == 105 * MiB


def test_a_changed_schedule_applies_to_the_next_piece():
    t = FakeTime(12 * H)
    throttle = Throttle(BandwidthSchedule(4 * MiB), clock=t.clock, second_of_day=t.second_of_day, sleep=t.sleep)
    asyncio.run(send(throttle, 8 * MiB))
    first = t.now
    throttle.set_schedule(BandwidthSchedule(MiB))
    asyncio.run(send(throttle, 4 * MiB))
    assert (first - 1000.0, t.now - first) == (pytest.approx(2, abs=0.15), pytest.approx(4, abs=0.15))


def test_pieces_are_cut_to_about_fifty_milliseconds_at_the_cap():
    t = FakeTime(0)
    throttle = Throttle(BandwidthSchedule(10 * MiB), clock=t.clock, second_of_day=t.second_of_day, sleep=t.sleep)
    sizes = {n for _, n in asyncio.run(send(throttle, 4 * MiB))}
    assert sizes == {512 * 1024}


def test_concurrent_uploads_share_one_cap():
    t = FakeTime(0)
    throttle = Throttle(BandwidthSchedule(2 * MiB), clock=t.clock, second_of_day=t.second_of_day, sleep=t.sleep)

    async def three():
        return await asyncio.gather(*(send(throttle, 4 * MiB, chunk=256 * 1024) for _ in range(3)))

    asyncio.run(three())
    assert t.now - 1000.0 == pytest.approx(6, abs=0.2)  # 12 MiB at 2 MiB/s, whoever sends them


# --- parallel places ----------------------------------------------------------------------------
def test_a_concurrency_limit_holds_and_its_limit_can_change():
    async def scenario():
        limit = ConcurrencyLimit(2)
        release = asyncio.Event()
        order = []

        async def worker(i):
            async with limit.held():
                order.append(i)
                await release.wait()

        tasks = [asyncio.create_task(worker(i)) for i in range(5)]
        while limit.statistics()["waiting"] < 3:
            await asyncio.sleep(0)
        assert limit.active == 2 and order == [0, 1]
        limit.set_limit(3)
        assert limit.active == 3
        tasks[4].cancel()  # a waiter leaving the queue frees nothing and takes nothing
        await asyncio.sleep(0)
        assert limit.statistics()["waiting"] == 1
        limit.set_limit(1)  # lowering it interrupts no holder
        release.set()
        await asyncio.gather(*tasks[:4])
        return limit, order

    limit, order = asyncio.run(scenario())
    assert order == [0, 1, 2, 3] and limit.most_active == 3 and limit.active == 0
    with pytest.raises(ValueError):
        ConcurrencyLimit(0)
