#!/usr/bin/env python3
"""Initial replication of a sparse image by hvr against ``rsync --sparse`` of the same file.

One run:

1. builds a raw image (default 4 GiB) holding 25 % random (incompressible)
   data in scattered extents, the rest holes, with ``os.pwrite`` on a sparse
   file (no agent involved);
2. hvr: a listener and an agent on 127.0.0.1, a counting TCP proxy between
   them; ``vm add``, ``vm enable --frequency 30``, then the initial copy
   (``POST .../replication/initial``, what ``hvrctl initial start`` sends);
   times it from the request until the VM is ``Replicating``, counts the bytes
   through the proxy, samples the agent's VmRSS every 0.2 s, and checks the
   replica with ``qemu-img compare``;
3. rsync: an rsync daemon on 127.0.0.1 behind the same kind of proxy, and
   ``rsync --sparse IMAGE rsync://127.0.0.1:PORT/bench/`` to a new file;
   timed, counted and compared the same way;
4. prints a table and the two target ratios.

``--auth certificate`` runs hvr over mutual TLS 1.3 (lab CA certificates)
instead of signed plain HTTP; ``--compare-auth`` runs the hvr copy in both
modes in the same run and reports the TLS throughput against plain HTTP
(target at least 0.8x).

Usage: .venv/bin/python bench/initial_vs_rsync.py [--size 4G] [--data-percent 25] [--seed 1]
                                                  [--auth token|certificate] [--compare-auth]
                                                  [--workdir-parent DIR] [--keep] [--json-out FILE]
Smallest run: .venv/bin/python bench/initial_vs_rsync.py --size 64M --skip-rsync --compare-auth
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    AUTH_MODES, KiB, MiB, CountingProxy, ReplicationPair, RssSampler, WorkDir, allocated_bytes, drop_dirty_pages, human,
    parse_size, print_table, PySpy, print_busiest_frames, qemu_img_compare, say, wait_for,
)

VM = "bench"
EXTENT_ALIGN_BYTES = 64 * KiB
MIN_EXTENT_BYTES = 64 * KiB
MAX_EXTENT_BYTES = 4 * MiB
WRITE_CHUNK_BYTES = 4 * MiB
POLL_S = 0.1
RSYNC_MODULE = "bench"

TARGET_SPEEDUP = 1.5
TARGET_WIRE_RATIO = 1.05
TARGET_RSS_BYTES = 200 * MiB
TARGET_TLS_RATIO = 0.8  # certificate mode (TLS 1.3) throughput / token mode over plain HTTP


# --- the image ---------------------------------------------------------------------------------
def layout(size_bytes: int, data_fraction: float, rng: random.Random) -> list[tuple[int, int]]:
    """Non-overlapping (offset, length) data extents, 64 KiB aligned, totalling ``data_fraction`` of the size.

    Extent lengths are uniform in [64 KiB, 4 MiB]; the holes between them are
    random cuts of the remaining space, so data is scattered over the whole image.
    """
    units = size_bytes // EXTENT_ALIGN_BYTES
    want = int(units * data_fraction)
    lengths = []
    while sum(lengths) < want:
        lengths.append(rng.randint(MIN_EXTENT_BYTES // EXTENT_ALIGN_BYTES, MAX_EXTENT_BYTES // EXTENT_ALIGN_BYTES))
    lengths[-1] -= sum(lengths) - want
    if lengths[-1] <= 0:
        lengths.pop()
    hole_units = units - sum(lengths)
    cuts = sorted(rng.randint(0, hole_units) for _ in range(len(lengths)))
    gaps = [b - a for a, b in zip([0, *cuts], cuts)]
    extents = []
    pos = 0
    for gap, length in zip(gaps, lengths):
        pos += gap
        extents.append((pos * EXTENT_ALIGN_BYTES, length * EXTENT_ALIGN_BYTES))
        pos += length
    return extents


def build_image(path: Path, size_bytes: int, data_fraction: float, seed: int) -> int:
    extents = layout(size_bytes, data_fraction, random.Random(seed))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size_bytes)
        for offset, length in extents:
            for done in range(0, length, WRITE_CHUNK_BYTES):
                n = min(WRITE_CHUNK_BYTES, length - done)
                os.pwrite(fd, os.urandom(n), offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(extents)


# --- hvr ---------------------------------------------------------------------------------------
def run_hvr(work: Path, image: Path, profile_dir: Path | None = None, auth: str = "token") -> dict:
    pair = ReplicationPair(work / f"hvr-{auth}", auth=auth)
    try:
        pair.start()
        pair.protect(VM, [image], frequency_s=30)
        say(f"hvr: agent pid {pair.agent_pid}, listener pid {pair.listener_pid}, proxy :{pair.proxy.port}")
        pair.proxy.reset()
        sampler = RssSampler(pair.agent_pid).start()
        spies = []
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            spies = [PySpy(pair.agent_pid, profile_dir / "agent.raw"),
                     PySpy(pair.listener_pid, profile_dir / "listener.raw")]
            time.sleep(1)  # py-spy attaches
        rss_before = sampler.peak()
        started = time.monotonic()
        pair.agent_api.request("POST", f"/v1/vms/{VM}/replication/initial", {})
        last_print = started

        def replicating():
            nonlocal last_print
            st = pair.status(VM)
            if st["state"] == "Error":
                raise RuntimeError(f"initial replication failed: {st.get('state_detail')}\n{pair.log_tails()}")
            now = time.monotonic()
            if now - last_print >= 5:
                ini = st.get("initial") or {}
                say(f"hvr: {st['state']} {ini.get('percent')}% rate {human(ini.get('rate_bytes_per_s'))}/s")
                last_print = now
            return st["state"] == "Replicating"

        wait_for(replicating, 3600, "the initial copy to finish", interval_s=POLL_S, context=pair.log_tails)
        elapsed_s = time.monotonic() - started
        up, down = pair.proxy.counts()
        sampler.stop()
        for spy in spies:
            spy.stop()
        windows = pair.agent_events("initial_window_sent")
        agent_reported = sum(int(ev.get("bytes") or 0) for ev in windows)
        replica = pair.replica_image(VM, image.stem)
        wait_for(lambda: pair.replica(VM)["state"] == "Replicating", 60, "the replica to be Replicating")
        same, compare_text = qemu_img_compare(image, replica)
        return {"time_s": elapsed_s, "up_bytes": up, "down_bytes": down, "agent_reported_bytes": agent_reported,
                "windows": len(windows), "peak_rss_bytes": sampler.peak(), "rss_at_start_bytes": rss_before,
                "rss_samples": len(sampler.samples), "identical": same, "compare": compare_text,
                "replica_allocated_bytes": allocated_bytes(replica)}
    finally:
        pair.close()


# --- rsync -------------------------------------------------------------------------------------
def ensure_rsync() -> str:
    path = shutil.which("rsync")
    if path:
        return path
    say("rsync is missing: installing it with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*prefix, "apt-get", "install", "-y", "-q", "rsync"], check=False, env=env,
                   stdout=subprocess.DEVNULL)
    if not shutil.which("rsync"):
        subprocess.run([*prefix, "apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([*prefix, "apt-get", "install", "-y", "-q", "rsync"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    path = shutil.which("rsync")
    if not path:
        raise RuntimeError("rsync could not be installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rsync(work: Path, image: Path, rsync: str, extra_args: Sequence[str] = ("--sparse",),
              fresh_dest: bool = True) -> dict:
    """``rsync EXTRA_ARGS IMAGE`` into the module folder ``work/rsync/dest`` (made here, unless ``fresh_dest``
    is false and the caller put a file to update there)."""
    base = work / "rsync"
    dest = base / "dest"
    dest.mkdir(parents=True, exist_ok=not fresh_dest)
    conf = base / "rsyncd.conf"
    conf.write_text(
        "use chroot = no\n"
        f"pid file = {base / 'rsyncd.pid'}\n"
        f"lock file = {base / 'rsyncd.lock'}\n"
        f"log file = {base / 'rsyncd.log'}\n"
        f"[{RSYNC_MODULE}]\n"
        f"    path = {dest}\n"
        "    read only = no\n"
        f"    uid = {os.getuid()}\n"
        f"    gid = {os.getgid()}\n")
    port = free_port()
    daemon = subprocess.Popen([rsync, "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                               "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = None
    try:
        def listening() -> bool:
            if daemon.poll() is not None:
                raise RuntimeError(f"rsync daemon exited with {daemon.returncode}: "
                                   f"{(base / 'rsyncd.log').read_text(errors='replace')[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 20, "the rsync daemon to listen")
        proxy = CountingProxy(port)
        target = f"rsync://127.0.0.1:{proxy.port}/{RSYNC_MODULE}/{image.name}"
        cmd = [rsync, *extra_args, "--stats", str(image), target]
        say("rsync: " + " ".join(cmd))
        started = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        elapsed_s = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"rsync exited {result.returncode}: {result.stderr[-2000:]}")
        time.sleep(0.2)  # the proxy's threads count the last pieces as the connection closes
        up, down = proxy.counts()
        copy = dest / image.name
        same, compare_text = qemu_img_compare(image, copy)
        return {"time_s": elapsed_s, "up_bytes": up, "down_bytes": down, "identical": same,
                "compare": compare_text, "dest_allocated_bytes": allocated_bytes(copy),
                "command": " ".join(cmd), "stats": _rsync_stats(result.stdout)}
    finally:
        if proxy is not None:
            proxy.close()
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _rsync_stats(text: str) -> dict:
    stats = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("Total bytes sent", "Total bytes received", "Literal data"):
            digits = "".join(ch for ch in value.split("bytes")[0] if ch.isdigit())
            if digits:
                stats[key.strip()] = int(digits)
    return stats


# --- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="image size (default 4G)")
    ap.add_argument("--data-percent", type=float, default=25.0, help="random data share of the image (25)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the extent layout")
    ap.add_argument("--workdir-parent", default="/var/tmp", help="where the work directory is made")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--skip-rsync", action="store_true", help="run hvr only")
    ap.add_argument("--auth", choices=AUTH_MODES, default="token",
                    help="how hvr authenticates: token (plain HTTP, default) or certificate (mutual TLS 1.3)")
    ap.add_argument("--compare-auth", action="store_true",
                    help="also run the hvr copy in the other mode and report TLS against plain HTTP throughput")
    ap.add_argument("--py-spy", metavar="DIR", help="record the agent and the listener with py-spy during the "
                    "initial copy (raw stacks in DIR) and print their busiest frames")
    ap.add_argument("--json-out", help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    rsync = None if args.skip_rsync else ensure_rsync()
    with WorkDir("hvr-bench-initial-", args.workdir_parent, args.keep) as work:
        image = work / "primary" / "disk.img"
        image.parent.mkdir()
        say(f"building {human(size)} image with {args.data_percent:g}% random data: {image}")
        t0 = time.monotonic()
        extents = build_image(image, size, args.data_percent / 100, args.seed)
        allocated = allocated_bytes(image)
        say(f"image built in {time.monotonic() - t0:.1f} s: {extents} extents, {human(allocated)} allocated")
        drop_dirty_pages()

        say(f"hvr: initial replication ({args.auth})")
        hvr = run_hvr(work, image, Path(args.py_spy) if args.py_spy else None, args.auth)
        say(f"hvr: done in {hvr['time_s']:.2f} s, identical={hvr['identical']}")
        shutil.rmtree(work / f"hvr-{args.auth}" / "listener" / "replicas", ignore_errors=True)
        drop_dirty_pages()
        other = None
        if args.compare_auth:
            other_auth = next(m for m in AUTH_MODES if m != args.auth)
            say(f"hvr: initial replication ({other_auth})")
            other = run_hvr(work, image, None, other_auth)
            say(f"hvr: done in {other['time_s']:.2f} s, identical={other['identical']}")
            shutil.rmtree(work / f"hvr-{other_auth}" / "listener" / "replicas", ignore_errors=True)
            drop_dirty_pages()
        by_auth = {args.auth: hvr, **({other_auth: other} if other is not None else {})}
        rs = None
        if rsync:
            say("rsync --sparse over an rsync daemon")
            rs = run_rsync(work, image, rsync)
            say(f"rsync: done in {rs['time_s']:.2f} s, identical={rs['identical']}")

    rows = []
    runs = [(f"hvr initial ({a})", r) for a, r in by_auth.items()] + [("rsync --sparse", rs)]
    for name, r in runs:
        if r is None:
            continue
        rows.append([name, f"{r['time_s']:.2f}", f"{allocated / MiB / r['time_s']:.1f}",
                     f"{size / MiB / r['time_s']:.1f}", f"{r['up_bytes']:,}", f"{r['down_bytes']:,}",
                     f"{r['up_bytes'] / allocated:.4f}", "yes" if r["identical"] else "NO"])
    print()
    print(f"image: {human(size)}, allocated {allocated:,} bytes ({human(allocated)}, "
          f"{100 * allocated / size:.1f}%), {extents} extents; loopback through a counting proxy")
    print_table(["method", "time s", "data MiB/s", "image MiB/s", "bytes on wire (up)", "bytes back (down)",
                 "up/allocated", "qemu-img compare"], rows)
    print()
    print(f"hvr agent reported {hvr['agent_reported_bytes']:,} bytes in {hvr['windows']} windows "
          f"(proxy saw {hvr['up_bytes']:,} up incl. HTTP headers)")
    if rs is not None and rs.get("stats"):
        print(f"rsync --stats: {rs['stats']}")
    verdicts = []
    wire_ratio = hvr["up_bytes"] / allocated
    verdicts.append(("hvr wire bytes / allocated data", f"{wire_ratio:.4f}", f"<= {TARGET_WIRE_RATIO}",
                     wire_ratio <= TARGET_WIRE_RATIO))
    if rs is not None:
        speedup = rs["time_s"] / hvr["time_s"]
        verdicts.append(("rsync time / hvr time", f"{speedup:.2f}", f">= {TARGET_SPEEDUP}", speedup >= TARGET_SPEEDUP))
    peak = hvr["peak_rss_bytes"]
    verdicts.append(("agent peak RSS during initial copy", human(peak), f"< {human(TARGET_RSS_BYTES)}",
                     peak is not None and peak < TARGET_RSS_BYTES))
    verdicts.append(("replica identical (qemu-img compare)", "yes" if hvr["identical"] else "NO", "yes",
                     hvr["identical"]))
    if len(by_auth) == 2:
        tls_ratio = by_auth["token"]["time_s"] / by_auth["certificate"]["time_s"]  # same bytes: time ratio
        verdicts.append(("throughput certificate (TLS 1.3) / token (plain HTTP)", f"{tls_ratio:.2f}",
                         f">= {TARGET_TLS_RATIO}", tls_ratio >= TARGET_TLS_RATIO))
        verdicts.append(("replica identical in both modes", "yes" if other["identical"] else "NO", "yes",
                         other["identical"]))
    print()
    print_table(["figure", "value", "target", "met"], [[a, b, c, "yes" if d else "NO"] for a, b, c, d in verdicts])
    print(f"(agent RSS sampled every 0.2 s: {hvr['rss_samples']} samples, {human(hvr['rss_at_start_bytes'])} "
          f"before the copy)")
    if args.py_spy:
        print_busiest_frames(args.py_spy, "the copy")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"size_bytes": size, "allocated_bytes": allocated,
                                                   "extents": extents, "hvr": hvr, "auth": args.auth,
                                                   "hvr_by_auth": by_auth, "rsync": rs}, indent=2))
    return 0 if all(r["identical"] for r in by_auth.values()) and (rs is None or rs["identical"]) else 1


if __name__ == "__main__":
    sys.exit(main())
