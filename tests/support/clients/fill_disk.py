"""Write through an NBD export until the server reports errors (libnbd).

Usage: /usr/bin/python3 fill_disk.py URI SIZE_BYTES
Writes 1 MiB and 4 KiB pieces of random data across the disk; prints one
JSON line: {"ok": n, "errors": [messages...]}.  Stops after 8 errors.
"""

import json
import os
import sys

import nbd

uri, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
ok, errors = 0, []
offset = 0
while len(errors) < 8 and offset < size:
    length = 1 << 20 if (offset // (1 << 20)) % 2 == 0 else 4096
    try:
        h.pwrite(os.urandom(length), offset)
        ok += 1
    except nbd.Error as exc:
        errors.append(str(exc))
    offset += length if length == 1 << 20 else 1 << 20
try:
    h.flush()
except nbd.Error as exc:
    errors.append("flush: " + str(exc))
print(json.dumps({"ok": ok, "errors": errors}))
