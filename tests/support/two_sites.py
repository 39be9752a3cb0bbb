"""Two "sites" on 127.0.0.1, each an agent and a listener, cross-wired so either agent replicates to the other.

Site A and site B each have their own work folder (state, storage, images,
sockets, ports).  Each site's listener holds the key of the other site's
agent, and is reached by that agent through a :class:`CountingProxy`, so the
bytes one site sends the other are counted on the wire.  Failover, reverse
replication and fail-back tests drive the sites with ``hvrctl``, as an
operator would on each host; :meth:`Site.hvrctl` names both of the site's
admin sockets, so commands that talk to both daemons of a host
(``replica adopt --from-agent``, ``failover start``) work.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from counting_proxy import CountingProxy
from daemons import AgentProcess, python_executable, run, wait_for
from listener_process import ListenerProcess

MiB = 1024 * 1024


class Site:
    """One host: an agent (its primary VMs) and a listener (the replicas it keeps)."""

    def __init__(self, workdir: Path, name: str, *, agent_config: dict | None = None,
                 listener_config: dict | None = None):
        self.name = name
        self.dir = Path(workdir) / f"site-{name}"
        self.images = self.dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.listener = ListenerProcess(self.dir / "listener", extra_config=listener_config)
        self.agent = AgentProcess(self.dir / "agent", extra_config=agent_config)
        self.proxy: CountingProxy | None = None  # in front of this site's listener: what the other site sends
        self.key_path: Path | None = None  # this site's agent's key, held by the other site's listener
        self.peer: Site | None = None

    # --- daemons ---------------------------------------------------------------------------
    def start(self) -> Site:
        self.listener.start().wait_ready()
        self.agent.start().wait_ready()
        return self

    def kill_agent(self) -> None:
        """SIGKILL the agent (a crash, or the site lost)."""
        self.agent.kill()

    def kill_listener(self) -> None:
        self.listener.kill()

    def restart_agent(self) -> None:
        if self.agent.is_alive():
            self.agent.kill()
        self.agent.start().wait_ready()

    def restart_listener(self) -> None:
        if self.listener.is_alive():
            self.listener.kill()
        self.listener.start().wait_ready()

    def close(self) -> None:
        try:
            self.agent.close()
        finally:
            try:
                self.listener.close()
            finally:
                if self.proxy is not None:
                    self.proxy.close()

    def log_tails(self) -> str:
        return f"--- site {self.name} ---\n{self.agent.log_tail()}\n{self.listener.log_tail()}"

    # --- the operator on this host ---------------------------------------------------------------
    def hvrctl(self, *args, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess:
        cmd = [python_executable(), "-m", "hvrctl", "--agent-socket", str(self.agent.admin_socket),
               "--listener-socket", str(self.listener.admin_socket), *map(str, args)]
        return run(cmd, timeout_s, check=check, context=self.log_tails)

    def hvrctl_json(self, *args, timeout_s: float = 60):
        result = self.hvrctl(*args, "-o", "json", timeout_s=timeout_s)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"hvrctl {' '.join(map(str, args))} printed no JSON:\n{result.stdout}\n"
                                 f"{self.log_tails()}") from None

    # --- primary VMs (the agent) -----------------------------------------------------------------
    def make_disk(self, name: str, size_bytes: int) -> Path:
        path = self.images / f"{name}.img"
        with open(path, "wb") as fh:
            fh.truncate(size_bytes)
        return path

    def add_vm(self, vm: str, disks: list[Path], *, tracking: str = "bitmap") -> dict:
        args = ["vm", "add", vm, "--tracking", tracking]
        for d in disks:
            args += ["--disk", d]
        self.hvrctl(*args)
        return self.agent_vm(vm)

    def agent_vm(self, vm: str) -> dict | None:
        """The agent's VM (ids, disks, ``nbd_clients``), or None when it has no VM of that name."""
        return next((v for v in self.agent.list_vms() if v["name"] == vm), None)

    def replication(self, vm: str) -> dict:
        """The VM's replication status on this (primary) site (``hvrctl vm get``)."""
        return self.hvrctl_json("vm", "get", vm)

    def enable(self, vm: str, *, frequency: int = 30, extra: tuple = ()) -> None:
        """Replicate ``vm`` from this site's agent to the other site's listener (through its proxy)."""
        self.hvrctl("vm", "enable", vm, "--replica-server", "127.0.0.1", "--port", self.peer.proxy.port,
                    "--key", self.key_path, "--frequency", frequency, *extra)

    def initial(self, vm: str, *, use_existing: bool = False, timeout_s: float = 300) -> None:
        self.hvrctl("initial", "start", vm, "--wait", *(["--use-existing"] if use_existing else []),
                    timeout_s=timeout_s)

    def nbd_uri(self, vm: str, disk: str) -> str:
        return self.agent.nbd_uri(vm, disk)

    def write(self, vm: str, disk: str, *commands: str) -> None:
        """qemu-io commands (``write -P 0x5a 1M 64k``) through the agent's NBD socket."""
        qemu_io(self.nbd_uri(vm, disk), *commands)

    # --- the failover runbooks (docs/failover.md), as the operator types them on this host -------
    def prepare(self, vm: str, **kw) -> subprocess.CompletedProcess:
        """Planned failover, on the primary: ``failover start NAME --prepare``."""
        return self.hvrctl("failover", "start", vm, "--prepare", **kw)

    def failover_start(self, vm: str, *, recovery_point: int | None = None, force: bool = False,
                       **kw) -> subprocess.CompletedProcess:
        """On the replica server: ``failover start NAME [--recovery-point ID] [--force]``."""
        args = ["failover", "start", vm]
        if recovery_point is not None:
            args += ["--recovery-point", recovery_point]
        if force:
            args.append("--force")
        return self.hvrctl(*args, **kw)

    def failover_stop(self, vm: str, **kw) -> subprocess.CompletedProcess:
        return self.hvrctl("failover", "stop", vm, **kw)

    def failover_complete(self, vm: str, **kw) -> subprocess.CompletedProcess:
        return self.hvrctl("failover", "complete", vm, **kw)

    def adopt_from_agent(self, vm: str, **kw) -> subprocess.CompletedProcess:
        """On the old primary: its agent's VM images become the replica, their state kept aside."""
        return self.hvrctl("replica", "adopt", vm, "--from-agent", **kw)

    def reverse(self, vm: str, *, extra: tuple = (), **kw) -> subprocess.CompletedProcess:
        """On the new primary: ``vm set NAME --reverse`` towards the other site's listener (through its proxy)."""
        return self.hvrctl("vm", "set", vm, "--reverse", "--replica-server", "127.0.0.1", "--port",
                           self.peer.proxy.port, "--key", self.key_path, *extra, **kw)

    # --- replicas (the listener) -----------------------------------------------------------------
    def replica(self, vm: str) -> dict:
        return self.listener.hvrctl_json("replica", "get", vm)

    def replica_image(self, vm: str, disk: str) -> Path:
        """The replica's image of ``disk`` (an adopted replica's images are where they were adopted)."""
        for d in self.replica(vm).get("disks", []):
            if d.get("name") == disk and d.get("path"):
                return Path(d["path"])
        return Path(self.replica(vm)["storage"]) / f"{disk}.img"

    def points(self, vm: str) -> list[dict]:
        return self.listener.hvrctl_json("recovery-points", "list", vm)


