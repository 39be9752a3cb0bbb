"""Bump a counter on disk A, then the same value on disk B, in a loop (libnbd).

Usage: /usr/bin/python3 counter_writer.py URI_A URI_B SECONDS
Any crash-consistent cut of the two disks has B <= A <= B + 1.
"""

import sys
import time

import nbd

a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1])
b.connect_uri(sys.argv[2])
end = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < end:
    n += 1
    value = n.to_bytes(8, "little") + bytes(504)
    a.pwrite(value, 0)
    b.pwrite(value, 0)
print(n)
