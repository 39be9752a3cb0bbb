#!/usr/bin/env python3
"""Sustained churn: the highest write rate replication keeps up with, and the RPO at half of it.

One run:

1. a listener and an agent on 127.0.0.1 (a counting TCP proxy between them),
   one VM with one sparse disk (default 8 GiB), ``vm enable --frequency 30``
   and the initial copy;
2. for each rate of ``--rates`` (MiB/s, rising), fio's nbd engine writes
   random 64 KiB blocks of incompressible data (``--buffer_compress_percentage=0
   --refill_buffers``) through the agent at ``--rate=NM`` for
   ``--cycles-per-rate`` cycles, while a sampler reads every 0.5 s the
   agent's ``PendingReplicationSize`` and pending cycles (admin API,
   Measure-VMReplication) and the replica's applied sequence and
   ``last_applied_log_time_ns`` (listener admin API); the agent's VmRSS is
   sampled every 0.2 s;
3. a rate is *sustained* when fio reached at least 90 % of it, no cycle was
   missed, every cycle shipped in the phase was acknowledged less than one
   interval after its cut (``latency_s`` of the agent's ``cycle_shipped``
   events), the replica applied at least ``cycles - 2`` (and at least one)
   cycles in the phase and still kept pace at its end (at most one cycle it had acknowledged
   not yet applied: a cycle is applied after its acknowledgement, so one may be applying; a cycle
   cut seconds before the end is not counted, it cannot have arrived yet), and the backlog did not grow (the smallest
   ``PendingReplicationSize`` of the last cycle is at most 1.5 x that of the
   second one plus 64 MiB; the first cycle of a rate is its ramp).  The ladder stops at the first rate that is not
   sustained;
4. the backlog is drained, then fio runs at half the highest sustained rate
   for ``--rpo-cycles`` cycles while RPO = now - LastAppliedLogTime is
   sampled every 0.5 s: p50, p99 and max are reported;
5. a final sync-now, and ``qemu-img compare`` of the primary and replica
   disks (``--no-verify`` skips it).

Cycles: with ``--cycle-s 30`` (the default) the agent's own 30 s schedule
cuts the cycles.  Any other value enables the VM with ``--frequency 900`` and
cuts with sync-now (no wait) on a timer every ``--cycle-s`` seconds; the
output says which was used.

Each tracking mode of ``--modes`` (default ``bitmap,journal``) gets a whole
run of its own; a last table puts them side by side with the bytes written
to the work directory's disk per byte the guest wrote (``/proc/diskstats``,
sectors written during the run, by every process: image, logs, spools and
the listener's copies share the disk here).

``--auth certificate`` replicates over mutual TLS 1.3 (lab CA certificates)
instead of signed plain HTTP.  ``--compare-auth`` runs the whole ladder once
per authentication mode (each in its own process, same options, the first
tracking mode of ``--modes``) and reports the highest sustained churn and the
fio rate reached with TLS against plain HTTP (target at least 0.8x).

Usage: .venv/bin/python bench/churn.py [--modes bitmap,journal] [--disk-size 8G] [--rates 25,50,100,150,200] [--cycle-s 30]
                                       [--cycles-per-rate 3] [--rpo-cycles 3] [--iodepth 16]
                                       [--auth token|certificate] [--compare-auth]
                                       [--workdir-parent DIR] [--keep] [--no-verify] [--json-out FILE]
Smallest run: .venv/bin/python bench/churn.py --disk-size 256M --rates 5 --cycle-s 5 --cycles-per-rate 2
                                              --rpo-cycles 0 --modes journal --compare-auth
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    AUTH_MODES,
    GiB, MiB, AdminError, ReplicationPair, RssSampler, WorkDir, human, parse_size, percentile, print_table, PySpy, print_busiest_frames,
    qemu_img_compare, say, wait_for,
)

VM = "churn"
DISK = "churn"
SAMPLE_S = 0.5
SCHEDULED_FREQUENCY_S = 30
SYNC_NOW_FREQUENCY_S = 900  # with --cycle-s other than 30: the schedule stays out of the way
FIO_REACHED = 0.9
TROUGH_GROWTH = 1.5
TROUGH_SLACK_BYTES = 64 * MiB
DRAIN_TIMEOUT_S = 600
TARGET_RATE_MIB_S = 150
TARGET_RSS_BYTES = 200 * MiB
BIG_CYCLE_BYTES = 1 * GiB


@dataclass
class Sample:
    t: float  # time.time()
    pending_bytes: int | None
    pending_cycles: int | None
    next_sequence: int | None
    missed: int | None
    applied_sequence: int | None
    received_sequence: int | None
    applied_log_time_ns: int | None

    @property
    def rpo_s(self) -> float | None:
        if not self.applied_log_time_ns:
            return None
        return self.t - self.applied_log_time_ns / 1e9


class StateSampler:
    """Every ``SAMPLE_S``: the agent's backlog and the replica's applied state."""

    def __init__(self, pair: ReplicationPair):
        self.pair = pair
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="state-sampler", daemon=True)

    def start(self) -> StateSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def between(self, t0: float, t1: float) -> list[Sample]:
        return [s for s in self.samples if t0 <= s.t <= t1]

    def _loop(self) -> None:
        while not self._stop.is_set():
            tick = time.monotonic()
            try:
                self.samples.append(self.take())
            except (AdminError, OSError, KeyError, ValueError):
                self.errors += 1
            self._stop.wait(max(0.0, SAMPLE_S - (time.monotonic() - tick)))

    def take(self) -> Sample:
        m = self.pair.measure(VM)
        st = self.pair.status(VM)
        rep = self.pair.replica(VM)
        return Sample(time.time(), m.get("PendingReplicationSize"), st.get("pending_cycles"),
                      st.get("next_sequence"), m.get("MissedReplicationCount"), rep.get("last_applied_sequence"),
                      rep.get("last_received_sequence"), rep.get("last_applied_log_time_ns"))


class SyncTimer:
    """sync-now (no wait) every ``cycle_s`` seconds, when the agent's schedule is not used."""

    def __init__(self, pair: ReplicationPair, cycle_s: float):
        self.pair = pair
        self.cycle_s = cycle_s
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sync-timer", daemon=True)

    def start(self) -> SyncTimer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        next_t = time.monotonic() + self.cycle_s
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            try:
                self.pair.sync_now(VM, wait=False)
                self.requests += 1
            except (AdminError, OSError):
                pass
            next_t += self.cycle_s


