"""Failed authentications limited per source address: a token bucket per address, bounded."""

from __future__ import annotations

import pytest

from hvr_common.pure.auth_failures import AuthFailureLimiter
from hvr_common.pure.errors import TransientError
from hvr_common.pure.wire.error_catalogue import status_for


def test_burst_failures_then_refused_with_the_wait():
    lim = AuthFailureLimiter(burst=3, refill_per_s=0.5)
    for i in range(3):
        lim.check("10.0.0.1", 100.0)
        lim.failed("10.0.0.1", 100.0)
    with pytest.raises(TransientError) as info:
        lim.check("10.0.0.1", 100.0)
    exc = info.value
    assert exc.code == "auth_rate_limited" and status_for(exc) == 429
    assert exc.detail == {"retry_after_s": 2} and "10.0.0.1" in exc.message


@pytest.mark.parametrize("failures, at_s, allowed", [
    # burst 2, one failure back every 10 s; failures at t=0
    (1, 0.0, True),
    (2, 0.0, False),
    (2, 9.9, False),
    (2, 10.0, True),
    (3, 9.9, False),  # no debt: a refused address is not authenticated, so it cannot fail more
    (5, 30.0, True),
])
def test_allowance_comes_back_at_the_refill_rate(failures, at_s, allowed):
    lim = AuthFailureLimiter(burst=2, refill_per_s=0.1)
    for _ in range(failures):
        lim.failed("a", 0.0)
    assert (lim.retry_after_s("a", at_s) == 0) is allowed


def test_addresses_are_counted_apart_and_successes_cost_nothing():
    lim = AuthFailureLimiter(burst=1, refill_per_s=0.01)
    lim.failed("a", 0.0)
    with pytest.raises(TransientError):
        lim.check("a", 1.0)
    for _ in range(100):
        lim.check("b", 1.0)  # never failed: always allowed
    assert lim.retry_after_s("b", 1.0) == 0


def test_the_table_is_bounded_and_forgets_refilled_addresses():
    lim = AuthFailureLimiter(burst=2, refill_per_s=1.0, max_addresses=3)
    for n in range(10):
        lim.failed(f"10.0.0.{n}", 0.0)
    assert len(lim) == 3
    assert lim.retry_after_s("10.0.0.9", 0.0) == 0 and len(lim) == 3  # one failure of two: still allowed
    lim.retry_after_s("10.0.0.8", 5.0)  # full again: forgotten
    assert len(lim) == 2


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        AuthFailureLimiter(burst=0)
    with pytest.raises(ValueError):
        AuthFailureLimiter(refill_per_s=0)
