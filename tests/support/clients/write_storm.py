"""A write storm through libnbd that records what the server acknowledged.

Usage: /usr/bin/python3 write_storm.py URI SPAN_BYTES SEED RECORD_FILE
Writes random data at random (often misaligned) offsets inside [0, SPAN),
flushing every 40 writes.  Each acknowledged write is recorded as
``W offset length crc32`` and each completed flush as ``F``; the record file
is line-buffered so it survives whatever happens to the server.  Runs until
the connection breaks.
"""

import random
import sys
import zlib

import nbd

uri, span, seed, record_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
with open(record_path, "w", buffering=1) as rec:
    rec.write("S\n")
    n = 0
    try:
        while True:
            length = rng.choice([512, 4096, 4096, 8192, 65536, 1000, 3333])
            offset = rng.randrange(0, span - length)
            data = rng.randbytes(length)
            h.pwrite(data, offset)
            rec.write(f"W {offset} {length} {zlib.crc32(data)}\n")
            n += 1
            if n % 40 == 0:
                h.flush()
                rec.write("F\n")
    except nbd.Error as exc:
        rec.write(f"E {exc}\n")
