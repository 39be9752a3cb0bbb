"""Run hvr-agent with its replication clock running ``HVR_TEST_CLOCK_SCALE`` times faster (tests only).

The replication task reads the wall clock through ``time.time_ns`` in
``hvr_agent.cycles``, ``hvr_agent.driver``, ``hvr_agent.tracker`` and
``hvr_agent.journal`` (the times in each log's header and END record, from
which a cycle's cut time is read) and sleeps until the next cut for
``CutClock.seconds_to_cut``; these are replaced here, so a 30 s interval
passes in 30 / scale real seconds while the rules (the pure CutClock and
schedule) decide as they do in production.  Everything else (request signing,
log lines) keeps the real clock.
"""

from __future__ import annotations

import os
import sys
import time
import types

from hvr_common.pure import schedule
from hvr_agent import cycles, driver, journal, tracker
from hvr_agent.main import main

SCALE = float(os.environ.get("HVR_TEST_CLOCK_SCALE", "1"))
_START_NS = time.time_ns()


def _scaled_time_ns() -> int:
    return _START_NS + int((time.time_ns() - _START_NS) * SCALE)


_clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
_clock.time_ns = _scaled_time_ns
cycles.time = _clock
driver.time = _clock
journal.time = _clock
tracker._now_ns = _scaled_time_ns
_seconds_to_cut = schedule.CutClock.seconds_to_cut


def _real_seconds_to_cut(self, now_ns: int) -> float:
    """The wait until the next cut, in real seconds (the clock's seconds pass SCALE times faster)."""
    return _seconds_to_cut(self, now_ns) / SCALE


schedule.CutClock.seconds_to_cut = _real_seconds_to_cut

if __name__ == "__main__":
    sys.exit(main())
