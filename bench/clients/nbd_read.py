"""Sequential read throughput of an NBD export (libnbd) or of a file (os.preadv), in the same chunk size.

Usage:  /usr/bin/python3 bench/clients/nbd_read.py SOURCE OFFSET LENGTH CHUNK [--depth N]

SOURCE is an NBD URI (``nbd://``, ``nbd+unix://``: read with libnbd, ``--depth``
requests of CHUNK bytes in flight) or a file path (read with ``os.preadv`` into one
reused buffer, one CHUNK at a time).  OFFSET, LENGTH and CHUNK are bytes.  Prints one JSON line:
``{"source", "bytes", "seconds", "mib_s"}``.  Nothing is dropped from the page
cache: the figure is that of whatever is cached at the time.

Runs with the system interpreter, which has libnbd's ``nbd`` module (only
needed for URIs).
"""

from __future__ import annotations

import argparse
import json
import os
import time

MiB = 1024 * 1024


def read_nbd(uri: str, offset: int, length: int, chunk: int, depth: int) -> int:
    import nbd  # the system's python3-libnbd; not needed for files

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        free = [nbd.Buffer(chunk) for _ in range(depth)]
        in_flight: dict[int, object] = {}  # cookie -> buffer
        pos, end, done = offset, offset + length, 0
        while pos < end or in_flight:
            while pos < end and free:
                n = min(chunk, end - pos)
                buf = free.pop() if n == chunk else nbd.Buffer(n)
                in_flight[h.aio_pread(buf, pos)] = buf
                pos += n
            h.poll(-1)
            for cookie in [c for c in in_flight if h.aio_command_completed(c)]:  # raises on a failed read
                buf = in_flight.pop(cookie)
                done += buf.size()
                if buf.size() == chunk:
                    free.append(buf)
        return done
    finally:
        h.shutdown()


def read_file(path: str, offset: int, length: int, chunk: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = memoryview(bytearray(chunk))  # one buffer, reused (as libnbd's are)
        pos, end, done = offset, offset + length, 0
        while pos < end:
            n = os.preadv(fd, [buf[:min(chunk, end - pos)]], pos)
            if not n:
                raise SystemExit(f"{path}: end of file at {pos}")
            done += n
            pos += n
        return done
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="nbd:// or nbd+unix:// URI, or a file path")
    ap.add_argument("offset", type=int)
    ap.add_argument("length", type=int)
    ap.add_argument("chunk", type=int)
    ap.add_argument("--depth", type=int, default=4, help="NBD requests in flight (default 4)")
    args = ap.parse_args()
    started = time.perf_counter()
    if args.source.startswith("nbd"):
        done = read_nbd(args.source, args.offset, args.length, args.chunk, max(1, args.depth))
    else:
        done = read_file(args.source, args.offset, args.length, args.chunk)
    seconds = time.perf_counter() - started
    print(json.dumps({"source": args.source, "bytes": done, "seconds": round(seconds, 4),
                      "mib_s": round(done / MiB / seconds, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
