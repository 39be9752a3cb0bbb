#!/usr/bin/env python3
"""Resync by digest tree against ``rsync --inplace --no-whole-file -B 4096`` of the same two files.

One run:

1. a primary image of ``--size`` bytes full of random data; a listener and an
   agent on 127.0.0.1 with a counting TCP proxy between them; the VM enabled
   (``--frequency 900``: no cycle runs by itself) and its initial copy;
2. 1 % (``--changed-percent``) of the replica's 4 KiB blocks, chosen at
   random, overwritten with random data behind the listener's back; a copy of
   that damaged replica is the rsync destination;
3. hvr: ``vm resync`` through the admin API, timed until the cycle carrying
   the differences is applied on the replica; bytes both ways through the
   proxy; ``qemu-img compare`` after;
4. rsync: an rsync daemon on 127.0.0.1 behind the same kind of proxy,
   ``rsync --inplace --no-whole-file -B 4096 IMAGE rsync://127.0.0.1:PORT/bench/``
   onto the damaged copy; timed; bytes through the proxy; ``qemu-img compare``.

Printed: both times and their ratio (target: hvr at least 4x faster), bytes
on the wire against the changed data (target: hvr at most 1.5x), and the hvr
resync's phases from the daemons' JSON events (request, replica digests read,
replica rebased, resync completed, cycle shipped, cycle applied).

``--py-spy DIR`` records the agent and the listener during the hvr resync.

Usage: .venv/bin/python bench/resync.py [--size 2G] [--changed-percent 1] [--seed 1] [--quick]
                                        [--workdir-parent DIR] [--keep] [--json-out FILE] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    MiB, PySpy, ReplicationPair, WorkDir, drop_dirty_pages, human, parse_size, print_busiest_frames, print_table,
    qemu_img_compare, say, wait_for,
)
from initial_vs_rsync import ensure_rsync, run_rsync  # noqa: E402

VM = "bench"
BLOCK = 4096
TARGET_SPEEDUP = 4.0
TARGET_WIRE_RATIO = 1.5


def build_image(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(0, size, 4 * MiB):
            fh.write(os.urandom(min(4 * MiB, size - fh.tell())))
        fh.flush()
        os.fsync(fh.fileno())


def damage(path: Path, fraction: float, seed: int) -> int:
    blocks = os.path.getsize(path) // BLOCK
    chosen = random.Random(seed).sample(range(blocks), max(1, int(blocks * fraction)))
    fd = os.open(path, os.O_WRONLY)
    try:
        for block in chosen:
            os.pwrite(fd, os.urandom(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(chosen) * BLOCK


PHASES = (  # (daemon, event): the resync's steps as the daemons log them
    ("agent", "resync_started"), ("listener", "replica_digests_read"), ("listener", "replica_resynchronized"),
    ("agent", "resync_completed"), ("agent", "cycle_shipped"), ("listener", "cycle_applied"))


def _events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "event" in obj and "ts" in obj:
            out.append(obj)
    return out


def phases(pair: ReplicationPair, after_ts: str) -> list[tuple[str, str, str]]:
    """When each step of the resync happened (first such event after ``after_ts``): from the JSON logs."""
    logs = {"agent": _events(pair.agent.stdout_path), "listener": _events(pair.listener.stdout_path)}
    found = []
    for daemon, name in PHASES:
        ts = next((e["ts"] for e in logs[daemon] if e["event"] == name and e["ts"] >= after_ts), None)
        if ts is not None:
            found.append((ts, daemon, name))
    return sorted(found)


def print_phases(found: list[tuple[str, str, str]], requested_ts: str) -> None:
    def seconds(ts: str) -> float:
        hms = ts.split("T", 1)[1].rstrip("Z")
        h, m, sec = hms.split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    start = previous = seconds(requested_ts)
    print("hvr resync phases (from the daemons' events; s since the request, s since the previous step):")
    for ts, daemon, name in found:
        at = seconds(ts)
        print(f"  {at - start:6.3f}  +{at - previous:6.3f}  {daemon:8s} {name}")
        previous = at


def run_hvr(pair: ReplicationPair, image: Path) -> dict:
    pair.proxy.reset()
    before = pair.replica(VM)["last_applied_sequence"]
    requested_ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    started = time.monotonic()
    pair.agent_api.request("POST", f"/v1/vms/{VM}/replication/resync", {})

    def resynced() -> bool:
        st = pair.status(VM)
        if st["state"] == "Error":
            raise RuntimeError(f"resync failed: {st.get('state_detail')}\n{pair.log_tails()}")
        return st["state"] == "Replicating" and not (st.get("resync") or {}).get("running")

    wait_for(resynced, 3600, "the resync to finish", interval_s=0.05, context=pair.log_tails)
    pair.sync_now(VM, wait=True)  # the cycle with the differences (cut when the resync ended) acknowledged
    target = pair.status(VM)["next_sequence"] - 1
    wait_for(lambda: pair.replica(VM)["last_applied_sequence"] >= max(target, before + 1), 3600,
             "the replica to apply the resync's cycle", interval_s=0.05, context=pair.log_tails)
    elapsed_s = time.monotonic() - started
    up, down = pair.proxy.counts()
    resync = pair.status(VM)["resync"]
    same, text = qemu_img_compare(image, pair.replica_image(VM, image.stem))
    found = phases(pair, requested_ts)
    print_phases(found, requested_ts)
    return {"time_s": elapsed_s, "up_bytes": up, "down_bytes": down, "identical": same, "compare": text,
            "differing_bytes": resync.get("differing_bytes"), "sent_bytes": resync.get("sent_bytes"),
            "scanned_bytes": resync.get("scanned_bytes"), "cached_bytes": resync.get("cached_bytes"),
            "phases": [[ts, daemon, name] for ts, daemon, name in found]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--changed-percent", type=float, default=1.0, help="share of 4 KiB blocks changed (1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a 64 MiB image: proves the bench runs")
    ap.add_argument("--workdir-parent", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--py-spy", metavar="DIR", type=Path, help="record both daemons with py-spy during the resync")
    args = ap.parse_args(argv)
    size = 64 * MiB if args.quick else parse_size(args.size)
    rsync = ensure_rsync()
    with WorkDir("hvr-bench-resync-", args.workdir_parent, args.keep) as work:
        image = work / "disk.img"
        say(f"building a {human(size)} image of random data")
        build_image(image, size)
        pair = ReplicationPair(work / "hvr")
        try:
            pair.start()
            pair.protect(VM, [image], frequency_s=900)
            pair.agent_api.request("POST", f"/v1/vms/{VM}/replication/initial", {})
            wait_for(lambda: pair.status(VM)["state"] == "Replicating", 3600, "the initial copy",
                     context=pair.log_tails)
            wait_for(lambda: pair.replica(VM)["state"] == "Replicating", 600, "the replica to replicate")
            replica = pair.replica_image(VM, image.stem)
            changed = damage(replica, args.changed_percent / 100, args.seed)
            rsync_dest_seed = work / "damaged.img"
            shutil.copyfile(replica, rsync_dest_seed)
            drop_dirty_pages()
            say(f"hvr: resync of {human(size)} with {human(changed)} changed")
            spies = []
            if args.py_spy:
                args.py_spy.mkdir(parents=True, exist_ok=True)
                spies = [PySpy(pair.agent_pid, args.py_spy / "agent.raw"),
                         PySpy(pair.listener_pid, args.py_spy / "listener.raw")]
            try:
                hvr = run_hvr(pair, image)
            finally:
                for spy in spies:
                    spy.stop()
        finally:
            pair.close()
        # rsync onto the same damaged copy: run_rsync sends IMAGE into an empty module folder, so the
        # damaged copy is put there first under the image's name.
        dest = work / "rsync" / "dest"
        dest.mkdir(parents=True)
        shutil.move(rsync_dest_seed, dest / image.name)
        drop_dirty_pages()
        say("rsync: the same two files")
        rs = run_rsync(work, image, rsync, extra_args=["--inplace", "--no-whole-file", "-B", "4096"],
                       fresh_dest=False)
    hvr_wire = hvr["up_bytes"] + hvr["down_bytes"]
    rs_wire = rs["up_bytes"] + rs["down_bytes"]
    speedup = rs["time_s"] / hvr["time_s"] if hvr["time_s"] else None
    print_table(["", "time s", "wire bytes", "wire / changed", "identical"], [
        ["hvr resync", f"{hvr['time_s']:.2f}", human(hvr_wire), f"{hvr_wire / changed:.2f}", hvr["identical"]],
        ["rsync", f"{rs['time_s']:.2f}", human(rs_wire), f"{rs_wire / changed:.2f}", rs["identical"]],
    ])
    print(f"speed-up against rsync: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x); hvr wire / changed data: "
          f"{hvr_wire / changed:.2f} (target <= {TARGET_WIRE_RATIO})")
    if hvr.get("cached_bytes") is not None:
        print(f"hvr primary: {human(hvr['scanned_bytes'])} read and hashed, {human(hvr['cached_bytes'])} from its "
              f"digest cache")
    if args.py_spy:
        print_busiest_frames(args.py_spy, "the resync")
    if args.json_out:
        args.json_out.write_text(json.dumps({"size_bytes": size, "changed_bytes": changed, "hvr": hvr,
                                             "rsync": rs, "speedup": speedup}, indent=1))
    return 0 if hvr["identical"] and rs["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
