#!/usr/bin/env python3
"""What one random 4 KiB pwrite into a cached raw image costs, by how the image was written.

A diagnostic for the ``rand-write-4k`` figure of ``nbd_fio.py``: the agent
writes the image from its one event-loop thread, so the kernel's cost of one
small buffered write is on its critical path (qemu-nbd spreads its writes
over a thread pool).  On kernels whose page cache keeps large folios for
large writes (ext4 on 6.x), a small write into such a folio costs many times
more than into a page-sized one.

Both cases write the same file, fully cached:

    large folios   the file was written 4 MiB at a time (as nbd_fio.py's
                   preallocation and its seq-write-1M workload do)
    small folios   the same, then the cached pages dropped
                   (POSIX_FADV_DONTNEED), so each 4 KiB write caches one page

It prints microseconds per pwrite for each and the ratio large / small.

Usage: .venv/bin/python bench/page_cache_pwrite.py [--size-mib 2048] [--seconds 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

MiB = 1024 * 1024
BLOCK = 4096
WRITE_CHUNK = 4 * MiB


def fill(fd: int, size: int) -> None:
    chunk = os.urandom(WRITE_CHUNK)
    for offset in range(0, size, WRITE_CHUNK):
        os.pwrite(fd, chunk[: min(WRITE_CHUNK, size - offset)], offset)
    os.fsync(fd)


def pwrite_cost_us(fd: int, size: int, seconds: float, rng: random.Random) -> float:
    data = os.urandom(BLOCK)
    blocks = size // BLOCK
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(1000):
            os.pwrite(fd, data, rng.randrange(blocks) * BLOCK)
        count += 1000
    return (time.perf_counter() - started) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048, help="file size in MiB (default 2048)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of pwrites per case (default 3)")
    parser.add_argument("--dir", default="/var/tmp", help="where the file is made (default /var/tmp)")
    args = parser.parse_args(argv)
    size = args.size_mib * MiB
    rng = random.Random(1)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="hvr-pwrite-") as work:
        path = os.path.join(work, "image.raw")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for case in ("large folios", "small folios"):
                fill(fd, size)
                if case == "small folios":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                results[case] = pwrite_cost_us(fd, size, args.seconds, rng)
                print(f"{case:13}  {results[case]:7.1f} us per random 4 KiB pwrite", flush=True)
        finally:
            os.close(fd)
    ratio = results["large folios"] / results["small folios"]
    print(f"large / small: {ratio:.1f}x  (kernel {os.uname().release})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
