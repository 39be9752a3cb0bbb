"""A self-contained demonstration of hvr on this machine, on loopback, in a temporary folder.

Runs the real agent, writes to a VM disk through NBD with qemu-io (an
independent client), cuts the logs, inspects them, and proves with
``qemu-img compare`` that replaying the logs onto a copy of the disk as it
was reproduces the live disk.  Nothing outside the temporary folder changes.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kw)
    out = (result.stdout + result.stderr).rstrip()
    if out:
        print(out, flush=True)
    if result.returncode != 0:
        raise SystemExit(f"demo: command failed with exit code {result.returncode}")
    return result


def wait_for_socket(proc: subprocess.Popen, path: Path, log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the agent exited early:\n{log.read_text()}")
        if path.exists():
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: the agent did not open {path} within {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvr-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder for a look afterwards")
    parser.add_argument("--size-mib", type=int, default=256, help="size of each demo disk (default 256)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="hvr-demo-"))
    py = sys.executable
    hvrctl = [py, "-m", "hvrctl", "--agent-socket", work / "agent.sock"]
    agent = None
    try:
        step(f"workspace {work}: two raw sparse disks of {args.size_mib} MiB for VM 'web01'")
        disks = [work / "sys.img", work / "data.img"]
        for d in disks:
            sh(["qemu-img", "create", "-q", "-f", "raw", d, f"{args.size_mib}M"])
            shutil.copyfile(d, d.with_suffix(".before"))
        (work / "agent.toml").write_text(
            f'state_dir = "{work}/state"\nadmin_socket = "{work}/agent.sock"\n'
            f'nbd_socket = "{work}/nbd.sock"\nlog_format = "json"\n')

        step("start hvr-agent (foreground daemon; its JSON log goes to agent.log)")
        log = work / "agent.log"
        with open(log, "wb") as fh:
            agent = subprocess.Popen([py, "-m", "hvr_agent", "--config", work / "agent.toml"],
                                     stdout=fh, stderr=subprocess.STDOUT)
        wait_for_socket(agent, work / "agent.sock", log)
        print(f"agent running, pid {agent.pid}")

        step("protect the VM: export both disks over NBD with change tracking")
        sh(hvrctl + ["vm", "add", "web01", "--disk", disks[0], "--disk", disks[1]])
        uri = {d.stem: f"nbd+unix:///web01/{d.stem}?socket={work}/nbd.sock" for d in disks}

        step("the guest writes (qemu-io over NBD): data, a TRIM, zeroes, a FUA write")
        sh(["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 8M", "-c", "write -P 0xbb 1M 64k",
            "-c", "discard 4M 1M", "-c", "write -z 6M 512k", "-c", "write -f -P 0x11 7M 4k",
            uri["sys"]])
        sh(["qemu-io", "-f", "raw", "-c", "write -P 0x42 100M 3M", "-c", "write -P 0x43 101M 5000",
            "-c", "flush", uri["data"]])

        step("cut: both disks switch to new logs at one instant; the closed logs are durable")
        sh(hvrctl + ["vm", "cut", "web01"])
        sh(["qemu-io", "-f", "raw", "-c", "write -P 0xcc 2M 2M", uri["sys"]])
        sh(hvrctl + ["vm", "cut", "web01"])

        step("holes are visible to NBD clients (block status)")
        sh(["qemu-img", "map", "--output=human", "-f", "raw", uri["sys"]])

        step("inspect the first log of the system disk")
        logs = sorted(work.glob("sys.img.*.hrl"))
        sh(hvrctl + ["hrl", "inspect", logs[0]])

        step("stop the agent cleanly (SIGTERM): active logs are closed")
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        print(f"agent exited with {agent.returncode}")

        step("replay every log, in order, onto copies of the disks as they were before")
        for d in disks:
            replica = d.with_suffix(".replayed")
            shutil.copyfile(d.with_suffix(".before"), replica)
            for hrl in sorted(work.glob(d.name + ".*.hrl")):
                sh([py, "-m", "hvrctl", "hrl", "apply", hrl, replica])

        step("verify with qemu-img compare: replayed copy == live disk")
        for d in disks:
            sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", d, d.with_suffix(".replayed")])
        print("\nDemo complete: every guest write was captured, and the logs rebuild the disks exactly.")
        return 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
