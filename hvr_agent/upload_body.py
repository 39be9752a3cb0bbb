"""Upload bodies of the replica client: a spool file, a list of pieces or a stream, each cut into pieces the
agent's bandwidth throttle paces (:mod:`hvr_agent.throttle`), never a whole file in memory at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiofiles

from hvr_agent.throttle import Throttle

UPLOAD_CHUNK_BYTES = 1024 * 1024  # read from a spool file at a time


async def stream_file(path: Path, size: int, throttle: Throttle):
    """The spool file's bytes, in pieces, never the whole file at once."""
    left = size
    async with aiofiles.open(path, "rb") as f:
        while left > 0:
            chunk = await f.read(min(UPLOAD_CHUNK_BYTES, left))
            if not chunk:
                raise OSError(f"spool file {path} is shorter than {size} bytes")
            left -= len(chunk)
            async for piece in throttle.pieces(chunk):
                yield piece


async def stream_pieces(pieces: Sequence[bytes], throttle: Throttle):
    for chunk in pieces:
        async for piece in throttle.pieces(chunk):
            yield piece


async def stream_body(body: AsyncIterator[bytes], throttle: Throttle):
    async for chunk in body:
        async for piece in throttle.pieces(chunk):
            yield piece
