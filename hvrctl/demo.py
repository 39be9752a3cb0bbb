"""A self-contained demonstration of hvr on this machine, on loopback, in a temporary folder.

Starts a replica server (hvr-listener) and a primary (hvr-agent), writes to a
VM's two disks through NBD with qemu-io (an independent client), enables
replication with a token key, runs the initial replication, ships a few
cycles, shows ``vm get`` and ``vm measure``, and proves with ``qemu-img
compare`` that the replica disks equal the primary's.  Nothing outside the
temporary folder changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def sh(cmd: list, *, quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kw)
    out = (result.stdout + result.stderr).rstrip()
    if out and not quiet:
        print(out, flush=True)
    if result.returncode != 0:
        if quiet and out:
            print(out, flush=True)
        raise SystemExit(f"demo: command failed with exit code {result.returncode}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, predicate, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def start(cmd: list, log: Path, sock: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {cmd[2]} exited early:\n{log.read_text()}")
        return sock.exists()
    wait_until(f"{cmd[2]} to start", ready)
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvr-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder for a look afterwards")
    parser.add_argument("--size-mib", type=int, default=256, help="size of each demo disk (default 256)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="hvr-demo-"))
    py = sys.executable
    agent_ctl = [py, "-m", "hvrctl", "--agent-socket", work / "agent.sock"]
    listener_ctl = [py, "-m", "hvrctl", "--listener-socket", work / "listener.sock"]
    procs: list[subprocess.Popen] = []
    port = free_port()
    try:
        step(f"workspace {work}")
        (work / "listener.toml").write_text(
            f'state_dir = "{work}/listener-state"\nadmin_socket = "{work}/listener.sock"\n'
            f'listen = "127.0.0.1:{port}"\nstorage = "{work}/replicas"\nlog_format = "json"\n'
            f'nbd_socket = "{work}/listener-nbd.sock"\n')
        (work / "agent.toml").write_text(
            f'state_dir = "{work}/agent-state"\nadmin_socket = "{work}/agent.sock"\n'
            f'nbd_socket = "{work}/nbd.sock"\nlog_format = "json"\ninitial_window_bytes = 16777216\n')

        step("replica server: start hvr-listener on 127.0.0.1, enable it, install the primary's key")
        procs.append(start([py, "-m", "hvr_listener", "--config", work / "listener.toml"],
                           work / "listener.log", work / "listener.sock"))
        sh(listener_ctl + ["server", "set", "--enabled", "true"])
        sh([py, "-m", "hvrctl", "key", "new", "primary.example", "--out", work / "primary.key"])
        sh(listener_ctl + ["server", "key", "add", work / "primary.key"])

        step("primary: start hvr-agent and protect VM 'web01' (two raw disks served over NBD)")
        disks = [work / "sys.img", work / "data.img"]
        for d in disks:
            sh(["qemu-img", "create", "-q", "-f", "raw", d, f"{args.size_mib}M"])
        procs.append(start([py, "-m", "hvr_agent", "--config", work / "agent.toml"],
                           work / "agent.log", work / "agent.sock"))
        sh(agent_ctl + ["vm", "add", "web01", "--disk", disks[0], "--disk", disks[1]])
        uri = {d.stem: f"nbd+unix:///web01/{d.stem}?socket={work}/nbd.sock" for d in disks}

        step("the guest writes its disks (qemu-io over NBD)")
        sh(["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 32M", "-c", "write -P 0xbb 40M 8M",
            "-c", "discard 8M 4M", uri["sys"]])
        sh(["qemu-io", "-f", "raw", "-c", f"write -P 0x42 {args.size_mib // 2}M 16M", uri["data"]])

        step("enable replication (Enable-VMReplication) and run the initial replication")
        sh(agent_ctl + ["vm", "enable", "web01", "--replica-server", "127.0.0.1", "--port", str(port),
                        "--key", work / "primary.key", "--frequency", "30"])
        sh(agent_ctl + ["initial", "start", "web01", "--wait"], timeout=600)

        step("a few replication cycles: the guest writes, then sync-now ships the changes")
        for n in range(3):
            sh(["qemu-io", "-f", "raw", "-c", f"write -P {0x10 + n} {n * 5}M 3M",
                "-c", f"write -z {100 + n}M 1M", uri["sys"]], quiet=True)
            sh(["qemu-io", "-f", "raw", "-c", f"write -P {0x20 + n} {n}M 512k", uri["data"]], quiet=True)
            sh(agent_ctl + ["vm", "sync-now", "web01"])
            if n == 0:  # keep the primary's disk as it was at this cut, to compare a recovery point with
                shutil.copyfile(disks[0], work / "sys-at-first-cycle.img")

        step("replication state and statistics (Get-VMReplication, Measure-VMReplication)")
        sh(agent_ctl + ["vm", "get", "web01"])
        sh(agent_ctl + ["vm", "measure", "web01"])

        step("the replica server's view")
        status = json.loads(sh(agent_ctl + ["vm", "get", "web01", "-o", "json"], quiet=True).stdout)
        target = status["next_sequence"] - 1

        def applied() -> bool:
            rep = json.loads(subprocess.run([str(c) for c in listener_ctl + ["replica", "get", "web01", "-o",
                                                                              "json"]],
                                            capture_output=True, text=True).stdout)
            return rep["last_applied_sequence"] >= target
        wait_until("the replica to apply the last cycle", applied)
        sh(listener_ctl + ["replica", "get", "web01"])

        step("verify with qemu-img compare: primary disk == replica disk")
        folder = Path(json.loads(sh(listener_ctl + ["replica", "get", "web01", "-o", "json"], quiet=True).stdout)
                      ["storage"])
        for d in disks:
            sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", d, folder / d.name])

        step("recovery points on the replica server, and a test failover of the first cycle's point")
        sh(listener_ctl + ["recovery-points", "list", "web01"])
        points = json.loads(sh(listener_ctl + ["recovery-points", "list", "web01", "-o", "json"],
                               quiet=True).stdout)
        first = sorted(points, key=lambda p: p["sequence"])[-3]  # the three cycles are the newest points
        sh(listener_ctl + ["failover", "start", "web01", "--as-test", "--recovery-point", str(first["id"])])
        view = json.loads(sh(listener_ctl + ["replica", "get", "web01", "-o", "json"], quiet=True).stdout)
        sys_uri = next(d["uri"] for d in view["test_failover"]["disks"] if d["disk"] == "sys")
        step("verify with qemu-img compare: the test VM's disk == the primary's disk as it was at that cut")
        sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", sys_uri, work / "sys-at-first-cycle.img"])
        sh(listener_ctl + ["failover", "stop", "web01", "--as-test"])

        step("stop both daemons cleanly (SIGTERM)")
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
            print(f"pid {p.pid} exited with {p.returncode}")
        print("\nDemo complete: the replica disks are identical to the primary's, and an earlier recovery point "
              "reads as the primary did at its cut.")
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
