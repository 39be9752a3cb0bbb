"""A bitmap-mode cycle streamed into its upload body: built from the disks as it is sent, no spool file.

A :class:`CycleStream` is one attempt at sending cycle *k*: a worker thread
reads the cut-time contents of the frozen blocks (through each disk's
:class:`~hvr_agent.cut_snapshot.CutSnapshot`: the image, or the
copy-before-write side file), coalesces them into HRL records, frames them
(zstd, raw where a frame does not shrink) in the bundle's *streamed* form
(``docs/replication-protocol.md``: the header's disk table carries no totals,
each disk's frames end with an end-of-disk frame) and hands the bytes to the
upload body through a short queue, so at most ``QUEUE_BATCHES`` batches are
held in memory and nothing is written to the primary's disks.  The SHA-256
and the totals are known once the body has been read to its end; the commit
request carries them.

Sending the cycle again (a dropped connection) makes a new stream from the
same snapshots: copy-before-write stays armed until the cycle is
acknowledged, so the bytes are the same and so is the digest (protocol P4).
A snapshot that gave up copy-before-write raises
:class:`~hvr_agent.cut_snapshot.SnapshotAbandoned` in the thread (at its next
read, or while the thread waits for a stuck upload); it ends the body early
and is kept in ``error`` for the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import uuid

from hvr_common.pure.bundle import END_FRAME, BundleHeader, BundleKind, DiskEntry, FrameEncoder
from hvr_common.pure.hrl import HrlEncoder
from hvr_agent import shipper
from hvr_agent.cut_snapshot import SnapshotAbandoned

BATCH_BYTES = 1024 * 1024  # the body's pieces are batches of about this size
QUEUE_BATCHES = 8  # batches made ahead of the upload
_POLL_S = 0.2


class _Stopped(Exception):
    """The upload ended before the stream did: the thread stops."""


class _StreamWriter(shipper.BundleWriter):
    """Frames go to ``emit`` in batches (copied: the framer reuses its buffer), hashed and counted."""

    def __init__(self, emit) -> None:
        super().__init__()
        self.emit = emit
        self.sha = hashlib.sha256()
        self.size = 0
        self._batch: list[bytes] = []
        self._batch_bytes = 0

    def write(self, pieces) -> None:
        for piece in pieces:
            data = bytes(piece)
            self.sha.update(data)
            self.size += len(data)
            self._batch.append(data)
            self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self.emit(batch)

    def add_disk(self, disk_id: uuid.UUID, encoder: FrameEncoder, hrl: HrlEncoder,
                 range_start: int, range_end: int) -> None:
        super().add_disk(disk_id, encoder, hrl, range_start, range_end)
        self.write([END_FRAME])


class CycleStream:
    """One attempt at sending a cycle: iterate :meth:`body` (once), then read ``bundle`` (or ``error``)."""

    def __init__(self, *, vm_id: uuid.UUID, generation: int, sequence: int, disks: list[shipper.DiskSource],
                 compress: bool, snapshots: dict):
        self._args = dict(vm_id=vm_id, generation=generation, sequence=sequence, disks=disks, compress=compress,
                          snapshots=snapshots)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._stop = threading.Event()
        self._thread: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()
        self.failed = asyncio.Event()  # set (from the thread) when ``error`` is
        self.bundle: shipper.SpooledBundle | None = None  # what was sent (``path`` None: never spooled)
        self.error: BaseException | None = None  # what ended the stream early (SnapshotAbandoned, OSError, ...)

    async def body(self):
        """The upload body, as it is made; raises what stopped the build."""
        self._thread = asyncio.ensure_future(asyncio.to_thread(self._produce))
        while True:
            item = await asyncio.to_thread(self._get)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            for piece in item:
                yield piece

    async def close(self) -> None:
        """Stop the thread (if the body was not read to its end) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.wait([self._thread])

    # --- the worker thread ---------------------------------------------------------------
    def _produce(self) -> None:
        a = self._args
        try:
            scans, created_ns = shipper.scan_cycle(a["disks"], a["sequence"])
            writer = _StreamWriter(self._put)
            entries = tuple(DiskEntry(d.disk_id, 0, 0, 0, d.size_bytes, 0) for d in a["disks"])
            writer.write([BundleHeader(BundleKind.CYCLE, a["vm_id"], a["generation"], a["sequence"], created_ns,
                                       entries, streamed=True).encode()])
            shipper.write_cycle(writer, scans, created_ns, **a)
            writer.flush()
            self.bundle = shipper.SpooledBundle(None, writer.sha.hexdigest(), writer.size, writer.raw_bytes,
                                                writer.write_bytes, writer.frames, writer.compressed_frames,
                                                created_ns)
            self._put(None)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the body, which raises it in the event loop
            self.error = exc
            self._loop.call_soon_threadsafe(self.failed.set)  # the upload may be stuck: its sender stops it
            try:
                self._put(exc)
            except _Stopped:
                pass

    def _put(self, item) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped()
            gave_up = [s.gave_up for s in self._args["snapshots"].values() if s.gave_up]
            if gave_up and item is not None and not isinstance(item, BaseException):
                raise SnapshotAbandoned(gave_up[0])  # noticed while the upload is stuck, too
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _get(self):
        while not self._stop.is_set():
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None
