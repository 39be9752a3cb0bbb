"""The agent's resync metric follows the running compare's progress."""

from types import SimpleNamespace

from hvr_agent.compare import CompareProgress
from hvr_agent.metrics import _resync_remaining


def test_resync_remaining_bytes_is_what_the_running_compare_has_left():
    idle = SimpleNamespace(resync=SimpleNamespace(progress=None))
    assert _resync_remaining(idle) == 0
    running = SimpleNamespace(resync=SimpleNamespace(progress=CompareProgress(total_bytes=1000, compared_bytes=400)))
    assert _resync_remaining(running) == 600
