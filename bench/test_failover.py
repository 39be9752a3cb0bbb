#!/usr/bin/env python3
"""Test failover of a big sparse replica disk, and the cost of recovery points to apply.

One run:

1. one listener on 127.0.0.1 and two replica VMs made through its replication
   API (no agent): "on" (recovery points every cycle: fine window 60 min) and
   "off" (no capture at all: fine window 0, recovery history 0), each with one
   sparse disk of ``--disk-size``; the initial copy is one window over the
   whole disk with an empty log (the disks start as holes), so even 64 GiB
   takes a moment;
2. phase 1 ("base"): ``--churn`` bytes of random 64 KiB writes of
   incompressible data within the first ``--region`` bytes, in cycles of
   ``--cycle-bytes``, each cycle sent to both VMs (which VM goes first
   alternates per cycle) and applied before the next is sent; the latest
   point of "on" at the end is the point the test failover will show;
3. phase 2 ("churn since the point"): the same again.  Apply throughput per
   VM = record bytes applied / sum of ``latency_s`` of that VM's
   ``cycle_applied`` events (listener log); the ratio on/off is the cost of
   capturing pre-images (target >= 0.6);
4. test failover of the phase-1 point of "on": the admin API request
   (``POST /v1/replicas/on/test-failover``) timed alone ``--starts`` times
   (each stopped again), then ``hvrctl failover start --as-test`` timed as a
   command (Python start-up included) and left running (target <= 1 s).
   Space: bytes allocated (st_blocks) under the replica's ``test-failover/``
   and ``points/`` folders before and after the start (target: ~0), then after
   the test VM wrote ``--test-write`` bytes with qemu-io (target: about that);
5. read throughput of the first ``--region`` bytes (``bench/clients/nbd_read.py``,
   libnbd, ``--chunk`` requests, ``--depth`` in flight): the test VM's export
   against (a) the replica image served by ``qemu-nbd -r -f raw`` over a unix
   socket (target: view/(a) >= 0.7) and (b) the image file read directly in
   the same chunk size (information).  Nothing is dropped from the page
   cache (``sync`` only writes dirty pages back): both sides read warm data,
   after one uncounted warm-up read each.  ``--rounds`` rounds, order
   rotating, medians compared;
6. ``hvrctl failover stop --as-test``; the ``test-failover/`` folder must be gone;
7. for information, a test failover of the latest point (the image alone, no
   undo log to consult) read the same way (``view@latest``), then stopped.

Usage: .venv/bin/python bench/test_failover.py [--disk-size 64G] [--churn 1G] [--region 2G]
                                               [--cycle-bytes 64M] [--test-write 64M] [--chunk 4M]
                                               [--depth 4] [--rounds 3] [--starts 3] [--seed 1]
                                               [--workdir-parent /var/tmp] [--keep] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    AdminHttp, ListenerProcess, MiB, allocated_bytes, WorkDir, human, parse_size, print_table, run, say, wait_for,
)
from bundles import bundle, hrl_bytes  # noqa: E402  (tests/support, put on sys.path by _harness)
from listener_process import call, call_json  # noqa: E402

from hvr_common.pure.bundle import BundleKind  # noqa: E402

WRITE_BYTES = 64 * 1024
READER = Path(__file__).resolve().parent / "clients" / "nbd_read.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # has libnbd's nbd module
APPLY_TIMEOUT_S = 600

TARGET_START_S = 1.0
TARGET_APPLY_RATIO = 0.6
TARGET_READ_RATIO = 0.7


# --- a replica VM driven through the replication API ---------------------------------------------
class BigReplica:
    """One replica VM with one sparse disk of any size, fed hand-built bundles."""

    def __init__(self, lp: ListenerProcess, key, name: str, size: int):
        self.lp = lp
        self.key = key
        self.name = name
        self.size = size
        self.vm_id = uuid.uuid4()
        self.disk_id = uuid.uuid4()
        self.seq = 0  # last cycle sent

    @property
    def image(self) -> Path:
        return self.storage / "d0.img"

    @property
    def storage(self) -> Path:
        return self.lp.storage / str(self.vm_id)  # a replica's folder is named by its VM id

    def enable(self) -> None:
        body = {"name": self.name, "generation": 1, "frequency_s": 30, "compression": True,
                "disks": [{"disk_id": str(self.disk_id), "name": "d0", "size_bytes": self.size}]}
        r = call_json(self.lp.port, "PUT", f"/v1/replicas/{self.vm_id}", body, key=self.key)
        _check(r, 201, f"enable {self.name}")

    def initial(self) -> None:
        """One window [0, size) with an empty log: the disk is all holes, nothing to send."""
        log = hrl_bytes(self.vm_id, self.disk_id, 1, 0, self.size, [])
        body = bundle(BundleKind.INITIAL, self.vm_id, 1, 0, [(self.disk_id, self.size, 0, self.size, log)])
        r = call(self.lp.port, "PUT", f"/v1/replicas/{self.vm_id}/initial/{self.disk_id}?offset=0&end={self.size}",
                 body, key=self.key, headers={"X-Hvr-Generation": "1"})
        _check(r, 200, f"initial window of {self.name}")
        r = call_json(self.lp.port, "POST", f"/v1/replicas/{self.vm_id}/initial/complete",
                      {"generation": 1, "next_sequence": 1}, key=self.key)
        _check(r, 200, f"initial complete of {self.name}")
        if r.json()["state"] != "Replicating":
            raise RuntimeError(f"{self.name} is {r.json()['state']} after the initial copy")

    def send_cycle(self, ops: list[tuple]) -> int:
        self.seq += 1
        log = hrl_bytes(self.vm_id, self.disk_id, 1, self.seq, self.size, ops)
        body = bundle(BundleKind.CYCLE, self.vm_id, 1, self.seq, [(self.disk_id, self.size, 0, self.size, log)])
        del log
        r = call(self.lp.port, "PUT", f"/v1/replicas/{self.vm_id}/cycles/{self.seq}", body, key=self.key,
                 headers={"X-Hvr-Generation": "1", "Content-Type": "application/x-hvr-bundle"})
        _check(r, 201, f"cycle {self.seq} of {self.name}")
        return self.seq


def _check(reply, status: int, what: str) -> None:
    if reply.status != status:
        raise RuntimeError(f"{what}: HTTP {reply.status}: {reply.body[:500]!r}")


def set_history(lp: ListenerProcess, name: str, recovery_history: int, fine_window_min: int) -> None:
    """The history settings a primary would send, written while the listener is stopped."""
    db = sqlite3.connect(lp.state_dir / "listener.db")
    try:
        with db:
            n = db.execute("UPDATE replicas SET recovery_history=?, fine_window_min=? WHERE name=?",
                           (recovery_history, fine_window_min, name)).rowcount
    finally:
        db.close()
    if n != 1:
        raise RuntimeError(f"no replicas row for {name}")


class AppliedEvents:
    """The listener's ``cycle_applied`` events, read from its JSON log as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.by_cycle: dict[tuple[str, int], dict] = {}

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.pos += end
        for line in data[:end].splitlines():
            if b"cycle_applied" not in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "cycle_applied":
                self.by_cycle[(ev["vm"], ev["seq"])] = ev

    def wait(self, vm: str, seq: int, context) -> dict:
        def applied():
            self.poll()
            return self.by_cycle.get((vm, seq))
        return wait_for(applied, APPLY_TIMEOUT_S, f"cycle {seq} of {vm} applied", interval_s=0.02,
                        context=context)


