#!/usr/bin/env python3
"""Online verify of an identical, half-allocated image against reading the image once (``cat``).

One run:

1. a sparse primary image of ``--size`` bytes, half of it random data in
   extents of 64 KiB to 4 MiB (the layout of ``initial_vs_rsync.py``); a
   listener and an agent on 127.0.0.1; the VM enabled (``--frequency 900``)
   and its initial copy, so the replica is identical;
2. reference: page cache dropped (``/proc/sys/vm/drop_caches``, as root),
   ``cat IMAGE > /dev/null`` timed;
3. hvr: page cache dropped again, ``vm verify`` through the admin API timed
   (it reads the primary's image and the replica's, both on this host); it
   must report no difference.

Printed: both times and their ratio (target: verify at most 1.5x the cat).
Without root the caches cannot be dropped: the figures are then warm-cache
ones, and the script says so.

Usage: .venv/bin/python bench/verify.py [--size 8G] [--seed 1] [--quick] [--workdir-parent DIR] [--keep]
                                        [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    MiB, ReplicationPair, WorkDir, allocated_bytes, human, parse_size, print_table, say, wait_for,
)
from initial_vs_rsync import build_image  # noqa: E402

VM = "bench"
TARGET_RATIO = 1.5


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="8G", help="image size (default 8G), half of it allocated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a 128 MiB image: proves the bench runs")
    ap.add_argument("--workdir-parent", default="/var/tmp")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    size = 128 * MiB if args.quick else parse_size(args.size)
    with WorkDir("hvr-bench-verify-", args.workdir_parent, args.keep) as work:
        image = work / "disk.img"
        say(f"building a {human(size)} image, half allocated")
        build_image(image, size, 0.5, args.seed)
        pair = ReplicationPair(work / "hvr")
        try:
            pair.start()
            pair.protect(VM, [image], frequency_s=900)
            pair.agent_api.request("POST", f"/v1/vms/{VM}/replication/initial", {})
            wait_for(lambda: pair.status(VM)["state"] == "Replicating", 3600, "the initial copy",
                     context=pair.log_tails)
            wait_for(lambda: pair.replica(VM)["state"] == "Replicating", 600, "the replica to replicate")
            cold = drop_caches()
            started = time.monotonic()
            subprocess.run(f"cat {image} > /dev/null", shell=True, check=True)
            cat_s = time.monotonic() - started
            drop_caches()
            started = time.monotonic()
            result = pair.agent_api.request("POST", f"/v1/vms/{VM}/replication/verify", {}, timeout_s=7200)
            verify_s = time.monotonic() - started
        finally:
            pair.close()
        allocated = allocated_bytes(image)
    ratio = verify_s / cat_s if cat_s else None
    print_table(["", "time s", "bytes"], [
        ["cat IMAGE", f"{cat_s:.2f}", human(allocated) + " allocated"],
        ["vm verify", f"{verify_s:.2f}", human(result["compared_bytes"]) + " compared"],
    ])
    print(f"verify / cat: {ratio:.2f} (target <= {TARGET_RATIO}); differing bytes: {result['differing_bytes']}"
          + ("" if cold else "  [caches could not be dropped: warm-cache figures]"))
    if args.json_out:
        args.json_out.write_text(json.dumps({"size_bytes": size, "allocated_bytes": allocated, "cat_s": cat_s,
                                             "verify_s": verify_s, "ratio": ratio, "cold": cold,
                                             "verify": result}, indent=1))
    return 0 if result["differing_bytes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
