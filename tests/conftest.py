"""Shared fixtures: real daemons started per test in the test's tmp_path.

* ``agent``: a started :class:`daemons.AgentProcess`, terminated at teardown,
  where it must exit 0 and its log must hold no traceback or error event.
* ``server``: the same NBD test body against the agent (in each tracking
  mode: ``agent`` journals, ``agent-bitmap`` tracks dirty blocks) and against
  qemu-nbd, the reference.  A test that passes on ``qemu-nbd`` and fails on ``agent``
  found a bug in the agent.
* ``shared_server``: like ``server`` but one per test module, for tests that
  each add their own VM and only need a daemon that is up (it saves a
  daemon start per test).

Client tools (qemu-io, qemu-img, nbdsh, nbdinfo, nbdcopy, fio) are installed
by ``scripts/bootstrap.sh``; a missing one fails the test loudly rather than
skipping it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent / "support")
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from daemons import AgentProcess, QemuNbdServer  # noqa: E402

SERVER_KINDS = ("agent", "agent-bitmap", "qemu-nbd")


def start_agent(workdir: Path, tracking: str | None = None) -> AgentProcess:
    agent = AgentProcess(workdir)
    agent.tracking = tracking  # the mode of every VM the test adds (None: the default)
    agent.start()
    try:
        agent.wait_ready(timeout_s=20)
    except BaseException:
        agent.close()
        raise
    return agent


def stop_server(served) -> None:
    """Stop a daemon; the agent must also exit 0 on SIGTERM with a clean log."""
    if isinstance(served, AgentProcess):
        served.stop_and_check()
    else:
        served.close()


@pytest.fixture
def agent(tmp_path):
    agent = start_agent(tmp_path / "agent")
    try:
        yield agent
    finally:
        stop_server(agent)


def start_server(kind: str, workdir: Path):
    """An NBD server with the agent's ``add_vm``/``nbd_uri`` interface."""
    if kind == "agent":
        return start_agent(workdir / "agent", tracking="journal")
    if kind == "agent-bitmap":
        return start_agent(workdir / "agent", tracking="bitmap")
    return QemuNbdServer(workdir / "qemu-nbd")


@pytest.fixture(params=SERVER_KINDS)
def server(request, tmp_path):
    served = start_server(request.param, tmp_path)
    try:
        yield served
    finally:
        stop_server(served)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def shared_server(request, tmp_path_factory):
    served = start_server(request.param, tmp_path_factory.mktemp(request.param))
    try:
        yield served
    finally:
        stop_server(served)
