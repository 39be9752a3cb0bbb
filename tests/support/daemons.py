"""Real NBD servers for end-to-end tests and benchmarks.

Two servers speak the same NBD dialect to the same clients:

* :class:`AgentProcess` runs ``python -m hvr_agent`` in the foreground with a
  generated TOML config and drives it through ``python -m hvrctl``;
* :class:`QemuNbdServer` runs one ``qemu-nbd`` per exported disk.  It is the
  reference: a test that passes against it and fails against the agent found
  a bug in the agent, not in the test.

Both expose ``add_vm(name, disks, read_only=...)`` and ``nbd_uri(vm, disk)``
so one test body can run against either.  Everything a daemon prints goes to
files in the test's directory, and the tail of those files is appended to
every assertion message raised here, so a failure explains itself.

Waiting is always on a condition with a deadline (:func:`wait_for`), never on
a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]

# Longest unix socket path we let a daemon bind (sun_path holds 108 bytes,
# including the terminating NUL).
MAX_UNIX_SOCKET_PATH_BYTES = 100

LOG_TAIL_LINES = 40

T = TypeVar("T")


# ---------------------------------------------------------------------------
# small free-standing helpers
# ---------------------------------------------------------------------------


def python_executable() -> str:
    """The interpreter of the virtualenv that holds hvr (the one running us)."""
    return sys.executable


def client_env() -> dict[str, str]:
    """Environment for client tools.

    ``nbdsh`` runs ``python3 -m nbd``; the ``nbd`` module is the Debian one, so
    ``/usr/bin`` must come first on PATH even when a different ``python3``
    (a virtualenv, pyenv) would otherwise win.
    """
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_image(path: Path | str, size_bytes: int) -> Path:
    """Create a sparse raw image of ``size_bytes`` (all zeros, no data blocks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as image:
        image.truncate(size_bytes)
    return path


def tail_of_file(path: Path | str, lines: int = LOG_TAIL_LINES) -> str:
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


def _tail_of_text(text: str | bytes | None, lines: int = LOG_TAIL_LINES) -> str:
    if text is None:
        return "(not captured)"
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


class CommandFailed(AssertionError):
    """A command exited non-zero or ran past its deadline."""


def run(
    cmd: Sequence[str | os.PathLike],
    timeout_s: float = 60,
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    input_bytes: bytes | None = None,
    context: Callable[[], str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion, capturing text output.

    On a timeout, or a non-zero exit when ``check`` is true, raise
    :class:`CommandFailed` naming the command, its exit code and the tail of
    its output, plus whatever ``context()`` adds (a daemon's log tail).
    """
    argv = [os.fspath(part) for part in cmd]
    shown = " ".join(argv)
    try:
        completed = subprocess.run(
            argv,
            input=input_bytes,
            capture_output=True,
            timeout=timeout_s,
            env=env if env is not None else client_env(),
        )
    except subprocess.TimeoutExpired as exc:
        message = (
            f"command timed out after {timeout_s} s: {shown}\n"
            f"--- stdout ---\n{_tail_of_text(exc.stdout)}\n"
            f"--- stderr ---\n{_tail_of_text(exc.stderr)}"
        )
        if context is not None:
            message += "\n" + context()
        raise CommandFailed(message) from None
    completed.stdout = completed.stdout.decode(errors="replace")
    completed.stderr = completed.stderr.decode(errors="replace")
    if check and completed.returncode != 0:
        message = (
            f"command exited {completed.returncode}: {shown}\n"
            f"--- stdout ---\n{_tail_of_text(completed.stdout)}\n"
            f"--- stderr ---\n{_tail_of_text(completed.stderr)}"
        )
        if context is not None:
            message += "\n" + context()
        raise CommandFailed(message)
    return completed


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.05,
    context: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Raises ``TimeoutError`` naming ``what`` after ``timeout_s``.  The
    predicate may raise to give up early (a daemon died, say).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout_s} s waiting for {what}"
            if context is not None:
                message += "\n" + context()
            raise TimeoutError(message)
        time.sleep(interval_s)


# Socket file names used here stay within this many bytes.
MAX_SOCKET_NAME_BYTES = 40


def log_events(path: Path | str, name: str) -> list[dict]:
    """The JSON log lines of a daemon's log file whose ``event`` is ``name`` (other lines skipped)."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if item.get("event") == name:
            out.append(item)
    return out


def short_socket_dir(preferred: Path) -> tuple[Path, bool]:
    """A directory whose socket paths fit in ``sun_path``.

    Returns ``(directory, created)``; ``created`` tells the caller to remove
    the directory when done because it is not ``preferred``.
    """
    longest = preferred / ("s" * MAX_SOCKET_NAME_BYTES)
    if len(os.fsencode(longest)) <= MAX_UNIX_SOCKET_PATH_BYTES:
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="hvr-sock-", dir="/tmp")), True


def disk_stem(path: Path | str) -> str:
    """The export's disk name: the image file name without its last extension."""
    return Path(path).stem


# ---------------------------------------------------------------------------
# the hvr agent
# ---------------------------------------------------------------------------


class SupervisedProcess:
    """A child process owned by a test, its stdout/stderr in files of the test's folder.

    Subclasses set ``name``, ``stdout_path``, ``stderr_path`` and ``process = None``
    (and ``strict_stop = False`` if not stopping in time is not a failure).
    """

    name = "process"
    strict_stop = True
    process: subprocess.Popen | None = None
    _log_files: list = []

    def _spawn(self, cmd: Sequence[str | os.PathLike], **popen_kwargs) -> None:
        self._close_log_files()
        self._log_files = [open(self.stdout_path, "ab"), open(self.stderr_path, "ab")]
        self.process = subprocess.Popen([os.fspath(c) for c in cmd], stdout=self._log_files[0],
                                        stderr=self._log_files[1], stdin=subprocess.DEVNULL, **popen_kwargs)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def assert_alive(self) -> None:
        if self.process is None:
            raise AssertionError(f"{self.name} was never started")
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with code {code}\n{self.log_tail()}")

    def terminate(self, timeout_s: float = 15) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time (a failure when ``strict_stop``)."""
        return self._stop(signal.SIGTERM, timeout_s)

    def kill(self, timeout_s: float = 15) -> int | None:
        """SIGKILL and wait."""
        return self._stop(signal.SIGKILL, timeout_s)

    def _stop(self, signum: int, timeout_s: float) -> int | None:
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                self.process.send_signal(signum)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=timeout_s)
                    if self.strict_stop:
                        raise AssertionError(f"{self.name} did not exit within {timeout_s} s of signal "
                                             f"{signum}; killed\n{self.log_tail()}") from None
            return self.process.returncode
        finally:
            self._close_log_files()

    def _close_log_files(self) -> None:
        for handle in self._log_files:
            handle.close()
        self._log_files = []

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return (f"--- {self.name} stdout ({self.stdout_path}) ---\n{tail_of_file(self.stdout_path, lines)}\n"
                f"--- {self.name} stderr ({self.stderr_path}) ---\n{tail_of_file(self.stderr_path, lines)}")


class AgentProcess(SupervisedProcess):
    """One ``python -m hvr_agent`` in the foreground, owned by a test.

    ``workdir`` receives the config, the agent's stdout/stderr and its state
    directory.  Sockets go there too unless the path is too long for a unix
    socket, in which case they go to a short private directory in /tmp.
    """

    name = "agent"

    def __init__(
        self,
        workdir: Path | str,
        *,
        tcp: bool = True,
        log_level: str = "info",
        extra_config: dict[str, object] | None = None,
        extra_tables: str = "",
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "state"
        self._socket_dir, self._own_socket_dir = short_socket_dir(self.workdir)
        self.admin_socket = self._socket_dir / "admin.sock"
        self.nbd_socket = self._socket_dir / "nbd.sock"
        self.tcp_port: int | None = free_tcp_port() if tcp else None
        self.log_level = log_level
        self.extra_config = dict(extra_config or {})
        self.extra_tables = extra_tables  # TOML tables appended after the keys (e.g. [app_consistency])
        self.config_path = self.workdir / "agent.toml"
        self.stdout_path = self.workdir / "agent.stdout.log"
        self.stderr_path = self.workdir / "agent.stderr.log"
        self.process: subprocess.Popen | None = None
        self._log_files: list = []

    # -- configuration ------------------------------------------------------

    def config_text(self) -> str:
        def toml_value(value: object) -> str:
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, (int, float)):
                return str(value)
            return json.dumps(str(value))  # a JSON string is a valid TOML basic string

        entries: dict[str, object] = {
            "state_dir": str(self.state_dir),
            "admin_socket": str(self.admin_socket),
            "nbd_socket": str(self.nbd_socket),
            "nbd_tcp": f"127.0.0.1:{self.tcp_port}" if self.tcp_port else "",
            "log_level": self.log_level,
        }
        entries.update(self.extra_config)
        keys = "".join(f"{key} = {toml_value(value)}\n" for key, value in entries.items())
        return keys + (f"\n{self.extra_tables}\n" if self.extra_tables else "")

    def write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        return self.config_path

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> AgentProcess:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("agent already running")
        self.write_config()
        self._spawn([python_executable(), "-m", "hvr_agent", "--config", self.config_path], cwd=REPO_ROOT,
                    env=self._agent_env())
        return self

    def _agent_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def wait_ready(self, timeout_s: float = 20) -> AgentProcess:
        """Poll ``hvrctl vm list`` until the agent answers (or it dies)."""

        def answers() -> bool:
            self.assert_alive()
            if not self.admin_socket.exists():
                return False
            result = self.hvrctl("vm", "list", "-o", "json", check=False, timeout_s=10)
            return result.returncode == 0

        wait_for(answers, timeout_s, "the agent to answer `hvrctl vm list`",
                 interval_s=0.1, context=self.log_tail)
        return self

    def close(self) -> None:
        """Stop the agent if it still runs and remove private socket dirs."""
        try:
            if self.is_alive():
                self.terminate()
        finally:
            self._close_log_files()
            if self._own_socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> AgentProcess:
        if self.process is None:
            self.start()
            self.wait_ready()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- diagnostics --------------------------------------------------------

    def log_problems(self) -> list[str]:
        """Lines that show the agent hurt itself: tracebacks, error-level
        events, or stdout that is not a JSON event."""
        problems = []
        if self.stdout_path.exists():
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    problems.append(f"stdout, not JSON: {line}")
                    continue
                if not isinstance(event, dict) or event.get("level") in ("error", "critical"):
                    problems.append(f"stdout: {line}")
        if self.stderr_path.exists():
            stderr = self.stderr_path.read_text(errors="replace")
            if "Traceback" in stderr:
                problems.append(f"stderr has a traceback:\n{stderr[-3000:]}")
        return problems

    def stop_and_check(self, timeout_s: float = 15) -> None:
        """Teardown check: SIGTERM exits 0 and the log shows no error."""
        try:
            if self.is_alive():
                code = self.terminate(timeout_s)
                assert code == 0, f"agent exited {code} on SIGTERM\n{self.log_tail()}"
            problems = self.log_problems()
            assert not problems, "agent log shows problems:\n" + "\n".join(problems[:20])
        finally:
            self.close()

    # -- control ------------------------------------------------------------

    def hvrctl(self, *args: str | os.PathLike, check: bool = True,
               timeout_s: float = 30) -> subprocess.CompletedProcess:
        cmd = [python_executable(), "-m", "hvrctl", "--agent-socket", str(self.admin_socket),
               *[os.fspath(arg) for arg in args]]
        env = dict(os.environ)
        return run(cmd, timeout_s, check=check, env=env, context=self.log_tail)

    def hvrctl_json(self, *args: str | os.PathLike, timeout_s: float = 30):
        result = self.hvrctl(*args, timeout_s=timeout_s)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"hvrctl {' '.join(map(str, args))} printed no JSON ({exc}):\n"
                f"{result.stdout}\n{self.log_tail()}"
            ) from None

    def add_vm(self, name: str, disks: Sequence[Path | str], *, read_only: bool = False,
               tracking: str | None = None) -> None:
        args: list[str] = ["vm", "add", name]
        for disk in disks:
            args += ["--disk", str(disk)]
        if read_only:
            args.append("--read-only")
        tracking = tracking or getattr(self, "tracking", None)  # the agent's default for tests (Pair sets it)
        if tracking is not None:
            args += ["--tracking", tracking]
        self.hvrctl(*args)

    def remove_vm(self, name: str) -> None:
        self.hvrctl("vm", "remove", name)

    def list_vms(self) -> list[dict]:
        return self.hvrctl_json("vm", "list", "-o", "json")

    def cut(self, name: str) -> dict:
        return self.hvrctl_json("vm", "cut", name, "-o", "json")

    # -- addressing ---------------------------------------------------------

    def nbd_uri(self, vm: str, disk: str) -> str:
        return f"nbd+unix:///{vm}/{disk}?socket={self.nbd_socket}"

    def nbd_tcp_uri(self, vm: str, disk: str) -> str:
        if self.tcp_port is None:
            raise RuntimeError("this agent was started without nbd_tcp")
        return f"nbd://127.0.0.1:{self.tcp_port}/{vm}/{disk}"

    def list_uri(self) -> str:
        """URI for ``nbdinfo --list`` (no export name)."""
        return f"nbd+unix:///?socket={self.nbd_socket}"

    def unix_socket_for(self, vm: str, disk: str) -> Path:
        return self.nbd_socket

    def run(self, cmd: Sequence[str | os.PathLike], timeout_s: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """:func:`run` with this agent's log tail added to failures."""
        return run(cmd, timeout_s, context=self.log_tail, **kwargs)


# ---------------------------------------------------------------------------
# qemu-nbd, the reference server
# ---------------------------------------------------------------------------


class QemuNbdProcess(SupervisedProcess):
    """``qemu-nbd`` serving one raw image as one export on a unix socket."""

    name = "qemu-nbd"
    strict_stop = False

    def __init__(
        self,
        workdir: Path | str,
        image_path: Path | str,
        export_name: str,
        *,
        read_only: bool = False,
        socket_path: Path | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.image_path = Path(image_path)
        self.export_name = export_name
        self.read_only = read_only
        label = export_name.replace("/", "_")
        if socket_path is None:
            socket_dir, self._own_socket_dir = short_socket_dir(self.workdir)
            socket_path = socket_dir / f"qemu-nbd-{label}.sock"[-MAX_SOCKET_NAME_BYTES:]
        else:
            self._own_socket_dir = False
        self.nbd_socket = Path(socket_path)
        self.stdout_path = self.workdir / f"qemu-nbd-{label}.stdout.log"
        self.stderr_path = self.workdir / f"qemu-nbd-{label}.stderr.log"
        self.process: subprocess.Popen | None = None
        self._log_files: list = []

    def command(self) -> list[str]:
        cmd = [
            "qemu-nbd", "-f", "raw", "-t", "--shared=16",
            "--socket", str(self.nbd_socket),
            "--export-name", self.export_name,
            "--cache=writeback", "--aio=threads", "--discard=unmap",
        ]
        if self.read_only:
            cmd.append("--read-only")
        cmd.append(str(self.image_path))
        return cmd

    def start(self) -> QemuNbdProcess:
        self._spawn(self.command())
        return self

    def wait_ready(self, timeout_s: float = 20) -> QemuNbdProcess:
        """Wait until the socket accepts connections (or qemu-nbd dies)."""

        def accepts() -> bool:
            self.assert_alive()
            if not self.nbd_socket.exists():
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.nbd_socket))
                except (ConnectionRefusedError, FileNotFoundError):
                    return False
            return True

        wait_for(accepts, timeout_s, f"qemu-nbd to listen on {self.nbd_socket}",
                 context=self.log_tail)
        return self

    def close(self) -> None:
        try:
            self.terminate()
        finally:
            if self._own_socket_dir:
                shutil.rmtree(self.nbd_socket.parent, ignore_errors=True)

    def __enter__(self) -> QemuNbdProcess:
        if self.process is None:
            self.start()
            self.wait_ready()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def nbd_uri(self, vm: str | None = None, disk: str | None = None) -> str:
        if vm is not None and f"{vm}/{disk}" != self.export_name:
            raise KeyError(f"this qemu-nbd serves {self.export_name}, not {vm}/{disk}")
        return f"nbd+unix:///{self.export_name}?socket={self.nbd_socket}"


class QemuNbdServer:
    """The agent's ``vm add`` interface, built from one qemu-nbd per disk.

    Lets a test body written against :class:`AgentProcess` run unchanged
    against the reference server.  qemu-nbd serves one export per process, so
    ``nbdinfo --list`` here shows one export per socket.
    """

    name = "qemu-nbd"

    def __init__(self, workdir: Path | str):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._socket_dir, self._own_socket_dir = short_socket_dir(self.workdir)
        self.exports: dict[str, QemuNbdProcess] = {}

    def add_vm(self, name: str, disks: Sequence[Path | str], *, read_only: bool = False) -> None:
        started = []
        for disk in disks:
            export_name = f"{name}/{disk_stem(disk)}"
            if export_name in self.exports:
                raise ValueError(f"export {export_name} already served")
            socket_path = self._socket_dir / f"{name}_{disk_stem(disk)}.sock"[-MAX_SOCKET_NAME_BYTES:]
            server = QemuNbdProcess(self.workdir, disk, export_name,
                                    read_only=read_only, socket_path=socket_path)
            server.start()
            self.exports[export_name] = server
            started.append(server)
        for server in started:
            server.wait_ready()

    def nbd_uri(self, vm: str, disk: str) -> str:
        return self.exports[f"{vm}/{disk}"].nbd_uri()

    def unix_socket_for(self, vm: str, disk: str) -> Path:
        return self.exports[f"{vm}/{disk}"].nbd_socket

    def assert_alive(self) -> None:
        for server in self.exports.values():
            server.assert_alive()

    def is_alive(self) -> bool:
        return all(server.is_alive() for server in self.exports.values())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(server.log_tail(lines) for server in self.exports.values())

    def run(self, cmd: Sequence[str | os.PathLike], timeout_s: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        return run(cmd, timeout_s, context=self.log_tail, **kwargs)

    def close(self) -> None:
        try:
            for server in self.exports.values():
                server.terminate()
        finally:
            if self._own_socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> QemuNbdServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
