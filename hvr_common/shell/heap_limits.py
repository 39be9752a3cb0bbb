"""The daemons' C heap: a bound on glibc's per-thread arenas and fixed mmap and trim thresholds.

Both daemons hand large buffers (cycle batches, 4 MiB image reads, zstd frames) between the event
loop and worker threads.  With glibc's defaults each worker thread gets an arena of its own (up to
eight per core) and, after the first large buffer is freed, the mmap threshold rises to that
buffer's size, so later large buffers are carved from the arenas and stay resident after they are
freed: under sustained churn the agent reached 232 MiB (bench/churn.py, bitmap mode, 150 MiB/s).
Two arenas, buffers above 2 MiB mapped and unmapped (returned to the system at once), and a heap
top kept up to 8 MiB bring it to about 170 MiB.  The trim threshold matters as much: fixing the
mmap threshold also fixes the trim threshold at glibc's 128 KiB default, and the heap top was then
given back and faulted in again for every 1 MiB guest write (bench/nbd_fio.py seq-write-1M fell
from 1.34x to 0.87x qemu-nbd with a 256 KiB mmap threshold alone).  Elsewhere than glibc this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD_BYTES = 2 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 8 * 1024 * 1024


def bound_heap() -> bool:
    """Apply the bounds; True when the C library took all three."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, ARENAS), (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))
