"""A primary (agent) and a replica server (listener) on loopback, wired together for tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from daemons import AgentProcess, run, wait_for
from listener_process import ListenerProcess

MiB = 1024 * 1024


class Pair:
    def __init__(self, workdir: Path, *, agent_config: dict | None = None, listener_config: dict | None = None,
                 agent_tables: str = "", tracking: str | None = None):
        self.workdir = workdir
        self.tracking = tracking  # the tracking mode of every VM added through the agent (None: the default)
        self.listener = ListenerProcess(workdir / "listener", extra_config=listener_config)
        self.agent = AgentProcess(workdir / "agent", extra_config=agent_config, extra_tables=agent_tables)
        self.agent.tracking = tracking
        self.key_path: Path | None = None
        self.replica_port: int | None = None  # where the agent sends (the listener, or a proxy)

    def start(self) -> "Pair":
        self.listener.start().wait_ready()
        _, self.key_path = self.listener.new_key("primary.example")
        self.agent.start().wait_ready()
        self.replica_port = self.listener.port
        return self

    def close(self) -> None:
        try:
            self.agent.close()
        finally:
            self.listener.close()

    # --- primary side -------------------------------------------------------
    def protect(self, vm: str, disks: list[Path], *, frequency: int = 30, port: int | None = None,
                replica_server: str = "127.0.0.1", credentials: list[str] | None = None) -> None:
        """Enable replication with ``credentials`` (the enable flags; default: ``--key`` of the pair's key)."""
        self.agent.add_vm(vm, disks)
        self.agent.hvrctl("vm", "enable", vm, "--replica-server", replica_server, "--port",
                          str(port or self.replica_port), *(credentials or ["--key", str(self.key_path)]),
                          "--frequency", str(frequency))

    def initial(self, vm: str, timeout_s: float = 300) -> None:
        self.agent.hvrctl("initial", "start", vm, "--wait", timeout_s=timeout_s)

    def status(self, vm: str) -> dict:
        return self.agent.hvrctl_json("vm", "get", vm, "-o", "json")

    def sync(self, vm: str, timeout_s: float = 120) -> None:
        self.agent.hvrctl("vm", "sync-now", vm, timeout_s=timeout_s)

    # --- replica side -------------------------------------------------------
    def replica(self, vm: str) -> dict:
        return self.listener.hvrctl_json("replica", "get", vm)

    def replica_dir(self, vm: str) -> Path:
        """The replica's folder (named by its VM id, under its storage location)."""
        return Path(self.replica(vm)["storage"])

    def replica_image(self, vm: str, disk: str) -> Path:
        return self.replica_dir(vm) / f"{disk}.img"

    def wait_replica_applied(self, vm: str, timeout_s: float = 120) -> int:
        """Wait until the replica has applied everything the primary has had acknowledged."""
        st = self.status(vm)
        target = (st.get("next_sequence") or 1) - 1

        def applied() -> bool:
            rep = self.replica(vm)
            return rep["last_applied_sequence"] >= target and rep["state"] == "Replicating"
        wait_for(applied, timeout_s, f"replica of {vm} to apply cycle {target}",
                 context=lambda: self.agent.log_tail() + "\n" + self.listener.log_tail())
        return target

    def assert_identical(self, vm: str, disks: list[Path]) -> None:
        for img in disks:
            rep = self.replica_image(vm, img.stem)
            result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), str(rep)],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{img} vs {rep}: {result.stdout}{result.stderr}"


def qemu_io(uri: str, *commands: str, timeout_s: float = 120) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    run([*args, uri], timeout_s=timeout_s)


def make_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path
