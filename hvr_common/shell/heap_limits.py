"""The daemons' C heap: a bound on glibc's per-thread arenas and a fixed mmap threshold.

Both daemons hand large buffers (up to a few MiB: cycle batches, image reads, zstd frames) between
the event loop and worker threads.  With glibc's defaults each worker thread gets an arena of its
own (up to eight per core) and, after the first large buffer is freed, the mmap threshold rises
to that buffer's size, so later large buffers are carved from the arenas and stay in the
process's resident set after they are freed.  Under sustained churn this held the agent near
230 MiB where 100 MiB are in use (bench/churn.py).  Two arenas and a fixed 256 KiB threshold
(large buffers are mapped and unmapped, returned to the system at once) keep the resident set
close to what is live.  Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD_BYTES = 256 * 1024


def bound_heap() -> bool:
    """Apply the bounds; True when the C library took both."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_ARENA_MAX, ARENAS) == 1 and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
