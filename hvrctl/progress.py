"""Progress bars for hvrctl's long operations (rich), on stderr.

On a terminal a rich bar is redrawn in place and removed at the end; when
stderr is not a terminal (a log, a pipe) a plain line is written at most
every ``LINE_EVERY_S`` seconds and once at the end; with ``-o json`` nothing
is written, so a program reading the output sees results only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)

from hvrctl.output import human_bytes

LINE_EVERY_S = 5.0


class Bar:
    """One operation's progress: ``advance`` by an amount done, ``update`` to an absolute amount."""

    def __init__(self, progress: Progress | None, task, *, lines, description: str, total: float | None,
                 unit: str):
        self._progress = progress
        self._task = task
        self._lines = lines  # a stream for plain lines, or None
        self.description = description
        self.total = total
        self.completed = 0.0
        self.unit = unit
        self._last_line = 0.0

    def advance(self, amount: float) -> None:
        self.update(self.completed + amount)

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=self.total, description=self.description)
        elif self._lines is not None and time.monotonic() - self._last_line >= LINE_EVERY_S:
            self.line()

    def line(self) -> None:
        """Write the plain line now (not on a terminal)."""
        if self._lines is None:
            return
        self._last_line = time.monotonic()
        if self.total:
            percent = 100.0 * self.completed / self.total
            done = (f"{human_bytes(int(self.completed))} / {human_bytes(int(self.total))}" if self.unit == "bytes"
                    else f"{self.completed:.0f} / {self.total:.0f}")
            self._lines.write(f"{self.description}: {percent:5.1f}%  {done}\n")
        else:
            self._lines.write(f"{self.description}\n")
        self._lines.flush()


@contextmanager
def progress_bar(description: str, total: float | None, *, output: str = "table", unit: str = "bytes",
                 stream=None) -> Iterator[Bar]:
    """A bar for one long operation; ``unit`` "bytes" shows sizes and rates, anything else counts.

    ``total`` None: an indeterminate bar until :meth:`Bar.update` gives one.
    """
    stream = stream if stream is not None else sys.stderr
    if output == "json":
        yield Bar(None, None, lines=None, description=description, total=total, unit=unit)
        return
    if not stream.isatty():
        bar = Bar(None, None, lines=stream, description=description, total=total, unit=unit)
        yield bar
        bar.line()
        return
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if unit == "bytes":
        columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=Console(file=stream), transient=True) as progress:
        yield Bar(progress, progress.add_task(description, total=total), lines=None, description=description,
                  total=total, unit=unit)
