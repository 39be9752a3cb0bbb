"""Progress bars for hvrctl's long operations (rich), on stderr and only on a terminal.

With ``-o json`` or when stderr is not a terminal nothing is drawn, so a
program reading stdout (or a log capturing stderr) sees results only.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)


class Bar:
    """One task's progress: ``advance`` by units done, ``update`` to an absolute amount."""

    def __init__(self, progress: Progress | None, task):
        self._progress = progress
        self._task = task

    def advance(self, amount: float) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        if self._progress is not None:
            kw = {"completed": completed}
            if total is not None:
                kw["total"] = total
            if description is not None:
                kw["description"] = description
            self._progress.update(self._task, **kw)


def enabled(output: str) -> bool:
    return output != "json" and sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: float | None, *, output: str = "table",
                 unit: str = "bytes") -> Iterator[Bar]:
    """A bar for one long operation; ``unit`` "bytes" shows sizes and rates, anything else a percentage."""
    if not enabled(output):
        yield Bar(None, None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if unit == "bytes":
        columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield Bar(progress, progress.add_task(description, total=total))
