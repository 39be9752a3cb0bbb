"""The listener's memory of which replicas a primary is resynchronizing (the backup gate asks it)."""

import uuid

from hvr_listener.resync_activity import QUIET_S, ResyncActivity


def test_a_resync_query_marks_the_replica_until_completion_or_quiet():
    now = [100.0]
    activity = ResyncActivity(clock=lambda: now[0])
    vm, other = uuid.uuid4(), uuid.uuid4()
    assert not activity.running(vm)
    activity.queried(vm)
    assert activity.running(vm) and not activity.running(other)
    activity.completed(vm)
    assert not activity.running(vm)
    activity.queried(vm)
    now[0] += QUIET_S - 1
    assert activity.running(vm)
    now[0] += 2
    assert not activity.running(vm)  # the primary went quiet: cancelled, or gone
