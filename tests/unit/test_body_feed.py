"""How the listener hands a request body to its worker thread: received pieces in batches, never joined."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid

import pytest

from bundles import bundle, hrl_bytes
from hvr_common.pure.bundle import BundleKind
from hvr_common.pure.bundle_decoder import BundleDecoder
from hvr_common.shell.files import IOV_MAX
from hvr_listener.bundle_io import SpoolWriter
from hvr_listener.body_feed import feed_pipelined

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


async def test_a_batch_of_more_pieces_than_one_writev_takes_is_stored_whole(tmp_path):
    """Small network pieces: a batch can hold more of them than writev(2) accepts at once (IOV_MAX)."""
    vm, disk = uuid.uuid4(), uuid.uuid4()
    writes = [("write", i * 65536, os.urandom(65536)) for i in range(24)]
    body = bundle(BundleKind.CYCLE, vm, 1, 1, [(disk, 1 << 22, 0, 1 << 22, hrl_bytes(vm, disk, 1, 1, 1 << 22, writes))],
                  compress=False)
    pieces = [body[i:i + 536] for i in range(0, len(body), 536)]
    assert len(pieces) > 2 * IOV_MAX
    spool = tmp_path / "cycle.part"
    writer = SpoolWriter(spool, BundleDecoder(keep_data=False, max_bytes=len(body)))
    await feed_pipelined(writer.feed, _body(pieces), batch_bytes=len(body))
    done = writer.finish()
    assert done.total_bytes == len(body) == writer.bytes
    assert spool.read_bytes() == body
    assert writer.sha.hexdigest() == hashlib.sha256(body).hexdigest()
