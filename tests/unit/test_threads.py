"""finish_in_thread: a cancelled caller waits for its thread and undoes what the thread made."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hvr_common.shell.threads import finish_in_thread


class Made:
    def __init__(self, started: threading.Event, release: threading.Event, log: list):
        started.set()
        release.wait(10)
        self.log = log
        log.append("made")

    def undo(self) -> None:
        self.log.append("undone")


async def _cancel_while_running(undo):
    started, release, log = threading.Event(), threading.Event(), []
    task = asyncio.ensure_future(finish_in_thread(Made, started, release, log, undo=undo))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the shield; the thread still runs
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    return log


@pytest.mark.asyncio
async def test_cancelled_caller_undoes_what_the_thread_made():
    assert await _cancel_while_running(Made.undo) == ["made", "undone"]


@pytest.mark.asyncio
async def test_without_undo_the_thread_still_finishes_before_the_cancellation():
    assert await _cancel_while_running(None) == ["made"]


@pytest.mark.asyncio
async def test_failed_work_is_not_undone():
    calls = []

    def fail():
        raise OSError("no space")

    with pytest.raises(OSError):
        await finish_in_thread(fail, undo=calls.append)
    assert calls == []


@pytest.mark.asyncio
async def test_uncancelled_work_returns_its_result_and_is_kept():
    calls = []
    assert await finish_in_thread(lambda: 7, undo=calls.append) == 7
    assert calls == []
