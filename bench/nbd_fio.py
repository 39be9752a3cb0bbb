#!/usr/bin/env python3
"""NBD throughput of the hvr agent (change tracking on) against qemu-nbd.

Both servers serve the same preallocated raw image over a unix socket, one at
a time, and fio's nbd engine drives three workloads against each, alternating
servers round by round:

    seq-write-1M    sequential 1 MiB writes, iodepth 16
    rand-write-4k   random 4 KiB writes, iodepth 32
    rand-read-4k    random 4 KiB reads, iodepth 32

The agent's VM tracks its writes in the mode ``--mode`` names: ``journal``
(every write also appended to the HRL log) or ``bitmap`` (dirty blocks in
memory, the data written once).  After every agent run the bench cuts the
VM's logs (``hvrctl vm cut``) and deletes the closed HRL files so the disk
does not fill.  It prints a table of
median IOPS and MiB/s per server and the agent / qemu-nbd ratio.

Usage: .venv/bin/python bench/nbd_fio.py [--mode journal|bitmap] [--size 2G] [--runtime 10] [--rounds 3]
                                         [--workdir DIR] [--json-out FILE]
                                         [--workloads seq-write-1M,rand-write-4k,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

from daemons import AgentProcess, QemuNbdProcess, make_image, run  # noqa: E402

MiB = 1024 * 1024
PREALLOCATE_CHUNK_BYTES = 4 * MiB
FIO_TIMEOUT_MARGIN_S = 120


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    block_size: str
    iodepth: int
    direction: str  # "read" or "write": which side of fio's report counts


WORKLOADS = (
    Workload("seq-write-1M", "write", "1M", 16, "write"),
    Workload("rand-write-4k", "randwrite", "4k", 32, "write"),
    Workload("rand-read-4k", "randread", "4k", 32, "read"),
)

SERVERS = ("agent", "qemu-nbd")


@dataclass(frozen=True)
class Sample:
    round_index: int
    server: str
    workload: str
    iops: float
    bandwidth_bytes_per_s: float
    hrl_bytes: int  # journal bytes the agent wrote during the run (0 for qemu-nbd)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1] if text and text[-1] in units else ""
    number = text[: len(text) - len(suffix)]
    return int(float(number) * units[suffix])


def preallocate(image: Path, size_bytes: int) -> None:
    """Write every byte once (non-zero data) so no run pays for allocation."""
    make_image(image, size_bytes)
    chunk = os.urandom(PREALLOCATE_CHUNK_BYTES)
    with open(image, "r+b", buffering=0) as handle:
        offset = 0
        while offset < size_bytes:
            offset += handle.write(chunk[: min(len(chunk), size_bytes - offset)])
        os.fsync(handle.fileno())


def fio_report(stdout: str) -> dict:
    start = stdout.find("{")  # the nbd engine prints a line before the JSON
    if start < 0:
        raise RuntimeError(f"fio printed no JSON:\n{stdout}")
    return json.loads(stdout[start:])


def settle(image: Path) -> None:
    """Write back the image's dirty pages, so every run starts from the same page-cache state.

    Otherwise a run pays for writing back what the run before it (often the
    other server's) left dirty.  The image stays cached; only dirtiness goes.
    """
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def run_fio(uri: str, workload: Workload, size_bytes: int, runtime_s: int, ramp_s: int,
            context, image: Path) -> tuple[float, float]:
    settle(image)
    cmd = [
        "fio", f"--name={workload.name}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={workload.rw}", f"--bs={workload.block_size}",
        f"--iodepth={workload.iodepth}", f"--size={size_bytes}",
        "--time_based", f"--runtime={runtime_s}", f"--ramp_time={ramp_s}",
        "--norandommap", "--randrepeat=0", "--output-format=json",
    ]
    result = run(cmd, runtime_s + ramp_s + FIO_TIMEOUT_MARGIN_S, context=context)
    job = fio_report(result.stdout)["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio {workload.name} error {job['error']}\n{context()}")
    side = job[workload.direction]
    return float(side["iops"]), float(side["bw_bytes"])


def cut_and_delete_logs(agent: AgentProcess, vm: str) -> int:
    """Close the VM's active logs, delete them, return their total bytes."""
    cut = agent.cut(vm)
    total_bytes = 0
    for log in cut["logs"]:
        path = Path(log["path"])
        if path.exists():
            total_bytes += path.stat().st_size
            path.unlink()
    return total_bytes


def remove_sidecar_files(image: Path) -> None:
    """Delete what an agent left beside the image (HRL logs and the like)."""
    for path in image.parent.glob(image.name + ".*"):
        if path.is_file():
            path.unlink()


def bench_agent(round_index: int, workdir: Path, image: Path, args) -> list[Sample]:
    remove_sidecar_files(image)
    agent_dir = workdir / f"agent-round{round_index}"
    samples = []
    agent = AgentProcess(agent_dir, tcp=False, log_level="warning")
    try:
        agent.start()
        agent.wait_ready()
        agent.add_vm("bench", [image], tracking=args.mode)
        uri = agent.nbd_uri("bench", image.stem)
        cut_and_delete_logs(agent, "bench")
        for workload in args.workloads:
            iops, bandwidth = run_fio(uri, workload, args.size, args.runtime, args.ramp_time,
                                      agent.log_tail, image)
            hrl_bytes = cut_and_delete_logs(agent, "bench")
            samples.append(Sample(round_index, "agent", workload.name, iops, bandwidth,
                                  hrl_bytes))
            report_progress(samples[-1])
    finally:
        agent.close()
        shutil.rmtree(agent_dir, ignore_errors=True)
        remove_sidecar_files(image)
    return samples


def bench_qemu_nbd(round_index: int, workdir: Path, image: Path, args) -> list[Sample]:
    samples = []
    qemu = QemuNbdProcess(workdir / f"qemu-nbd-round{round_index}", image, f"bench/{image.stem}")
    try:
        qemu.start()
        qemu.wait_ready()
        for workload in args.workloads:
            iops, bandwidth = run_fio(qemu.nbd_uri(), workload, args.size, args.runtime,
                                      args.ramp_time, qemu.log_tail, image)
            samples.append(Sample(round_index, "qemu-nbd", workload.name, iops, bandwidth, 0))
            report_progress(samples[-1])
    finally:
        qemu.close()
        shutil.rmtree(workdir / f"qemu-nbd-round{round_index}", ignore_errors=True)
    return samples


def report_progress(sample: Sample) -> None:
    print(f"  round {sample.round_index + 1} {sample.server:8} {sample.workload:14} "
          f"{sample.iops:10.0f} IOPS {sample.bandwidth_bytes_per_s / MiB:9.1f} MiB/s"
          + (f"  hrl {sample.hrl_bytes / MiB:.0f} MiB" if sample.server == "agent" else ""),
          flush=True)


def summarise(samples: list[Sample], workloads) -> list[dict]:
    rows = []
    for workload in workloads:
        row: dict = {"workload": workload.name}
        for server in SERVERS:
            picked = [s for s in samples if s.server == server and s.workload == workload.name]
            row[server] = {
                "iops": statistics.median(s.iops for s in picked),
                "mib_per_s": statistics.median(s.bandwidth_bytes_per_s for s in picked) / MiB,
            }
        qemu_iops = row["qemu-nbd"]["iops"]
        row["ratio"] = row["agent"]["iops"] / qemu_iops if qemu_iops else float("nan")
        rows.append(row)
    return rows


def print_table(rows: list[dict], rounds: int, mode: str) -> None:
    header = (f"{'workload':14} | {'agent IOPS':>10} {'MiB/s':>8} | "
              f"{'qemu-nbd IOPS':>13} {'MiB/s':>8} | {'agent/qemu-nbd':>14}")
    print(f"\nmedian of {rounds} round(s), agent tracking mode {mode}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['workload']:14} | {row['agent']['iops']:10.0f} "
              f"{row['agent']['mib_per_s']:8.1f} | {row['qemu-nbd']['iops']:13.0f} "
              f"{row['qemu-nbd']['mib_per_s']:8.1f} | {row['ratio']:14.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("journal", "bitmap"), default="journal",
                        help="the agent's tracking mode for the VM (default journal)")
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"),
                        help="image size, e.g. 2G, 512M (default 2G)")
    parser.add_argument("--runtime", type=int, default=10,
                        help="seconds each fio run measures (default 10)")
    parser.add_argument("--ramp-time", type=int, default=2,
                        help="seconds each fio run warms up before measuring (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server (default 3)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="directory for the image and daemon files (default: a new "
                             "directory in /var/tmp, removed afterwards)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also write every sample and the summary as JSON here")
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                        help="comma-separated subset of: "
                             + ", ".join(w.name for w in WORKLOADS) + " (default: all)")
    args = parser.parse_args(argv)
    known = {w.name: w for w in WORKLOADS}
    unknown = [n for n in args.workloads.split(",") if n not in known]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    args.workloads = tuple(known[n] for n in args.workloads.split(","))
    if args.rounds < 1 or args.runtime < 1 or args.size < MiB:
        parser.error("--rounds and --runtime must be >= 1 and --size >= 1M")

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="hvr-nbd-fio-", dir="/var/tmp")) if own_workdir \
        else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk0.img"
    try:
        started = time.monotonic()
        print(f"preallocating {args.size / MiB:.0f} MiB image {image}", flush=True)
        preallocate(image, args.size)
        print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
        samples: list[Sample] = []
        for round_index in range(args.rounds):
            # Alternate which server goes first so page-cache warmth favours neither.
            order = SERVERS if round_index % 2 == 0 else tuple(reversed(SERVERS))
            for server in order:
                if server == "agent":
                    samples += bench_agent(round_index, workdir, image, args)
                else:
                    samples += bench_qemu_nbd(round_index, workdir, image, args)
        rows = summarise(samples, args.workloads)
        print_table(rows, args.rounds, args.mode)
        if args.json_out:
            args.json_out.write_text(json.dumps(
                {"mode": args.mode, "size_bytes": args.size, "runtime_s": args.runtime, "rounds": args.rounds,
                 "samples": [asdict(s) for s in samples], "summary": rows}, indent=2))
    finally:
        image.unlink(missing_ok=True)
        remove_sidecar_files(image)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
