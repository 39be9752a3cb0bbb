"""Shared pieces of the replication benchmarks (``initial_vs_rsync.py``, ``churn.py``).

* :class:`CountingProxy` (``tests/support/counting_proxy.py``): a TCP
  forwarder on 127.0.0.1 that counts the bytes it carries in each direction,
  with ``splice(2)``; it measures hvr and rsync the same way.
* :class:`RssSampler`: the resident set of one process (``VmRSS`` from
  ``/proc/PID/status``), sampled in a thread; keeps the peak and the samples.
* :class:`AdminHttp`: a minimal HTTP/1.1 client over a unix socket, for the
  agent's and listener's admin APIs.  Polling through it costs far less CPU
  than starting ``hvrctl`` (a Python interpreter) every half second, which on
  a 2-core machine would disturb what is measured.
* :class:`ReplicationPair`: a listener and an agent from ``tests/support/`` wired
  together through a :class:`CountingProxy`.
* small things: size parsing and printing, a table printer, the work
  directory with ``--keep``, percentiles.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

from daemons import AgentProcess, run, wait_for  # noqa: E402
from counting_proxy import CountingProxy  # noqa: E402
from listener_process import ListenerProcess  # noqa: E402
from lab_pki import SERVER_NAME, LabPki  # noqa: E402

AUTH_MODES = ("token", "certificate")  # token over plain HTTP; certificate over mutual TLS 1.3

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

RSS_INTERVAL_S = 0.2


# --- sizes, tables, statistics -----------------------------------------------------------------
def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5GiB``, ``65536`` -> bytes (binary units)."""
    units = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1] if t and t[-1] in units else ""
    return int(float(t[: len(t) - len(suffix)]) * units[suffix])


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out=sys.stdout) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip(),
              file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    out.flush()


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "-+.") and cell != "-" or cell.endswith("iB")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- work directory ------------------------------------------------------------------------------
class WorkDir:
    """A fresh directory under ``parent`` (default /var/tmp), removed on exit unless ``keep``."""

    def __init__(self, prefix: str, parent: str | None = None, keep: bool = False):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent or "/var/tmp"))
        self.keep = keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc_info) -> None:
        if self.keep:
            say(f"work directory kept: {self.path}")
        else:
            shutil.rmtree(self.path, ignore_errors=True)


# --- resident memory -----------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KiB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples one process's VmRSS every ``interval_s`` in a thread.

    ``mark(label)`` tags the following samples, so a caller can ask for the
    peak within a phase: ``peak(label)``.
    """

    def __init__(self, pid: int, interval_s: float = RSS_INTERVAL_S):
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, str | None, int]] = []
        self._label: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def mark(self, label: str | None) -> None:
        self._label = label

    def peak(self, label: str | None = None) -> int | None:
        values = [v for _, lab, v in self.samples if label is None or lab == label]
        return max(values, default=None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            value = rss_bytes(self.pid)
            if value is not None:
                self.samples.append((time.monotonic(), self._label, value))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --- profiling -----------------------------------------------------------------------------------
class PySpy:
    """``py-spy record`` of one process into ``out`` (raw collapsed stacks) until :meth:`stop`.

    Samples are taken with ``--nonblocking`` (the process is not paused) and
    include idle threads, so waiting shows up as well as work.
    """

    def __init__(self, pid: int, out: Path, rate: int = 100):
        self.out = Path(out)
        exe = Path(sys.executable).with_name("py-spy")
        self.process = subprocess.Popen([str(exe), "record", "--pid", str(pid), "--format", "raw", "--output",
                                         str(self.out), "--rate", str(rate), "--nonblocking", "--threads",
                                         "--idle"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> Path:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.out


def print_busiest_frames(py_spy_dir: str | Path, during: str) -> None:
    """The busiest frames of the agent and the listener recorded by :class:`PySpy` into ``py_spy_dir``."""
    for who in ("agent", "listener"):
        print(f"\nbusiest frames of the {who} during {during} (py-spy samples, idle waits left out):")
        for count, frame in top_frames(Path(py_spy_dir) / f"{who}.raw"):
            print(f"  {count:6d}  {frame}")


def top_frames(raw: Path, limit: int = 15, active_only: bool = True) -> list[tuple[int, str]]:
    """The most frequent leaf frames of a py-spy raw file: [(samples, frame)]."""
    counts: dict[str, int] = {}
    if not raw.exists():
        return []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        if active_only and any(w in leaf for w in ("select (selectors.py", "wait (threading.py",
                                                   "_worker (concurrent", "run_forever", "poll (",
                                                   # uvloop runs the loop in C: this leaf is the loop
                                                   # waiting or in native code, not Python work
                                                   "Runner.run (asyncio/runners.py")):
            continue
        counts[leaf] = counts.get(leaf, 0) + int(n)
    return sorted(((c, f) for f, c in counts.items()), reverse=True)[:limit]


# --- admin API over a unix socket ----------------------------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float):
        super().__init__("localhost", timeout=timeout_s)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class AdminError(RuntimeError):
    pass


class AdminHttp:
    """JSON requests to a daemon's admin socket (one connection per request)."""

    def __init__(self, socket_path: Path, timeout_s: float = 30):
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None):
        conn = _UnixConnection(self.socket_path, timeout_s or self.timeout_s)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if resp.status >= 300:
            raise AdminError(f"{method} {path}: HTTP {resp.status}: {raw[:500]!r}")
        return doc

    def get(self, path: str):
        return self.request("GET", path)


