#!/usr/bin/env python3
"""Reverse replication after an unplanned failover against a full copy of the allocated data, same run.

Two sites on 127.0.0.1 (``tests/support/two_sites.py``: each an agent and a
listener; each listener behind a counting TCP proxy).  One run:

1. site A: a disk of ``--size`` bytes full of random data, replicated to
   site B; its initial copy is the **full copy** reference (time, bytes on
   the wire: every allocated byte travels);
2. site A is lost: its agent is killed (SIGKILL); ``--changed-percent`` of
   its 4 KiB blocks, chosen at random, are overwritten in its image (writes
   that never reached B);
3. site B, the runbook: ``hvrctl failover start NAME --force``, ``hvrctl
   failover complete NAME``; the served VM writes ``--changed-percent`` of
   its blocks at random through B's agent;
4. site A returns: its agent starts (and is fenced), ``hvrctl replica adopt
   NAME --from-agent``;
5. site B: ``hvrctl vm set NAME --reverse --replica-server 127.0.0.1 --port
   A --key FILE``, timed until site A's replica applied the differences;
   bytes through A's proxy; ``qemu-img compare`` of both sites' images.

Printed: time and bytes on the wire of the reverse against the full copy,
and the reverse's bytes against the diverged data (the blocks either side
wrote: target at most 1.5x).

Usage: .venv/bin/python bench/reverse.py [--size 4G] [--changed-percent 1] [--seed 1] [--quick]
                                         [--workdir-parent DIR] [--keep] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    REPO_ROOT, MiB, WorkDir, drop_dirty_pages, human, parse_size, print_table, qemu_img_compare, say, wait_for,
)
from two_sites import Site, TwoSites  # noqa: E402

VM = "bench"
BLOCK = 4096
TARGET_WIRE_RATIO = 1.5
NBD_OPS = REPO_ROOT / "tests" / "support" / "clients" / "nbd_ops.py"
WAIT_S = 3600


def build_image(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(0, size, 4 * MiB):
            fh.write(os.urandom(min(4 * MiB, size - fh.tell())))
        fh.flush()
        os.fsync(fh.fileno())


def pick_blocks(size: int, fraction: float, rng: random.Random) -> list[int]:
    blocks = size // BLOCK
    return sorted(rng.sample(range(blocks), max(1, int(blocks * fraction))))


def write_image_blocks(path: Path, blocks: list[int]) -> None:
    """The old primary's last writes, straight into its image (its agent is gone)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for block in blocks:
            os.pwrite(fd, os.urandom(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_nbd_blocks(uri: str, blocks: list[int], work: Path, seed: int) -> None:
    """The new primary's writes, through its agent's NBD socket (libnbd, an independent client)."""
    ops = work / "ops.json"
    ops.write_text(json.dumps([["write", b * BLOCK, BLOCK, seed + i] for i, b in enumerate(blocks)] +
                              [["flush", 0, 0, 0]]))
    subprocess.run(["/usr/bin/python3", str(NBD_OPS), uri, str(ops)], check=True, timeout=WAIT_S)


def wait_replicating(primary: Site, two: TwoSites) -> None:
    def settled() -> bool:
        st = primary.replication(VM)
        if st["state"] == "Error":
            raise RuntimeError(f"replication failed: {st.get('state_detail')}\n{two.log_tails()}")
        return st["state"] == "Replicating" and not (st.get("resync") or {}).get("running")
    wait_for(settled, WAIT_S, f"site {primary.name}'s VM to replicate", interval_s=0.2, context=two.log_tails)


def applied_everything(primary: Site, two: TwoSites) -> None:
    primary.hvrctl("vm", "sync-now", VM, timeout_s=WAIT_S)
    two.wait_applied(primary, VM, WAIT_S)


def full_copy(two: TwoSites, image: Path) -> dict:
    a = two.a
    a.add_vm(VM, [image], tracking="bitmap")
    a.enable(VM, frequency=900)
    two.reset_counts()
    started = time.monotonic()
    a.initial(VM, timeout_s=WAIT_S)
    wait_replicating(a, two)
    elapsed_s = time.monotonic() - started
    up, down = a.peer.proxy.counts()
    applied_everything(a, two)
    return {"time_s": elapsed_s, "up_bytes": up, "down_bytes": down}


def reverse(two: TwoSites, image_a: Path, changed: float, rng: random.Random, work: Path, seed: int) -> dict:
    a, b = two.a, two.b
    size = image_a.stat().st_size
    a.kill_agent()  # site A is lost
    blocks_a = pick_blocks(size, changed, rng)
    write_image_blocks(image_a, blocks_a)

    b.failover_start(VM, force=True, timeout_s=WAIT_S)
    b.failover_complete(VM, timeout_s=WAIT_S)
    served = b.agent_vm(VM)
    disk = served["disks"][0]
    blocks_b = pick_blocks(size, changed, rng)
    write_nbd_blocks(b.nbd_uri(VM, disk["name"]), blocks_b, work, seed)

    a.restart_agent()  # site A returns; its agent is fenced at its first upload
    a.adopt_from_agent(VM, timeout_s=WAIT_S)
    drop_dirty_pages()
    two.reset_counts()
    started = time.monotonic()
    b.reverse(VM, timeout_s=WAIT_S)
    wait_replicating(b, two)
    applied_everything(b, two)
    elapsed_s = time.monotonic() - started
    up, down = a.proxy.counts()
    same, text = qemu_img_compare(image_a, Path(disk["path"]))
    diverged = len(set(blocks_a) | set(blocks_b)) * BLOCK
    kept = [p for p in a.points(VM) if p.get("label") == "kept-aside"]
    return {"time_s": elapsed_s, "up_bytes": up, "down_bytes": down, "identical": same, "compare": text,
            "diverged_bytes": diverged, "kept_aside_points": len(kept)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="disk size (default 4G)")
    ap.add_argument("--changed-percent", type=float, default=1.0, help="share of 4 KiB blocks each side writes (1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a 64 MiB disk: proves the bench runs")
    ap.add_argument("--workdir-parent", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    size = 64 * MiB if args.quick else parse_size(args.size)
    rng = random.Random(args.seed)
    with WorkDir("hvr-bench-reverse-", args.workdir_parent, args.keep) as work:
        two = TwoSites(work, agent_config={"initial_window_bytes": 64 * MiB})
        try:
            two.start()
            image = two.a.images / "disk.img"
            say(f"building a {human(size)} disk of random data on site A")
            build_image(image, size)
            drop_dirty_pages()
            say("full copy: the initial replication A -> B")
            full = full_copy(two, image)
            say(f"unplanned failover to B, {args.changed_percent} % written on each side, reverse B -> A")
            rev = reverse(two, image, args.changed_percent / 100, rng, work, args.seed)
        finally:
            two.close()
    full_wire = full["up_bytes"] + full["down_bytes"]
    rev_wire = rev["up_bytes"] + rev["down_bytes"]
    diverged = rev["diverged_bytes"]
    print_table(["", "time s", "wire bytes", "wire / diverged", "identical"], [
        ["full copy", f"{full['time_s']:.2f}", human(full_wire), f"{full_wire / diverged:.2f}", "-"],
        ["reverse", f"{rev['time_s']:.2f}", human(rev_wire), f"{rev_wire / diverged:.2f}", rev["identical"]],
    ])
    print(f"reverse against full copy: {rev['time_s'] / full['time_s']:.3f}x the time, "
          f"{rev_wire / full_wire:.3f}x the bytes; reverse wire / diverged data: {rev_wire / diverged:.2f} "
          f"(target <= {TARGET_WIRE_RATIO}); kept-aside points on the old primary: {rev['kept_aside_points']}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"size_bytes": size, "full_copy": full, "reverse": rev}, indent=1))
    return 0 if rev["identical"] and rev["kept_aside_points"] == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