# --- measuring -------------------------------------------------------------------------------------
def allocated_under(*folders: Path) -> int:
    """Bytes allocated (st_blocks * 512) by the files under ``folders`` (a missing folder counts 0)."""
    total = 0
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def churn_phase(label: str, vms: list[BigReplica], events: AppliedEvents, rng: random.Random, churn: int,
                region: int, cycle_bytes: int, context) -> dict:
    """``churn`` bytes of random 64 KiB writes within ``region``, cycle by cycle, to every VM of ``vms``."""
    blocks = region // WRITE_BYTES
    per_vm = {vm.name: {"cycles": 0, "bytes": 0, "latencies_s": [], "sequences": []} for vm in vms}
    left = churn
    cycle = 0
    started = time.monotonic()
    while left > 0:
        n = min(cycle_bytes, left) // WRITE_BYTES
        data = os.urandom(n * WRITE_BYTES)  # incompressible
        view = memoryview(data)
        ops = [("write", rng.randrange(blocks) * WRITE_BYTES, view[i * WRITE_BYTES:(i + 1) * WRITE_BYTES])
               for i in range(n)]
        order = vms if cycle % 2 == 0 else list(reversed(vms))
        for vm in order:
            seq = vm.send_cycle(ops)
            ev = events.wait(vm.name, seq, context)
            rec = per_vm[vm.name]
            rec["cycles"] += 1
            rec["bytes"] += n * WRITE_BYTES
            rec["latencies_s"].append(float(ev["latency_s"]))
            rec["sequences"].append(seq)
        del ops, view, data
        left -= n * WRITE_BYTES
        cycle += 1
    for rec in per_vm.values():
        rec["apply_s"] = round(sum(rec["latencies_s"]), 3)
        rec["mib_s"] = round(rec["bytes"] / MiB / rec["apply_s"], 1) if rec["apply_s"] else None
    say(f"phase {label}: {cycle} cycles of {human(cycle_bytes)} to each VM in {time.monotonic() - started:.1f} s")
    return per_vm


