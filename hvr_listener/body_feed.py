"""An uploaded bundle body (an initial window or a cycle): fed to its writer, checked, its errors named.

Both uploads share this: the length limit before anything is received, the
batched feeding of the received pieces to a worker thread, the check that
the body is all there and matches its signed digest, and the mapping of
damaged data to 400 (the sender's problem, whatever layer noticed it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.shell.threads import finish_in_thread
from hvr_common.pure.wire.error_catalogue import error
from hvr_listener.bundle_io import DirectWindowWriter, SpoolWriter

FEED_BATCH_BYTES = 4 * 1024 * 1024


class TooLargeError(UsageError):
    code = "body_too_large"


class LengthRequiredError(UsageError):
    code = "length_required"


def check_length(length: int | None, max_bytes: int) -> None:
    """An upload names its length, within this server's limit (411, 413)."""
    if length is None:
        raise LengthRequiredError("bundle uploads need a Content-Length header")
    if length > max_bytes:
        raise TooLargeError(f"bundle of {length} bytes exceeds this server's limit of {max_bytes}")


async def feed_checked(writer: SpoolWriter | DirectWindowWriter, body: AsyncIterator[bytes], length: int,
                       digest: str) -> None:
    """Feed the whole body to ``writer``, then check it is all there and is what was signed."""
    await feed_pipelined(writer.feed, body)
    check_body_end(writer.bytes, length, writer.sha.hexdigest(), digest)


def check_body_end(received: int, length: int, actual_digest: str, digest: str) -> None:
    """The body is all there and is what was signed; else 400 with the reason."""
    if received != length:
        raise error("body_truncated", f"body ended after {received} of {length} bytes")
    if actual_digest != digest:
        raise error("digest_mismatch", "body does not match its X-Hvr-Content-SHA256 digest")


def as_body_error(exc: HvrError) -> HvrError:
    """Damaged bundle data is the sender's problem (400 ``bundle_corrupt``), whatever layer noticed it."""
    if exc.code in ("corrupt", "hrl_corrupt"):
        return error("bundle_corrupt", exc.message)
    return exc


async def feed_pipelined(feed: Callable[[list], None], body: AsyncIterator[bytes],
                         batch_bytes: int = FEED_BATCH_BYTES) -> None:
    """``feed(chunks)`` in a worker thread for each batch of received chunks, in order,
    while the next batch arrives.

    The chunks are the pieces the connection received, gathered into a list of
    about ``batch_bytes`` (never joined: that would copy every byte once more);
    a batch goes to the thread as soon as the one before it is done, so the
    sender is not held up by hashing, decoding and writing.  ``feed`` runs for
    one batch at a time; an error from it stops the reading and is raised after
    the thread has ended.
    """
    pending: asyncio.Future | None = None
    batch: list = []
    size = 0
    try:
        async for chunk in body:
            batch.append(chunk)
            size += len(chunk)
            if size < batch_bytes and (size < batch_bytes // 4 or (pending is not None and not pending.done())):
                continue  # gather more while the thread is busy (and never hand it a sliver)
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(finish_in_thread(feed, batch))
            batch, size = [], 0
        if pending is not None:
            await pending
        if batch:
            await finish_in_thread(feed, batch)
    except BaseException:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])  # never leave a thread writing behind the caller
        raise