@dataclass
class Phase:
    rate_mib_s: float
    seconds: float
    t0: float = 0.0
    t1: float = 0.0
    fio_mib_s: float = 0.0
    fio_error: str | None = None
    cycles_applied: int = 0
    missed: int = 0
    troughs: list[int] = field(default_factory=list)
    behind_at_end: int | None = None  # cycles cut (closed) but not yet applied at the end
    unapplied_at_end: int | None = None  # of those, cycles the replica acknowledged but not yet applied
    peak_rss: int | None = None
    max_cycle_bytes: int = 0
    max_cycle_raw_bytes: int = 0
    cycles_shipped: int = 0
    max_latency_s: float | None = None  # cut to acknowledgement, largest of the cycles shipped in the phase
    rpo: list[float] = field(default_factory=list)
    sustained: bool = False
    why_not: list[str] = field(default_factory=list)


def fio_command(uri: str, rate_mib_s: float, runtime_s: float, iodepth: int) -> list[str]:
    return ["fio", "--name=churn", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k",
            f"--iodepth={iodepth}", f"--rate={int(round(rate_mib_s))}m", "--time_based",
            f"--runtime={int(round(runtime_s))}", "--buffer_compress_percentage=0", "--refill_buffers",
            "--norandommap", "--randrepeat=0", "--output-format=json"]


