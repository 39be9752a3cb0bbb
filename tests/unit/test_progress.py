"""hvrctl's progress bars: drawn on a terminal, plain lines otherwise, silent with -o json."""

from __future__ import annotations

import io

from hvrctl import progress
from hvrctl.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_output_draws_nothing():
    out = io.StringIO()
    with progress_bar("export", 100, output="json", stream=out) as bar:
        bar.advance(50)
    assert out.getvalue() == ""


def test_a_pipe_gets_plain_lines_at_most_every_few_seconds_and_at_the_end(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    with progress_bar("backup web", 4 * 1024 * 1024, stream=out) as bar:
        bar.advance(1024 * 1024)  # first line
        bar.advance(1024 * 1024)  # too soon: no line
        clock[0] += progress.LINE_EVERY_S
        bar.advance(1024 * 1024)
    lines = out.getvalue().splitlines()
    assert lines[0] == "backup web:  25.0%  1.0 MiB / 4.0 MiB"
    assert lines[1] == "backup web:  75.0%  3.0 MiB / 4.0 MiB"
    assert lines[-1] == "backup web:  75.0%  3.0 MiB / 4.0 MiB" and len(lines) == 3


def test_an_indeterminate_operation_names_itself():
    out = io.StringIO()
    with progress_bar("cycle of VM web", None, stream=out):
        pass
    assert out.getvalue() == "cycle of VM web\n"


def test_a_terminal_gets_a_rich_bar():
    out = Terminal()
    with progress_bar("backup web", 100, unit="count", stream=out) as bar:
        bar.update(40, description="backup web: disk sys")
    assert "backup web" in out.getvalue()


def test_an_import_follows_the_daemons_phases():
    from hvrctl.media_commands import _feed

    out = io.StringIO()
    with progress_bar("checking", None, stream=out) as bar:
        _feed(bar, {"phase": "verify", "total_bytes": 4 * 1024 * 1024, "done_bytes": 1024 * 1024})
        _feed(bar, {"phase": "load", "total_bytes": 4 * 1024 * 1024, "done_bytes": 4 * 1024 * 1024})
    lines = out.getvalue().splitlines()
    assert lines[0] == "checking:  25.0%  1.0 MiB / 4.0 MiB"
    assert lines[-1] == "loading: 100.0%  4.0 MiB / 4.0 MiB"
