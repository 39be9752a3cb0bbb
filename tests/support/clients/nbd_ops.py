"""Drive an NBD export with libnbd (an independent client): run as ``nbdsh`` script.

Usage (from the tests):  /usr/bin/python3 nbd_ops.py URI OPS_JSON
OPS_JSON is a list of [op, offset, length, seed] with op one of
write, write_fua, trim, zero, zero_nohole, flush.  Data of a write is
``random.Random(seed).randbytes(length)`` so the test can rebuild it.
"""

import json
import random
import sys

import nbd

uri, ops_path = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
with open(ops_path) as fh:
    ops = json.load(fh)
for op, offset, length, seed in ops:
    if op in ("write", "write_fua"):
        data = random.Random(seed).randbytes(length)
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA if op == "write_fua" else 0)
    elif op == "trim":
        h.trim(length, offset)
    elif op == "zero":
        h.zero(length, offset)
    elif op == "zero_nohole":
        h.zero(length, offset, nbd.CMD_FLAG_NO_HOLE)
    elif op == "flush":
        h.flush()
    else:
        raise SystemExit(f"unknown op {op}")
h.shutdown()