def run_fio(cmd: list[str], runtime_s: float) -> tuple[float, str | None]:
    """Run fio to the end; (achieved write MiB/s, error or None)."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime_s + 300)
    text = result.stdout
    start = text.find("{")
    try:
        doc = json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        doc = None
    if doc is None:
        return 0.0, f"fio exited {result.returncode}: {result.stderr[-1000:]}"
    job = doc["jobs"][0]
    bw_bytes = job["write"].get("bw_bytes") or job["write"]["bw"] * 1024
    error = f"fio error {job['error']}: {result.stderr[-500:]}" if job.get("error") else None
    return bw_bytes / MiB, error


def cycle_troughs(samples: list[Sample], t0: float, t1: float, cycle_s: float) -> list[int]:
    troughs = []
    start = t0
    while start + cycle_s <= t1 + 0.5:
        values = [s.pending_bytes for s in samples if start <= s.t < start + cycle_s and s.pending_bytes is not None]
        if values:
            troughs.append(min(values))
        start += cycle_s
    return troughs


def shipped_in(pair: ReplicationPair, t0: float, t1: float) -> list[dict]:
    out = []
    for ev in pair.agent_events("cycle_shipped"):
        ts = ev.get("ts")
        try:
            t = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + ts[19:23])
        except (TypeError, ValueError):
            continue
        if t0 <= t <= t1 + 1:
            out.append(ev)
    return out


def run_phase(pair: ReplicationPair, states: StateSampler, rss: RssSampler, phase: Phase, cycle_s: float,
              iodepth: int, judge: bool) -> None:
    uri = pair.agent.nbd_uri(VM, DISK)
    label = f"{phase.rate_mib_s:g}"
    rss.mark(label)
    before = states.take()
    phase.t0 = time.time()
    phase.fio_mib_s, phase.fio_error = run_fio(fio_command(uri, phase.rate_mib_s, phase.seconds, iodepth),
                                               phase.seconds)
    phase.t1 = time.time()
    rss.mark(None)
    after = states.take()
    window = states.between(phase.t0, phase.t1)
    phase.rpo = [s.rpo_s for s in window if s.rpo_s is not None]
    phase.cycles_applied = (after.applied_sequence or 0) - (before.applied_sequence or 0)
    phase.missed = (after.missed or 0) - (before.missed or 0)
    phase.troughs = cycle_troughs(window, phase.t0, phase.t1, cycle_s)
    if after.next_sequence is not None and after.applied_sequence is not None:
        # cycles cut (next_sequence + pending_cycles - 1 is the newest closed one) minus applied
        newest_cut = after.next_sequence + (after.pending_cycles or 0) - 1
        phase.behind_at_end = newest_cut - after.applied_sequence
        phase.unapplied_at_end = (after.next_sequence - 1) - after.applied_sequence
    phase.peak_rss = rss.peak(label)
    shipped = shipped_in(pair, phase.t0, phase.t1)
    phase.cycles_shipped = len(shipped)
    phase.max_cycle_bytes = max((int(ev.get("bytes") or 0) for ev in shipped), default=0)
    phase.max_cycle_raw_bytes = max((int(ev.get("raw_bytes") or 0) for ev in shipped), default=0)
    phase.max_latency_s = max((float(ev.get("latency_s") or 0) for ev in shipped), default=None)
    if not judge:
        return
    cycles = max(1, round(phase.seconds / cycle_s))
    if phase.fio_error:
        phase.why_not.append(phase.fio_error)
    if phase.fio_mib_s < FIO_REACHED * phase.rate_mib_s:
        phase.why_not.append(f"fio reached only {phase.fio_mib_s:.1f} MiB/s through the agent")
    if phase.missed > 0:
        phase.why_not.append(f"{phase.missed} missed cycle(s)")
    if phase.cycles_applied < cycles - 2 or phase.cycles_applied < 1:
        phase.why_not.append(f"replica applied {phase.cycles_applied} cycle(s) in {cycles} intervals")
    if phase.max_latency_s is not None and phase.max_latency_s >= cycle_s:
        phase.why_not.append(f"a cycle took {phase.max_latency_s:.1f} s from cut to acknowledgement, "
                             f"longer than the {cycle_s:g} s interval")
    if phase.unapplied_at_end is not None and phase.unapplied_at_end > 1:
        phase.why_not.append(f"replica {phase.unapplied_at_end} acknowledged cycles behind in applying at the end")
    steady = phase.troughs[1:] if len(phase.troughs) >= 3 else phase.troughs  # the first cycle is the ramp
    if len(steady) >= 2 and steady[-1] > TROUGH_GROWTH * steady[0] + TROUGH_SLACK_BYTES:
        phase.why_not.append(f"backlog grew: {human(steady[0])} -> {human(steady[-1])}")
    phase.sustained = not phase.why_not


def drain(pair: ReplicationPair, timeout_s: float) -> float:
    """sync-now and wait until the replica has applied everything cut; seconds it took."""
    started = time.monotonic()
    pair.sync_now(VM, wait=True)

    def caught_up() -> bool:
        st = pair.status(VM)
        rep = pair.replica(VM)
        return st["pending_cycles"] == 0 and rep["last_applied_sequence"] >= (st["next_sequence"] or 1) - 1

    wait_for(caught_up, timeout_s, "the replica to catch up", interval_s=0.5, context=pair.log_tails)
    return time.monotonic() - started


class DiskWrites:
    """Bytes written to the block device under a directory, from /proc/diskstats (sectors written x 512)."""

    @staticmethod
    def device_of(path: Path) -> str | None:
        dev = path.stat().st_dev
        sys_path = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        try:
            return sys_path.resolve().name
        except OSError:
            return None

    @staticmethod
    def bytes_written(device: str | None) -> int | None:
        if device is None:
            return None
        for line in Path("/proc/diskstats").read_text().splitlines():
            parts = line.split()
            if len(parts) > 9 and parts[2] == device:
                return int(parts[9]) * 512
        return None  # not a block device (tmpfs, overlay): not measured


TARGET_TLS_RATIO = 0.8  # certificate mode (TLS 1.3) / token mode over plain HTTP


def compare_auth(argv: list[str], json_out: str | None) -> int:
    """The same ladder once per authentication mode, each in its own process; TLS against plain HTTP."""
    base = [a for a in argv if a != "--compare-auth"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="hvr-churn-auth-") as tmp:
        for auth in AUTH_MODES:
            out = Path(tmp) / f"{auth}.json"
            say(f"=== ladder with --auth {auth}")
            done = subprocess.run([sys.executable, __file__, *_without_option(base, "--json-out"), "--auth", auth,
                                   "--json-out", str(out)])
            if not out.exists():
                raise RuntimeError(f"the --auth {auth} run failed (exit {done.returncode})")
            results[auth] = json.loads(out.read_text())[0]  # the first tracking mode's run
    plain, tls = results["token"], results["certificate"]

    def top_fio(r: dict) -> float:
        return max((p["fio_mib_s"] for p in r["phases"] if p["sustained"]), default=0.0)

    best_ratio = (tls["best_rate_mib_s"] or 0) / plain["best_rate_mib_s"] if plain["best_rate_mib_s"] else None
    fio_ratio = top_fio(tls) / top_fio(plain) if top_fio(plain) else None
    print()
    print_table(["figure", "token (plain HTTP)", "certificate (TLS 1.3)", "TLS / plain", "target", "met"], [
        ["highest sustained churn MiB/s", plain["best_rate_mib_s"], tls["best_rate_mib_s"],
         "-" if best_ratio is None else f"{best_ratio:.2f}", f">= {TARGET_TLS_RATIO}",
         "-" if best_ratio is None else ("yes" if best_ratio >= TARGET_TLS_RATIO else "NO")],
        ["fio MiB/s at that rate", f"{top_fio(plain):.1f}", f"{top_fio(tls):.1f}",
         "-" if fio_ratio is None else f"{fio_ratio:.2f}", "-", "-"],
        ["replica identical", plain["identical"], tls["identical"], "-", "yes", "-"],
    ])
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(r["identical"] in (True, None) for r in results.values()) else 1


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-size", default="8G", help="sparse disk size (default 8G)")
    ap.add_argument("--rates", default="25,50,100,150,200", help="MiB/s, rising (default 25,50,100,150,200)")
    ap.add_argument("--cycle-s", type=float, default=30.0,
                    help="cycle length; 30 uses the agent's --frequency 30 schedule, anything else sync-now "
                         "on a timer (default 30)")
    ap.add_argument("--cycles-per-rate", type=int, default=3, help="cycles each rate runs for (default 3)")
    ap.add_argument("--rpo-cycles", type=int, default=3, help="cycles of the RPO run at half rate (default 3)")
    ap.add_argument("--iodepth", type=int, default=16, help="fio iodepth (default 16)")
    ap.add_argument("--keep-going", action="store_true", help="run every rate even after one is not sustained")
    ap.add_argument("--workdir-parent", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the final qemu-img compare")
    ap.add_argument("--py-spy", metavar="DIR", help="record the agent and the listener with py-spy during the "
                    "rate ladder (raw stacks in DIR) and print their busiest frames")
    ap.add_argument("--json-out", help="also write the results as JSON to this file")
    ap.add_argument("--modes", default="bitmap,journal",
                    help="tracking modes to run, one whole run each, in this order (default bitmap,journal)")
    ap.add_argument("--auth", choices=AUTH_MODES, default="token",
                    help="how the agent authenticates: token (plain HTTP, default) or certificate (mutual TLS 1.3)")
    ap.add_argument("--compare-auth", action="store_true",
                    help="run the ladder in both authentication modes and report TLS against plain HTTP")
    args = ap.parse_args(argv)
    if args.compare_auth:
        return compare_auth(list(sys.argv[1:] if argv is None else argv), args.json_out)
    disk_size = parse_size(args.disk_size)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    scheduled = args.cycle_s == SCHEDULED_FREQUENCY_S
    mode = (f"the agent's --frequency {SCHEDULED_FREQUENCY_S} schedule" if scheduled else
            f"sync-now every {args.cycle_s:g} s (VM enabled with --frequency {SYNC_NOW_FREQUENCY_S})")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("bitmap", "journal") for m in modes):
        ap.error("--modes takes bitmap and/or journal")
    results = []
    for tracking in modes:
        say(f"=== tracking mode {tracking} ===")
        results.append(run_mode(args, tracking, disk_size, rates, scheduled, mode))
    print()
    print_table(["tracking", "highest sustained MiB/s", "RPO p99 s", "agent peak RSS", "guest bytes written",
                 "disk bytes written", "disk bytes per guest byte"],
                [[r["tracking"], f"{r['best_rate_mib_s']:g}" if r["best_rate_mib_s"] else "none",
                  f"{r['rpo_p99_s']:.1f}" if r["rpo_p99_s"] is not None else "-", human(r["peak_rss_bytes"]),
                  human(r["guest_bytes"]), human(r["disk_bytes"]) if r["disk_bytes"] is not None else "n/a",
                  f"{r['disk_bytes'] / r['guest_bytes']:.2f}" if r["disk_bytes"] and r["guest_bytes"] else "n/a"]
                 for r in results])
    if results and results[0]["disk_device"]:
        print(f"(disk bytes: sectors written to {results[0]['disk_device']} in /proc/diskstats during each run's "
              "rate ladder, RPO run and drain, by every process on the machine: the agent's image, logs and "
              "spools and the listener's copies share the disk here)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(r["identical"] is not False for r in results) else 1


def run_mode(args, tracking: str, disk_size: int, rates: list[float], scheduled: bool, mode: str) -> dict:
    """One whole run (ladder, drain, RPO run, verify) with the VM tracking in ``tracking`` mode."""
    phases: list[Phase] = []
    rpo_phase: Phase | None = None
    verify = None
    device = DiskWrites.device_of(Path(args.workdir_parent))
    disk_bytes = None
    with WorkDir("hvr-bench-churn-", args.workdir_parent, args.keep) as work, ReplicationPair(work / "hvr", auth=args.auth) as pair:
        disk = work / "primary" / f"{DISK}.img"
        disk.parent.mkdir()
        with open(disk, "wb") as f:
            f.truncate(disk_size)
        pair.protect(VM, [disk], frequency_s=SCHEDULED_FREQUENCY_S if scheduled else SYNC_NOW_FREQUENCY_S,
                     tracking=tracking)
        pair.agent.hvrctl("initial", "start", VM, "--wait", timeout_s=600)
        say(f"protected {VM}: {human(disk_size)} sparse disk, cycles by {mode}; agent pid {pair.agent_pid}")
        rss = RssSampler(pair.agent_pid).start()
        states = StateSampler(pair).start()
        timer = None if scheduled else SyncTimer(pair, args.cycle_s).start()
        spies = []
        if args.py_spy:
            Path(args.py_spy).mkdir(parents=True, exist_ok=True)
            spies = [PySpy(pair.agent_pid, Path(args.py_spy) / "agent.raw"),
                     PySpy(pair.listener_pid, Path(args.py_spy) / "listener.raw")]
        written_before = DiskWrites.bytes_written(device)
        try:
            best = None
            for rate in rates:
                phase = Phase(rate, args.cycles_per_rate * args.cycle_s)
                say(f"rate {rate:g} MiB/s for {phase.seconds:g} s")
                run_phase(pair, states, rss, phase, args.cycle_s, args.iodepth, judge=True)
                phases.append(phase)
                say(f"  fio {phase.fio_mib_s:.1f} MiB/s, applied {phase.cycles_applied}, missed {phase.missed}, "
                    f"troughs {[human(t) for t in phase.troughs]}, peak RSS {human(phase.peak_rss)}: "
                    + ("sustained" if phase.sustained else "NOT sustained: " + "; ".join(phase.why_not)))
                if phase.sustained:
                    best = rate
                elif not args.keep_going:
                    break
            for spy in spies:
                spy.stop()
            say("draining the backlog")
            drained_s = drain(pair, DRAIN_TIMEOUT_S)
            say(f"  caught up in {drained_s:.1f} s")
            half = (best or rates[0]) / 2
            if args.rpo_cycles > 0:
                rpo_phase = Phase(half, args.rpo_cycles * args.cycle_s)
                say(f"RPO run: {half:g} MiB/s for {rpo_phase.seconds:g} s")
                run_phase(pair, states, rss, rpo_phase, args.cycle_s, args.iodepth, judge=False)
            drain(pair, DRAIN_TIMEOUT_S)
            written_after = DiskWrites.bytes_written(device)
            if written_before is not None and written_after is not None:
                disk_bytes = written_after - written_before
        finally:
            for spy in spies:
                spy.stop()
            if timer is not None:
                timer.stop()
            states.stop()
            rss.stop()
        if args.verify:
            say("final sync-now and qemu-img compare")
            drain(pair, DRAIN_TIMEOUT_S)
            verify = qemu_img_compare(disk, pair.replica_image(VM, DISK))
            say(f"  identical={verify[0]} {verify[1]}")
        wire_up, _ = pair.proxy.counts()
        all_rss_peak = rss.peak()

    print()
    print(f"churn ({tracking} tracking): {human(disk_size)} disk, random 64 KiB incompressible writes by fio (nbd engine, iodepth "
          f"{args.iodepth}), cycles by {mode}, {args.cycles_per_rate} cycles per rate, --auth {args.auth}")
    rows = []
    for p in phases + ([rpo_phase] if rpo_phase else []):
        rows.append([f"{p.rate_mib_s:g}" + (" (RPO run)" if p is rpo_phase else ""), f"{p.fio_mib_s:.1f}",
                     p.cycles_shipped, p.cycles_applied, p.missed, " ".join(human(t) for t in p.troughs) or "-",
                     f"{p.behind_at_end}/{p.unapplied_at_end}", human(p.max_cycle_bytes),
                     "-" if p.max_latency_s is None else f"{p.max_latency_s:.1f}", human(p.peak_rss),
                     "-" if p is rpo_phase else ("yes" if p.sustained else "no")])
    print_table(["rate MiB/s", "fio MiB/s", "shipped", "applied", "missed", "backlog troughs per cycle",
                 "behind cut/acked", "largest cycle", "max latency s", "agent peak RSS", "sustained"], rows)
    for p in phases:
        if p.why_not:
            print(f"  {p.rate_mib_s:g} MiB/s not sustained: " + "; ".join(p.why_not))
    best = max((p.rate_mib_s for p in phases if p.sustained), default=None)
    big = [p for p in phases + ([rpo_phase] if rpo_phase else []) if p.max_cycle_bytes >= BIG_CYCLE_BYTES]
    big_peak = max((p.peak_rss for p in big if p.peak_rss), default=None)
    rpo = rpo_phase.rpo if rpo_phase else []
    print()
    verdicts = [
        ("highest sustained churn", f"{best:g} MiB/s" if best else "none", f">= {TARGET_RATE_MIB_S} MiB/s",
         best is not None and best >= TARGET_RATE_MIB_S),
        (f"RPO p50 at {rpo_phase.rate_mib_s:g} MiB/s" if rpo_phase else "RPO p50",
         f"{percentile(rpo, 50):.1f} s" if rpo else "-", "-", None),
        (f"RPO p99 at {rpo_phase.rate_mib_s:g} MiB/s" if rpo_phase else "RPO p99",
         f"{percentile(rpo, 99):.1f} s" if rpo else "-", "-", None),
        ("RPO max", f"{max(rpo):.1f} s" if rpo else "-", "-", None),
        ("agent peak RSS with a >= 1 GiB cycle in flight", human(big_peak) if big else "no such cycle",
         f"< {human(TARGET_RSS_BYTES)}", (big_peak < TARGET_RSS_BYTES) if big_peak is not None else None),
        ("agent peak RSS, whole run", human(all_rss_peak), f"< {human(TARGET_RSS_BYTES)}",
         all_rss_peak is not None and all_rss_peak < TARGET_RSS_BYTES),
    ]
    if verify is not None:
        verdicts.append(("replica identical after final sync (qemu-img compare)", "yes" if verify[0] else "NO",
                         "yes", verify[0]))
    print_table(["figure", "value", "target", "met"],
                [[a, b, c, "-" if d is None else ("yes" if d else "NO")] for a, b, c, d in verdicts])
    print(f"(RPO = now - LastAppliedLogTime sampled every {SAMPLE_S} s: {len(rpo)} samples; "
          f"bytes hvr put on the wire: {wire_up:,}; sampler errors: {states.errors})")
    if args.py_spy:
        print_busiest_frames(args.py_spy, "the rate ladder")
    guest_bytes = int(sum(p.fio_mib_s * p.seconds * MiB for p in phases + ([rpo_phase] if rpo_phase else [])))
    return {"tracking": tracking, "auth": args.auth, "disk_size_bytes": disk_size, "cycle_s": args.cycle_s, "mode": mode,
            "phases": [p.__dict__ for p in phases], "rpo_phase": rpo_phase.__dict__ if rpo_phase else None,
            "best_rate_mib_s": best, "wire_up_bytes": wire_up, "peak_rss_bytes": all_rss_peak,
            "rpo_p99_s": percentile(rpo, 99) if rpo else None, "guest_bytes": guest_bytes,
            "disk_bytes": disk_bytes, "disk_device": device, "identical": verify[0] if verify else None}


if __name__ == "__main__":
    sys.exit(main())