def timed_hvrctl(lp: ListenerProcess, *args) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = lp.hvrctl(*args)
    return time.perf_counter() - started, result


def read_mib_s(source: str, length: int, chunk: int, depth: int) -> float:
    result = run([SYSTEM_PYTHON, READER, source, "0", str(length), str(chunk), "--depth", str(depth)], 900)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["mib_s"])


def measure_reads(sources: dict[str, str], region: int, chunk: int, args) -> tuple[dict, dict]:
    """One uncounted warm-up read of each source, then ``args.rounds`` rounds in rotating order."""
    warmup = {name: read_mib_s(src, region, chunk, args.depth) for name, src in sources.items()}
    say("read warm-up (not counted): " + ", ".join(f"{n} {v:.0f} MiB/s" for n, v in warmup.items()))
    samples: dict[str, list[float]] = {k: [] for k in sources}
    names = list(sources)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(read_mib_s(sources[name], region, chunk, args.depth))
        say(f"read round {r + 1}: " + ", ".join(f"{n} {samples[n][-1]:.0f} MiB/s" for n in names))
    return warmup, samples


class QemuNbdReadOnly:
    """``qemu-nbd -r -f raw`` serving one image over a unix socket (persistent: one client after another)."""

    def __init__(self, image: Path, sock: Path):
        self.sock = sock
        self.process = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-t", "--cache=writeback", "-k", str(sock),
                                         str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: sock.exists() or self.process.poll() is not None, 20, "qemu-nbd's socket")
        if self.process.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited: {self.process.stderr.read().decode(errors='replace')}")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


