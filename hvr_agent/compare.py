"""Comparing a VM's disks with its replica by digest tree (the compare engine's shell on the primary).

Per disk: the image is read into its tree in one pass (``digest_scan.scan``,
in a worker thread; only the chunks written since the last pass, the rest
from the disk's digest cache, :mod:`hvr_agent.digest_cache`), then a
:class:`~hvr_common.pure.digest_tree.Descent` asks the replica for the digests of the nodes it needs
(``POST /v1/replicas/{vm_id}/digests/{disk_id}``) and descends only below the
nodes that differ; blocks (level 0) are hashed from the image when asked.
Differing blocks are handed to ``on_differences`` as they are found, so a
resync re-journals them while the compare goes on.

The primary's image is live while it is read.  That is correct for a resync
(``docs/resync.md``, "Why a live compare converges"); a verify excludes the
ranges written since the replica's point (:func:`written_since`).

A ``DiskCompare`` keeps its descent, so a compare suspended between queries
continues where it stopped.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hvr_common.pure import byte_ranges as br
from hvr_common.pure import digest_tree as dt
from hvr_common.pure.errors import NotFoundError
from hvr_common.pure.hrl import Record
from hvr_common.pure.wire.messages import DigestQuery
from hvr_common.shell import digest_scan
from hvr_common.shell.hrl_file import iter_hrl_file
from hvr_common.shell.threads import finish_in_thread
from hvr_agent import digest_cache
from hvr_agent.journal import list_logs
from hvr_agent.relationship import Stopped
from hvr_agent.replica_client import ReplicaClient
from hvr_agent.tracker import TrackedDisk

NS = 1_000_000_000
IN_FLIGHT = 2  # questions out at once: one answered while the next is computed on both sides


@dataclass
class CompareProgress:
    """Counters of one compare (resync or verify), shown by ``vm get`` and the progress bar."""

    total_bytes: int = 0
    scanned_bytes: int = 0  # read and hashed on this side (holes included)
    cached_bytes: int = 0  # taken from the digest cache: not written since they were hashed
    compared_bytes: int = 0  # proven equal, or found different
    differing_bytes: int = 0
    sent_bytes: int = 0  # re-journaled for the next cycle (resync)
    resumed_bytes: int = 0  # compared before a restart of the agent, continued from a checkpoint (resync)
    started_ns: int = field(default_factory=time.time_ns)
    applied_sequences: set[int] = field(default_factory=set)  # the replica's applied sequence at each answer

    def done_fraction(self) -> float:
        if not self.total_bytes:
            return 1.0
        # the scan is most of the time; the descent's questions the rest
        hashed = self.scanned_bytes + self.cached_bytes
        return min(1.0, 0.8 * hashed / self.total_bytes + 0.2 * self.compared_bytes / self.total_bytes)

    def eta_s(self, now_ns: int | None = None) -> float | None:
        fraction = self.done_fraction()
        if fraction <= 0.0:
            return None
        elapsed = ((now_ns or time.time_ns()) - self.started_ns) / NS
        return round(elapsed * (1 - fraction) / fraction, 1)

    def to_json(self) -> dict:
        return {"total_bytes": self.total_bytes, "scanned_bytes": self.scanned_bytes, "cached_bytes": self.cached_bytes,
                "compared_bytes": self.compared_bytes, "differing_bytes": self.differing_bytes,
                "sent_bytes": self.sent_bytes, "resumed_bytes": self.resumed_bytes, "eta_s": self.eta_s(),
                "percent": round(100 * self.done_fraction(), 1)}


OnDifferences = Callable[[TrackedDisk, list[br.Range]], Awaitable[None]]
AfterAnswer = Callable[[], Awaitable[None]]


class DiskCompare:
    """One disk's compare with its replica; ``run`` may be cancelled and run again to continue."""

    def __init__(self, disk: TrackedDisk, progress: CompareProgress, purpose: str = "verify"):
        self.disk = disk
        self.geometry = dt.Geometry(disk.size)
        self.progress = progress
        self.purpose = purpose  # of its digest queries: "resync" (the replica is not trusted meanwhile) or "verify"
        self.tree: dt.DigestTree | None = None
        self.descent = dt.Descent(self.geometry)
        self.differing: list[br.Range] = []
        self.restored_ranges = 0  # differing ranges found before a restart (resync checkpoint)
        self._compared_before = 0
        self._in_flight: collections.deque[tuple[dt.Query, asyncio.Future]] = collections.deque()

    def pending_runs(self) -> list[tuple[int, int, int]]:
        """What is left to compare, the questions out unanswered included (a checkpoint's view)."""
        return self.descent.pending_runs([query for query, _answer in self._in_flight])

    def resume(self, runs, compared_bytes: int, differing_ranges: int, tree: dt.DigestTree | None) -> None:
        """Continue from a checkpoint: ``runs`` still to compare (``CorruptError`` if outside the tree)."""
        self.descent = dt.Descent.resumed(self.geometry, runs, compared_bytes)
        self._compared_before = compared_bytes
        self.restored_ranges = differing_ranges
        self.tree = tree

    @property
    def done(self) -> bool:
        return self.tree is not None and self.descent.done

    async def run(self, client: ReplicaClient, vm_id: uuid.UUID, on_differences: OnDifferences | None,
                  keep_going: Callable[[], bool] | None = None, after_answer: AfterAnswer | None = None) -> None:
        """Compare (or continue comparing); ``keep_going()`` False between two questions stops it (``Stopped``).

        Overlapped: the first question goes to the replica while this side's image is still being read
        (the replica reads its own meanwhile), and up to ``IN_FLIGHT`` questions are out at once, each
        answered by both sides in parallel; answers are taken in the order asked.  ``after_answer()`` runs
        after each answer was acted on (a checkpoint: :meth:`pending_runs` is consistent then)."""
        scan = self._start_scan()
        self._in_flight = in_flight = collections.deque()
        try:
            while True:
                while len(in_flight) < IN_FLIGHT:
                    if keep_going is not None and not keep_going():
                        raise Stopped()
                    query = self.descent.next_query()
                    if query is None:
                        break
                    in_flight.append((query, asyncio.ensure_future(self._ask(client, vm_id, query, scan))))
                if not in_flight:
                    break
                query, answer = in_flight[0]
                ours, theirs, applied = await answer
                in_flight.popleft()
                await self._take(query, ours, theirs, applied, on_differences)
                if after_answer is not None:
                    await after_answer()
            if scan is not None:
                self.tree = await scan  # an empty disk asks nothing
        except BaseException:
            for query, _answer in reversed(in_flight):
                self.descent.requeue(query)  # asked again when the compare continues
            answers = [answer for _query, answer in in_flight]
            in_flight.clear()
            await _settle(answers + ([scan] if scan is not None else []))
            if scan is not None and not scan.cancelled() and scan.exception() is None:
                self.tree = scan.result()  # read already: not again when the compare continues
            raise

    def _start_scan(self) -> asyncio.Future | None:
        """This side's tree, read in a worker thread (None: read already): the chunks the digest cache does not
        vouch for are read, the others' digests taken from it; the new digests become the cache."""
        if self.tree is not None:
            return None
        progress = self.progress
        base = progress.scanned_bytes
        disk = self.disk
        p = digest_cache.begin_pass(disk)
        only = None if p is None else p.to_read
        if p is not None:
            progress.cached_bytes += disk.size - br.total(br.clip(
                [(a * self.geometry.chunk_size, b * self.geometry.chunk_size) for a, b in only], disk.size))

        def scanned(n: int) -> None:
            progress.scanned_bytes = base + n

        def ended(future: asyncio.Future) -> None:
            completed = not future.cancelled() and future.exception() is None
            if completed and p is not None:
                p.read_all()
            digest_cache.end_pass(disk, p, completed)

        future = asyncio.ensure_future(finish_in_thread(
            functools.partial(digest_scan.scan, disk.device.fd, self.geometry, scanned, only=only,
                              digests=None if p is None else p.digests)))
        future.add_done_callback(ended)
        return future

    async def _ask(self, client: ReplicaClient, vm_id: uuid.UUID, query: dt.Query,
                   scan: asyncio.Future | None) -> tuple[list[bytes], list[bytes], int]:
        """Both sides' digests of a query's nodes: the replica's over the link while ours are computed."""
        remote = asyncio.ensure_future(client.digests(
            vm_id, self.disk.identity.disk_id,
            DigestQuery(self.geometry.size, query.level, query.indices, self.purpose)))
        try:
            if query.level == 0:
                ours = await finish_in_thread(digest_scan.block_digests, self.disk.device.fd, self.geometry,
                                              query.indices)
            else:
                if scan is not None:
                    self.tree = await asyncio.shield(scan)
                ours = self.tree.digests(query.level, query.indices)
            raw, applied = await remote
        except BaseException:
            await _settle([remote])
            raise
        return ours, dt.decode_digests(raw, len(query.indices)), applied

    async def _take(self, query: dt.Query, ours: list[bytes], theirs: list[bytes], applied: int,
                    on_differences: OnDifferences | None) -> None:
        progress = self.progress
        progress.applied_sequences.add(applied)
        found_before = len(self.descent.differing_blocks)
        self.descent.answer(query, ours, theirs)
        progress.compared_bytes += self.descent.compared_bytes - self._compared_before
        self._compared_before = self.descent.compared_bytes
        blocks = self.descent.differing_blocks[found_before:]
        found = br.from_indices(blocks, self.geometry.block_size, self.geometry.size)
        if not found:
            return
        if on_differences is not None:
            try:
                await on_differences(self.disk, found)
            except BaseException:
                # not sent (stopped, the disk closing): compared again when the compare continues
                self.descent.reopen(blocks)
                self._compared_before = self.descent.compared_bytes
                progress.compared_bytes -= br.total(found)
                raise
        progress.differing_bytes += br.total(found)
        self.differing = br.union(self.differing, found)


async def _settle(futures: list[asyncio.Future]) -> None:
    """Cancel what is still running and wait for it (worker threads finish); failures are the caller's."""
    for future in futures:
        future.cancel()
    if futures:
        await asyncio.wait(futures)
    for future in futures:
        if not future.cancelled():
            future.exception()  # retrieved: the caller raises its own


def written_since(disk: TrackedDisk, sequence: int) -> list[br.Range]:
    """The ranges every log of ``disk`` after ``sequence`` touches (closed and active; blocking).

    The active log's buffer must have been handed to the kernel (``drain``) by the caller; a torn tail
    is the end of a log."""
    ranges: list[br.Range] = []
    for seq, path in list_logs(disk.log_base):
        if seq <= sequence:
            continue
        try:
            for item in iter_hrl_file(path, keep_data=False):
                if isinstance(item, Record):
                    ranges.append((item.offset, item.offset + item.length))
        except (FileNotFoundError, NotFoundError):
            continue  # shipped and deleted meanwhile: the verify sees the acknowledgement and tries again
    return br.normalise(ranges)
