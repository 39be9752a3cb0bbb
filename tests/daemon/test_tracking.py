"""Change tracking end to end: the agent journals every write, and the logs replay to the image.

Independent clients (libnbd via /usr/bin/python3, qemu-io, qemu-img) write
through the agent; the logs are replayed with ``hvrctl hrl apply`` onto
copies of the images as they were before, and ``qemu-img compare`` must find
them identical to the live images.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import zlib
from pathlib import Path

from daemons import AgentProcess, python_executable, run, wait_for
from hvr_common.pure.hrl import RecordKind
from hvr_common.shell.hrl_file import apply_record, iter_hrl_file
from hvr_common.pure.hrl import LogSummary, Record
from hvr_common.pure.intent_bitmap import decode_file
from hvr_agent.tracker import MARK_AHEAD_REGIONS

CLIENTS = Path(__file__).resolve().parents[1] / "support" / "clients"
SYSTEM_PYTHON = "/usr/bin/python3"  # has libnbd's bindings (Debian python3-libnbd)
MiB = 1024 * 1024


def hvrctl(*args) -> subprocess.CompletedProcess:
    return run([python_executable(), "-m", "hvrctl", *map(str, args)], timeout_s=120)


def logs_of(image: Path) -> list[Path]:
    return sorted(image.parent.glob(image.name + ".*.hrl"))


def fill_base(image: Path, size: int, seed: int) -> None:
    """A base image with random data in some places and holes elsewhere (written without the agent)."""
    with open(image, "wb") as fh:
        fh.truncate(size)
    rng = random.Random(seed)
    cmds = []
    for _ in range(12):
        off = rng.randrange(0, size - MiB, 4096)
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {rng.choice([4096, 65536, MiB])}"]
    run(["qemu-io", "-f", "raw", *cmds, str(image)], timeout_s=60)


def random_ops(rng: random.Random, size: int, count: int) -> list[list]:
    ops = []
    for _ in range(count):
        kind = rng.choices(["write", "write_fua", "trim", "zero", "zero_nohole", "flush"],
                           weights=[60, 5, 10, 10, 5, 5])[0]
        if kind == "flush":
            ops.append(["flush", 0, 0, 0])
            continue
        # misaligned and overlapping: offsets cluster in a few hot areas
        hot = rng.choice([0, size // 3, size - 2 * MiB])
        offset = min(size - 1, hot + rng.randrange(0, 2 * MiB))
        length = min(size - offset, rng.choice([1, 511, 512, 4096, 5000, 65536, 300_000, MiB]))
        ops.append([kind, offset, length, rng.randrange(1 << 30)])
    return ops


def run_ops(uri: str, ops: list, workdir: Path, tag: str) -> subprocess.Popen:
    path = workdir / f"ops-{tag}.json"
    path.write_text(json.dumps(ops))
    return subprocess.Popen([SYSTEM_PYTHON, str(CLIENTS / "nbd_ops.py"), uri, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_clients(procs: list[subprocess.Popen], agent: AgentProcess) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, f"client failed: {out.decode()}\n{agent.log_tail()}"


def replay_all(image: Path, base_copy: Path) -> int:
    logs = logs_of(image)
    for log in logs:
        hvrctl("hrl", "apply", log, base_copy)
    return len(logs)


def qemu_compare(a: Path, b: Path) -> None:
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"qemu-img compare {a} {b}: {result.stdout}{result.stderr}"


def test_replaying_logs_reproduces_both_disks_across_cuts(agent: AgentProcess, tmp_path: Path):
    size = 48 * MiB
    disks = [tmp_path / "sys.img", tmp_path / "data.img"]
    bases = []
    for i, img in enumerate(disks):
        fill_base(img, size, seed=i)
        base = tmp_path / f"{img.stem}.base"
        shutil.copyfile(img, base)
        bases.append(base)
    agent.add_vm("vm1", disks, tracking="journal")  # the logs replayed here are journal mode's
    vm = agent.list_vms()[0]
    rng = random.Random(20261123)
    for round_no in range(4):
        procs = [run_ops(agent.nbd_uri("vm1", img.stem), random_ops(rng, size, 120), tmp_path,
                         f"{img.stem}-{round_no}") for img in disks]
        wait_clients(procs, agent)
        cut = agent.cut("vm1")
        assert sorted(c["disk"] for c in cut["logs"]) == ["data", "sys"]
        assert len({c["sequence"] for c in cut["logs"]}) == 1, "both disks must be cut at the same sequence"
    for img, base in zip(disks, bases):
        logs = logs_of(img)
        assert len(logs) == 5  # four closed by cuts, one active
        # every closed log names this VM and disk, with consecutive sequences
        seqs = []
        for log in logs[:-1]:
            header = next(iter_hrl_file(log, keep_data=False))
            assert str(header.vm_id) == vm["vm_id"]
            seqs.append(header.sequence)
        assert seqs == list(range(seqs[0], seqs[0] + 4))
        # the active (empty) log cannot be applied as a closed log: stop the agent to close it
    agent.terminate()
    for img, base in zip(disks, bases):
        assert replay_all(img, base) == 5
        qemu_compare(img, base)


def test_bitmap_marks_written_region_before_reply(tmp_path: Path):
    agent = AgentProcess(tmp_path / "agent", extra_config={"bitmap_region_bytes": MiB})
    agent.start().wait_ready()
    try:
        img = tmp_path / "d0.img"
        with open(img, "wb") as fh:
            fh.truncate(32 * MiB)
        agent.add_vm("vm", [img])
        run(["qemu-io", "-f", "raw", "-c", f"write -P 7 {5 * MiB + 100} 4096",
             agent.nbd_uri("vm", "d0")], timeout_s=60)
        raw = (img.parent / (img.name + ".wib")).read_bytes()
        state = decode_file(raw, 32 * MiB, MiB)
        assert state.bitmap.marked_regions() == [5]
        agent.cut("vm")
        state = decode_file((img.parent / (img.name + ".wib")).read_bytes(), 32 * MiB, MiB)
        assert state.bitmap.marked_regions() == [], "a cut must clear the marks once the old log is durable"
    finally:
        agent.close()


def _records_of(logs: list[Path]) -> list[tuple[int, int, int]]:
    found = []
    for log in logs:
        for item in iter_hrl_file(log, keep_data=True):
            if isinstance(item, Record) and item.kind == RecordKind.WRITE:
                found.append((item.offset, item.length, zlib.crc32(item.data)))
    return found


def _replay_python(logs: list[Path], target: Path) -> None:
    """Replay with the valid prefix of a torn log too (what recovery will keep)."""
    fd = os.open(target, os.O_RDWR)
    try:
        for log in logs:
            for item in iter_hrl_file(log, keep_data=True):
                if isinstance(item, Record):
                    apply_record(fd, item)
    finally:
        os.close(fd)


def test_sigkill_during_write_storm_loses_nothing_flushed(tmp_path: Path):
    region = 256 * 1024
    size = 64 * MiB
    span = 24 * MiB  # the storm stays in the first 24 MiB: regions beyond must stay unmarked
    agent = AgentProcess(tmp_path / "agent", extra_config={"bitmap_region_bytes": region})
    agent.start().wait_ready()
    img = tmp_path / "disk.img"
    fill_base(img, size, seed=7)
    base = tmp_path / "disk.base"
    shutil.copyfile(img, base)
    try:
        agent.add_vm("vm", [img], tracking="journal")  # the flushed writes are looked for in the logs
        record = tmp_path / "storm.txt"
        storm = subprocess.Popen([SYSTEM_PYTHON, str(CLIENTS / "write_storm.py"), agent.nbd_uri("vm", "disk"),
                                  str(span), "42", str(record)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def flushes() -> int:
            return record.read_text().count("F\n") if record.exists() else 0

        wait_for(lambda: flushes() >= 5, 60, "the storm to complete 5 flushes")
        agent.cut("vm")  # a cut in the middle: marks of the old period are cleared
        target = flushes() + 10
        wait_for(lambda: flushes() >= target, 60, "10 more flushes after the cut")
        agent.kill()
        storm.wait(timeout=60)
        lines = record.read_text().splitlines()

        # 1. every write acknowledged before the last completed flush is in the logs
        last_flush = max(i for i, line in enumerate(lines) if line == "F")
        acked = [tuple(map(int, line.split()[1:])) for line in lines[:last_flush] if line.startswith("W ")]
        assert len(acked) > 400
        logged = set(_records_of(logs_of(img)))
        missing = [w for w in acked if w not in logged]
        assert not missing, f"{len(missing)} flushed writes are not in the log, e.g. {missing[:3]}"

        # 2. where the image and (base + logs) disagree, the bitmap has the region marked
        replayed = tmp_path / "replayed.img"
        shutil.copyfile(base, replayed)
        _replay_python(logs_of(img), replayed)
        marks = decode_file((img.parent / (img.name + ".wib")).read_bytes(), size, region).bitmap
        live, mine = img.read_bytes(), replayed.read_bytes()
        differing = {off // region for off in range(0, size, 4096) if live[off:off + 4096] != mine[off:off + 4096]}
        unmarked = sorted(r for r in differing if not marks.marks[r])
        assert not unmarked, f"regions differ but are not in the write-intent bitmap: {unmarked[:10]}"
        beyond = span // region + 1 + MARK_AHEAD_REGIONS  # a stream may mark this many regions ahead
        assert all(not marks.marks[r] for r in range(beyond, size // region)), \
            "regions the storm never came near are marked"

        # 3. after a restart the torn tail is dropped and the logs replay to the image exactly
        agent.start().wait_ready()
        assert any(json.loads(l).get("event") == "log_recovered"
                   for l in agent.stdout_path.read_text().splitlines() if l.startswith("{"))
        agent.terminate()
        replay_target = tmp_path / "replayed2.img"
        shutil.copyfile(base, replay_target)
        for log in logs_of(img):
            summary = list(iter_hrl_file(log, keep_data=False))[-1]
            assert isinstance(summary, LogSummary) and summary.clean, f"{log} not closed after recovery"
        replay_all(img, replay_target)
        qemu_compare(img, replay_target)
    finally:
        agent.close()


def test_registrations_survive_restart_and_logs_continue(tmp_path: Path):
    agent = AgentProcess(tmp_path / "agent")
    agent.start().wait_ready()
    img = tmp_path / "d.img"
    with open(img, "wb") as fh:
        fh.truncate(8 * MiB)
    base = tmp_path / "d.base"
    shutil.copyfile(img, base)
    try:
        agent.add_vm("keep", [img], tracking="journal")  # the logs must continue across the restart
        run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", agent.nbd_uri("keep", "d")], timeout_s=60)
        agent.terminate()
        agent.start().wait_ready()
        vms = agent.list_vms()
        assert [v["name"] for v in vms] == ["keep"]
        run(["qemu-io", "-f", "raw", "-c", "write -P 2 32k 64k", agent.nbd_uri("keep", "d")], timeout_s=60)
        agent.terminate()
        out = agent.stdout_path.read_text()
        assert "regions_rejournaled" not in out, "a clean stop must leave nothing to re-journal"
        seqs = [next(iter_hrl_file(p, keep_data=False)).sequence for p in logs_of(img)]
        assert seqs == sorted(set(seqs)) and len(seqs) >= 2
        replay_all(img, base)
        qemu_compare(img, base)
    finally:
        agent.close()