# --- the run ---------------------------------------------------------------------------------------
def bench(args, work: Path) -> dict:
    disk_size, churn, region = parse_size(args.disk_size), parse_size(args.churn), parse_size(args.region)
    cycle_bytes, test_write = parse_size(args.cycle_bytes), parse_size(args.test_write)
    chunk = parse_size(args.chunk)
    if not WRITE_BYTES <= region <= disk_size or cycle_bytes < WRITE_BYTES or test_write > region:
        raise SystemExit("need 64 KiB <= --region <= --disk-size, --cycle-bytes >= 64 KiB, --test-write <= --region")
    out: dict = {"config": {"disk_size": disk_size, "churn": churn, "region": region, "cycle_bytes": cycle_bytes,
                            "write_bytes": WRITE_BYTES, "test_write": test_write, "chunk": chunk, "depth": args.depth,
                            "rounds": args.rounds, "starts": args.starts, "seed": args.seed, "workdir": str(work)}}
    lp = ListenerProcess(work / "listener")
    qemu_nbd = None
    try:
        lp.start().wait_ready()
        key, _ = lp.new_key("primary.bench")
        on, off = BigReplica(lp, key, "on", disk_size), BigReplica(lp, key, "off", disk_size)
        started = time.perf_counter()
        for vm in (on, off):
            vm.enable()
            vm.initial()
        out["initial_s"] = round(time.perf_counter() - started, 3)
        say(f"two replicas of one {human(disk_size)} sparse disk each enabled and initially replicated "
            f"in {out['initial_s']} s")
        lp.terminate()
        set_history(lp, "on", recovery_history=0, fine_window_min=60)
        set_history(lp, "off", recovery_history=0, fine_window_min=0)
        lp.start().wait_ready()
        events = AppliedEvents(lp.stdout_path)
        rng = random.Random(args.seed)
        vms = [on, off]

        # phases 1 and 2
        out["phase1"] = churn_phase("1 (base)", vms, events, rng, churn, region, cycle_bytes, lp.log_tail)
        points = lp.hvrctl_json("recovery-points", "list", "on")
        point = points[-1]
        if not point["latest"] or point["sequence"] != on.seq:
            raise RuntimeError(f"the latest point of 'on' is not its cycle {on.seq}: {point}")
        out["point"] = point
        say(f"phase-1 point of 'on': id {point['id']}, sequence {point['sequence']}")
        out["phase2"] = churn_phase("2 (churn since the point)", vms, events, rng, churn, region, cycle_bytes,
                                    lp.log_tail)
        out["undo_bytes"] = {vm.name: allocated_under(vm.storage / "points") for vm in vms}
        p2 = out["phase2"]
        out["apply_ratio"] = round(p2["on"]["mib_s"] / p2["off"]["mib_s"], 3)

        # test failover: start time
        api = AdminHttp(lp.admin_socket, timeout_s=60)
        fo_dir = on.storage / "test-failover"
        api_starts = []
        for _ in range(args.starts):
            t0 = time.perf_counter()
            api.request("POST", "/v1/replicas/on/test-failover", {"recovery_point": point["id"]})
            api_starts.append(round(time.perf_counter() - t0, 4))
            api.request("DELETE", "/v1/replicas/on/test-failover")
        space_before = allocated_under(fo_dir, on.storage / "points")
        cli_start_s, result = timed_hvrctl(lp, "failover", "start", "on", "--as-test", "--recovery-point",
                                           point["id"], "-o", "json")
        view = json.loads(result.stdout)
        space_started = allocated_under(fo_dir, on.storage / "points")
        uri = view["disks"][0]["uri"]
        t0 = time.perf_counter()
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0xAB 0 {test_write}", uri], 300, context=lp.log_tail)
        write_s = time.perf_counter() - t0
        space_written = allocated_under(fo_dir, on.storage / "points")
        out["start"] = {"api_s": api_starts, "api_median_s": statistics.median(api_starts),
                        "api_max_s": max(api_starts), "hvrctl_s": round(cli_start_s, 4), "uri": uri}
        out["space"] = {"before_start": space_before, "after_start": space_started,
                        "added_by_start": space_started - space_before,
                        "after_test_write": space_written, "added_by_test_write": space_written - space_started,
                        "test_write": test_write, "test_write_s": round(write_s, 3)}

        # read throughput
        qemu_nbd = QemuNbdReadOnly(on.image, work / "qemu-nbd.sock")
        os.sync()  # write back what apply and the test write left dirty; nothing is dropped from the cache
        warmup, samples = measure_reads({"view": uri, "qemu-nbd": qemu_nbd.uri, "file": str(on.image)},
                                        region, chunk, args)
        qemu_nbd.close()
        qemu_nbd = None

        # stop
        stop_s, result = timed_hvrctl(lp, "failover", "stop", "on", "--as-test", "-o", "json")
        out["stop"] = {"hvrctl_s": round(stop_s, 4), "result": json.loads(result.stdout),
                       "folder_gone": not fo_dir.exists(),
                       "space_after_stop": allocated_under(fo_dir, on.storage / "points")}
        if fo_dir.exists():
            raise RuntimeError(f"{fo_dir} is still there after failover stop")

        # for information: a view of the latest point (no undo log to consult), same reads
        latest = lp.hvrctl_json("failover", "start", "on", "--as-test")
        more_warmup, more = measure_reads({"view@latest": latest["disks"][0]["uri"]}, region, chunk, args)
        lp.hvrctl("failover", "stop", "on", "--as-test")
        warmup.update(more_warmup)
        samples.update(more)
        medians = {k: statistics.median(v) for k, v in samples.items()}
        out["read"] = {"warmup_mib_s": warmup, "samples_mib_s": samples, "median_mib_s": medians,
                       "image_allocated": allocated_bytes(on.image),
                       "view_over_qemu_nbd": round(medians["view"] / medians["qemu-nbd"], 3),
                       "view_over_file": round(medians["view"] / medians["file"], 3),
                       "view_over_view_at_latest": round(medians["view"] / medians["view@latest"], 3)}
        return out
    finally:
        if qemu_nbd is not None:
            qemu_nbd.close()
        lp.close()


