"""Overwrites a disk's blocks as soon as it is told to, through one libnbd connection opened beforehand.

Usage: /usr/bin/python3 fire_writer.py URI SPAN_BYTES COUNT SEED GO_FILE
Connects, prints ``ready``, waits until GO_FILE exists, then writes COUNT
random 4 KiB blocks at random aligned offsets inside [0, SPAN), flushes, and
prints ``done``.
"""

import os
import random
import sys
import time

import nbd

uri, span, count, seed, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
print("ready", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.001)
for _ in range(count):
    h.pwrite(rng.randbytes(4096), rng.randrange(0, span // 4096) * 4096)
h.flush()
h.shutdown()
print("done", flush=True)
