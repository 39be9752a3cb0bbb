"""How the listener hands a request body to its worker thread: received pieces in batches, never joined."""

from __future__ import annotations

import threading

import pytest

from hvr_listener.replicas import feed_pipelined

PIECE = 1000


def _pieces(count: int) -> list[bytes]:
    return [bytes([i % 251]) * PIECE for i in range(count)]


async def _body(chunks: list[bytes], read: list[int] | None = None):
    for chunk in chunks:
        if read is not None:
            read.append(1)
        yield chunk


async def test_every_piece_reaches_the_thread_once_in_order_as_received():
    chunks = _pieces(100)
    batches: list[list[bytes]] = []
    threads: set[int] = set()

    def feed(batch):
        threads.add(threading.get_ident())
        batches.append(list(batch))

    await feed_pipelined(feed, _body(chunks), batch_bytes=8 * PIECE)
    flat = [c for b in batches for c in b]
    assert len(flat) == len(chunks)
    assert all(a is b for a, b in zip(flat, chunks))  # the very objects received: nothing joined or copied
    assert threading.get_ident() not in threads  # hashing and writing never run on the event loop
    assert all(sum(map(len, b)) <= 8 * PIECE for b in batches)
    assert max(len(b) for b in batches) > 1  # pieces are gathered, not handed over one at a time


async def test_a_body_shorter_than_a_batch_is_fed_whole():
    chunks = _pieces(3)
    batches: list[list[bytes]] = []
    await feed_pipelined(lambda batch: batches.append(list(batch)), _body(chunks), batch_bytes=64 * PIECE)
    assert [c for b in batches for c in b] == chunks


async def test_an_error_in_the_thread_stops_reading_and_is_raised():
    chunks = _pieces(200)
    read: list[int] = []

    def feed(batch):
        raise ValueError("record checksum mismatch")

    with pytest.raises(ValueError, match="checksum"):
        await feed_pipelined(feed, _body(chunks, read), batch_bytes=8 * PIECE)
    assert len(read) <= 2 + 8 + 1  # the first batch, at most one more gathered, and the piece that found the error