def report(out: dict) -> None:
    cfg = out["config"]
    print(f"\ndisk {human(cfg['disk_size'])} sparse, region {human(cfg['region'])}, churn {human(cfg['churn'])} "
          f"per phase in cycles of {human(cfg['cycle_bytes'])} (random 64 KiB incompressible writes)\n")
    print("apply (sum of latency_s of cycle_applied events)")
    rows = []
    for phase in ("phase1", "phase2"):
        for vm in ("on", "off"):
            rec = out[phase][vm]
            rows.append([phase, vm, rec["cycles"], human(rec["bytes"]), f"{rec['apply_s']:.2f}",
                         f"{statistics.median(rec['latencies_s']):.3f}", f"{max(rec['latencies_s']):.3f}",
                         f"{rec['mib_s']:.1f}"])
    print_table(["phase", "vm", "cycles", "records", "apply s", "p50 s", "max s", "MiB/s"], rows)
    print(f"undo logs: on {human(out['undo_bytes']['on'])}, off {human(out['undo_bytes']['off'])}")

    st, sp, rd = out["start"], out["space"], out["read"]
    print(f"\ntest failover of point {out['point']['id']} (sequence {out['point']['sequence']}), "
          f"{human(cfg['churn'])} applied since")
    print_table(["measure", "value"], [
        ["start, admin API request (median of %d)" % len(st["api_s"]), f"{st['api_median_s']:.4f} s"],
        ["start, admin API request (max)", f"{st['api_max_s']:.4f} s"],
        ["start, hvrctl command wall time", f"{st['hvrctl_s']:.4f} s"],
        ["space added by the start", human(sp["added_by_start"])],
        [f"space added by the test VM writing {human(sp['test_write'])}", human(sp["added_by_test_write"])],
        ["stop, hvrctl command wall time", f"{out['stop']['hvrctl_s']:.4f} s"],
        ["test-failover folder gone after stop", str(out["stop"]["folder_gone"])],
    ])
    print(f"\nread {human(cfg['region'])} in {human(cfg['chunk'])} requests, {cfg['depth']} in flight over NBD "
          f"(warm page cache, after one warm-up read each; median of {cfg['rounds']} rounds); "
          f"{human(rd['image_allocated'])} of the region is allocated in the image, the rest are holes")
    print_table(["source", "median MiB/s", "samples"],
                [[k, f"{v:.0f}", " ".join(f"{s:.0f}" for s in rd["samples_mib_s"][k])]
                 for k, v in rd["median_mib_s"].items()])

    print("\nratios")
    start_ok = st["api_max_s"] <= TARGET_START_S
    print(f"  start (admin API, max)         {st['api_max_s']:.3f} s   target <= {TARGET_START_S} s: "
          f"{verdict(start_ok)}")
    print(f"  start (hvrctl wall)            {st['hvrctl_s']:.3f} s   (Python start-up included; information)")
    space_ok = sp["added_by_start"] <= 1 * MiB and sp["added_by_test_write"] <= sp["test_write"] * 1.1
    print(f"  space added by start           {human(sp['added_by_start'])}, by the test write "
          f"{human(sp['added_by_test_write'])} of {human(sp['test_write'])}: {verdict(space_ok)}")
    apply_ok = out["apply_ratio"] >= TARGET_APPLY_RATIO
    print(f"  apply on/off (phase 2)         {out['apply_ratio']:.3f}     target >= {TARGET_APPLY_RATIO}: "
          f"{verdict(apply_ok)}")
    read_ok = rd["view_over_qemu_nbd"] >= TARGET_READ_RATIO
    print(f"  read view/qemu-nbd             {rd['view_over_qemu_nbd']:.3f}     target >= {TARGET_READ_RATIO}: "
          f"{verdict(read_ok)}")
    print(f"  read view/file (os.preadv)     {rd['view_over_file']:.3f}     (information)")
    print(f"  read view/view@latest          {rd['view_over_view_at_latest']:.3f}     (information: the cost of "
          f"reading through the undo logs)")
    out["targets_met"] = {"start": start_ok, "space": space_ok, "apply_ratio": apply_ok, "read_ratio": read_ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-size", default="64G", help="sparse disk size of each replica VM (default 64G)")
    ap.add_argument("--churn", default="1G", help="bytes written per phase (default 1G)")
    ap.add_argument("--region", default="2G", help="writes and reads fall in the first this many bytes (default 2G)")
    ap.add_argument("--cycle-bytes", default="64M", help="bytes of writes per cycle (default 64M)")
    ap.add_argument("--test-write", default="64M", help="bytes the test VM writes through its export (default 64M)")
    ap.add_argument("--chunk", default="4M", help="read request size (default 4M)")
    ap.add_argument("--depth", type=int, default=4, help="NBD read requests in flight (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="read rounds per source (default 3)")
    ap.add_argument("--starts", type=int, default=3, help="timed test failover starts over the admin API (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the write offsets (default 1)")
    ap.add_argument("--workdir-parent", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json-out", help="also write the results as JSON to this file")
    args = ap.parse_args()
    with WorkDir("hvr-bench-failover-", args.workdir_parent, args.keep) as work:
        out = bench(args, work)
    report(out)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
        say(f"results written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
