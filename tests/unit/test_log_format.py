"""Log lines: JSON for journald and pipes, a readable line on a terminal (``log_format = "auto"``)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from hvr_common.shell.logs import configure, event


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _one_event(stream) -> str:
    configure("info", "auto", stream=stream)
    event(logging.getLogger("hvr.test"), "cycle_shipped", vm="web01", seq=7, bytes=4096, latency_s=0.5)
    return stream.getvalue().strip()


def test_json_lines_when_not_a_terminal():
    line = _one_event(io.StringIO())
    record = json.loads(line)
    assert record["event"] == "cycle_shipped" and record["vm"] == "web01" and record["seq"] == 7
    assert record["level"] == "info" and record["logger"] == "hvr.test" and record["ts"].endswith("Z")


def test_readable_on_a_terminal():
    line = _one_event(Terminal())
    assert not line.startswith("{")
    assert "cycle_shipped" in line and "vm=web01" in line and "seq=7" in line and "latency_s=0.5" in line