class TwoSites:
    """Site A and site B, each an agent and a listener; either agent may replicate to the other site."""

    def __init__(self, workdir: Path, **site_config):
        self.a = Site(workdir, "a", **site_config)
        self.b = Site(workdir, "b", **site_config)
        self.a.peer, self.b.peer = self.b, self.a

    def start(self) -> TwoSites:
        for site in (self.a, self.b):
            site.start()
            site.proxy = CountingProxy(site.listener.port)
        for site in (self.a, self.b):  # each agent's key is held by the other site's listener
            _, site.key_path = site.peer.listener.new_key(f"site-{site.name}.example")
        return self

    def close(self) -> None:
        try:
            self.a.close()
        finally:
            self.b.close()

    def __enter__(self) -> TwoSites:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def log_tails(self) -> str:
        return self.a.log_tails() + "\n" + self.b.log_tails()

    def wait_applied(self, primary: Site, vm: str, timeout_s: float = 120) -> int:
        """Wait until the other site's replica of ``vm`` applied every cycle ``primary`` had acknowledged."""
        target = (primary.replication(vm).get("next_sequence") or 1) - 1

        def applied() -> bool:
            rep = primary.peer.replica(vm)
            return rep["last_applied_sequence"] >= target and rep["state"] == "Replicating"
        wait_for(applied, timeout_s, f"site {primary.peer.name}'s replica of {vm} to apply cycle {target}",
                 context=self.log_tails)
        return target

    def sync(self, primary: Site, vm: str, timeout_s: float = 120) -> int:
        """Ship what ``primary`` holds now and wait for the other site to apply it."""
        primary.hvrctl("vm", "sync-now", vm, timeout_s=timeout_s)
        return self.wait_applied(primary, vm, timeout_s)

    def sent_bytes(self, primary: Site) -> int:
        """Bytes ``primary``'s agent sent to the other site since the last :meth:`reset_counts`."""
        return primary.peer.proxy.counts()[0]

    def reset_counts(self) -> None:
        for site in (self.a, self.b):
            site.proxy.reset()


def qemu_io(target: str | os.PathLike, *commands: str, timeout_s: float = 120) -> None:
    """qemu-io on an NBD URI or an image file (raw)."""
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    run([*args, str(target)], timeout_s=timeout_s)


def images_equal(a: Path | str, b: Path | str) -> tuple[bool, str]:
    """``qemu-img compare`` of two raw images (or NBD URIs)."""
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                            capture_output=True, text=True, timeout=300)
    return result.returncode == 0, result.stdout + result.stderr


def assert_same_image(a: Path | str, b: Path | str) -> None:
    equal, why = images_equal(a, b)
    assert equal, f"{a} differs from {b}: {why}"


def sparse_copy(src: Path, dst: Path) -> Path:
    """A copy of an image that keeps its holes."""
    run(["cp", "--sparse=always", str(src), str(dst)], timeout_s=120)
    return dst