# --- a replication pair --------------------------------------------------------------------------
class ReplicationPair:
    """Listener, agent and a counting proxy between them, all on 127.0.0.1.

    The agent's replica endpoint is the proxy, so ``proxy.counts()`` is what
    hvr put on the wire.  ``auth``: ``token`` (signed requests over plain
    HTTP) or ``certificate`` (mutual TLS 1.3 with lab CA certificates; the
    proxy relays the TLS bytes).  Use as a context manager: everything is
    stopped on exit.
    """

    def __init__(self, workdir: Path, *, agent_config: dict | None = None,
                 listener_config: dict | None = None, auth: str = "token"):
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}")
        self.workdir = workdir
        self.auth = auth
        self.pki = LabPki(workdir / "pki") if auth == "certificate" else None
        self.listener = ListenerProcess(workdir / "listener", extra_config=dict(
            listener_config or {}, **(self.pki.listener_config() if self.pki else {})))
        self.agent = AgentProcess(workdir / "agent", extra_config=dict({"log_format": "json"},
                                                                       **(agent_config or {})))
        self.proxy: CountingProxy | None = None
        self.key_path: Path | None = None
        self.agent_api: AdminHttp | None = None
        self.listener_api: AdminHttp | None = None

    def start(self) -> ReplicationPair:
        self.listener.start().wait_ready()
        _, self.key_path = self.listener.new_key("primary.bench")
        if self.pki is not None:
            self.listener.hvrctl("server", "set", "--auth", "certificate")
        self.agent.start().wait_ready()
        self.proxy = CountingProxy(self.listener.port)
        self.agent_api = AdminHttp(self.agent.admin_socket)
        self.listener_api = AdminHttp(self.listener.admin_socket)
        return self

    @property
    def agent_pid(self) -> int:
        return self.agent.process.pid

    @property
    def listener_pid(self) -> int:
        return self.listener.process.pid

    def close(self) -> None:
        try:
            try:
                self.agent.close()
            finally:
                self.listener.close()
        finally:
            if self.proxy is not None:
                self.proxy.close()

    def __enter__(self) -> ReplicationPair:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # primary side
    def protect(self, vm: str, disks: list[Path], *, frequency_s: int = 30, compression: bool = True,
                tracking: str | None = None) -> None:
        self.agent.add_vm(vm, disks, tracking=tracking)
        if self.pki is None:
            credentials = ["--replica-server", "127.0.0.1", "--key", str(self.key_path)]
        else:
            cert, key = self.pki.issue("primary.bench", "client")
            credentials = ["--replica-server", SERVER_NAME, "--auth", "certificate", "--cert", str(cert),
                           "--cert-key", str(key), "--ca", str(self.pki.ca)]
        args = ["vm", "enable", vm, *credentials, "--port", str(self.proxy.port), "--frequency", str(frequency_s)]
        if not compression:
            args.append("--no-compression")
        self.agent.hvrctl(*args)

    def status(self, vm: str) -> dict:
        return self.agent_api.get(f"/v1/replication/{vm}")

    def measure(self, vm: str) -> dict:
        return self.agent_api.get(f"/v1/vms/{vm}/replication/measure")

    def vm_info(self, vm: str) -> dict:
        return self.agent_api.get(f"/v1/vms/{vm}")

    def sync_now(self, vm: str, wait: bool) -> dict:
        return self.agent_api.request("POST", f"/v1/vms/{vm}/replication/sync-now", {"wait": wait},
                                      timeout_s=600)

    # replica side
    def replica(self, vm: str) -> dict:
        return self.listener_api.get(f"/v1/replicas/{vm}")

    def replica_image(self, vm: str, disk: str) -> Path:
        return Path(self.replica(vm)["storage"]) / f"{disk}.img"  # the replica's folder is named by its VM id

    def agent_events(self, name: str) -> list[dict]:
        """The agent's JSON log events called ``name`` (stdout)."""
        out = []
        path = self.agent.stdout_path
        if not path.exists():
            return out
        with open(path, errors="replace") as f:
            for line in f:
                if name not in line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == name:
                    out.append(ev)
        return out

    def log_tails(self) -> str:
        return self.agent.log_tail() + "\n" + self.listener.log_tail()


def qemu_img_compare(a: Path, b: Path, timeout_s: float = 1800) -> tuple[bool, str]:
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                            capture_output=True, text=True, timeout=timeout_s)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def allocated_bytes(path: Path) -> int:
    """Bytes of data (SEEK_DATA/SEEK_HOLE) in a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        total = 0
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
        return total
    finally:
        os.close(fd)


def drop_dirty_pages() -> None:
    """Write back dirty pages so one run's writeback does not slow the next."""
    os.sync()


__all__ = ["AgentProcess", "ListenerProcess", "run", "wait_for", "KiB", "MiB", "GiB", "parse_size", "human",
           "percentile", "PySpy", "top_frames", "print_busiest_frames", "print_table", "say", "WorkDir", "CountingProxy", "rss_bytes", "RssSampler", "AdminHttp",
           "AdminError", "ReplicationPair", "AUTH_MODES", "qemu_img_compare", "allocated_bytes", "drop_dirty_pages"]
