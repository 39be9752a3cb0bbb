"""The daemons bound glibc's heap (two arenas, a fixed mmap threshold) before their threads start."""

from __future__ import annotations

from hvr_common.shell import heap_limits


def test_glibc_takes_both_bounds():
    # this machine's C library is glibc: both mallopt calls must succeed (a wrong parameter number fails)
    assert heap_limits.bound_heap() is True

