"""The agent's cache of a disk's chunk digests, and when a cached digest is still its chunk's (sans I/O).

A compare reads the image into its digest tree (``digest_tree``); most of a
disk did not change since the last one.  The cache keeps the chunk digests of
the last pass and the **written set**: the write-intent regions
(``IntentBitmap``, 4 MiB) a write may have touched since that pass started.
It starts as a copy of the current period's marks (a region already marked
in the period takes writes without being marked again) and from then on
receives every region that enters the period (``note_marks``, called by the
intent bitmap file for each mark).  A chunk is **fresh** when its digest is
known and its region is not in the written set: no write touched it since it
was hashed, so its digest is still its content's (invariant C7,
``docs/resync.md``).  A pass (``Pass``) reads only the chunks that are not
fresh; while it runs, its own written set (started at its start) receives
the marks too, and when it ends its digests become the cache with that set.

The file beside the image (``<image>.digests``, written at a clean close) is
encoded and checked here: any doubt (magic, version, length, checksum,
geometry, the VM, the disk, the image's identity) and it is not used.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from hvr_common.pure import digest_tree as dt
from hvr_common.pure.errors import CorruptError
from hvr_common.pure.intent_bitmap import IntentBitmap

MAGIC = b"HVR-DGC\n"
VERSION = 1
# magic, version, reserved, chunk size, region size, disk size, VM id, disk id,
# image size, mtime_ns, ctime_ns, inode, device (mtime/ctime -1: a block device)
HEADER = struct.Struct("<8sHHIIQ16s16sQqqQQ")
assert HEADER.size == 100
CRC = struct.Struct("<I")
_NOT = bytes.maketrans(b"\x00\x01", b"\x01\x00")  # region flags inverted: 1 = not written


class DigestCacheError(CorruptError):
    """A digest cache file that is not to be used (never shown to a client: the cache is ignored)."""


@dataclass(frozen=True, slots=True)
class ImageIdentity:
    """What says an image is the one the digests were taken of (``image_stamp``'s fields)."""

    size: int
    mtime_ns: int | None
    ctime_ns: int | None
    ino: int
    dev: int


def _runs(flags: Iterable[bool]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for index, flag in enumerate(flags):
        if not flag:
            continue
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


@dataclass(eq=False)
class Pass:
    """One pass over the image: the chunks it must read, the digests it has, its written set."""

    written: IntentBitmap  # regions marked since this pass started (its period's marks at the start included)
    digests: bytearray
    known: bytearray  # per chunk: 1 when ``digests`` holds its digest
    to_read: list[tuple[int, int]] = field(default_factory=list)  # runs (first, end) of chunks not fresh
    spoiled: bool = False  # the cache was forgotten while it ran: its digests are not kept

    def read(self, first: int, end: int) -> None:
        """Chunks ``first`` to ``end`` were read and hashed into ``digests`` during this pass."""
        self.known[first:end] = b"\x01" * (end - first)

    def read_all(self) -> None:
        for first, end in self.to_read:
            self.read(first, end)


class DigestCache:
    """One disk's cached chunk digests, its written set and the passes running."""

    def __init__(self, geometry: dt.Geometry, region_bytes: int):
        if region_bytes % geometry.chunk_size:
            raise ValueError(f"a region ({region_bytes} bytes) must hold whole chunks ({geometry.chunk_size})")
        self.geometry = geometry
        self.region_bytes = region_bytes
        self.chunks = geometry.count(1)
        self.digests = bytearray(self.chunks * dt.DIGEST_SIZE)
        self.known = bytearray(self.chunks)
        self.written = IntentBitmap(geometry.size, region_bytes)
        self.passes: list[Pass] = []

    @property
    def chunks_per_region(self) -> int:
        return self.region_bytes // self.geometry.chunk_size

    def note_marks(self, regions: Iterable[int]) -> None:
        """Regions entering the period (every way they do): written from now on, for the cache and each pass."""
        regions = list(regions)
        self.written.mark(regions)
        for p in self.passes:
            p.written.mark(regions)

    def fresh(self) -> bytearray:
        """Per chunk: 1 when its cached digest is still its content's."""
        per = self.chunks_per_region
        # per chunk, 1 where its region is unwritten: each region's flag repeated for its chunks (byte ops, not a
        # Python loop per chunk: a 1 TiB disk has 16 M chunks and this runs on the event loop)
        unwritten = bytes(self.written.marks).translate(_NOT).replace(b"\x00", b"\x00" * per).replace(
            b"\x01", b"\x01" * per)[:self.chunks]
        both = int.from_bytes(self.known, "little") & int.from_bytes(unwritten, "little")
        return bytearray(both.to_bytes(self.chunks, "little"))

    def begin(self, period: IntentBitmap, reuse: bool = True) -> Pass:
        """A pass starting now (``period``: the marks the write fast path trusts now).  With ``reuse`` the
        fresh chunks' digests are taken from the cache and only the others are to be read."""
        fresh = self.fresh() if reuse else bytearray(self.chunks)
        digests = bytearray(self.digests) if reuse else bytearray(self.chunks * dt.DIGEST_SIZE)
        p = Pass(period.copy(), digests, fresh, _runs(not f for f in fresh))
        self.passes.append(p)
        return p

    def finish(self, p: Pass) -> None:
        """The pass ended: its digests (those it knows) become the cache, with its written set."""
        self.end(p)
        if p.spoiled:
            return
        self.digests, self.known, self.written = p.digests, p.known, p.written

    def end(self, p: Pass) -> None:
        """The pass stops receiving marks (abandoned, or finished)."""
        if p in self.passes:
            self.passes.remove(p)

    def forget(self) -> None:
        """Nothing cached is trusted any more (passes running end unused too)."""
        self.known = bytearray(self.chunks)
        for p in self.passes:
            p.spoiled = True

    def fresh_bytes(self) -> int:
        fresh = self.fresh()
        total = fresh.count(1) * self.geometry.chunk_size
        if fresh and fresh[-1]:  # the last chunk may be short
            total -= self.chunks * self.geometry.chunk_size - self.geometry.size
        return total

    # --- the file beside the image -----------------------------------------------------------------
    def encode(self, vm_id: uuid.UUID, disk_id: uuid.UUID, identity: ImageIdentity) -> bytes:
        header = HEADER.pack(MAGIC, VERSION, 0, self.geometry.chunk_size, self.region_bytes, self.geometry.size,
                             vm_id.bytes, disk_id.bytes, identity.size, _time(identity.mtime_ns),
                             _time(identity.ctime_ns), identity.ino, identity.dev)
        body = header + bytes(self.digests) + bytes(self.known) + bytes(self.written.marks)
        return body + CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, raw: bytes, geometry: dt.Geometry, region_bytes: int, vm_id: uuid.UUID, disk_id: uuid.UUID,
               identity: ImageIdentity) -> DigestCache:
        """The cache a file holds, if it is for this disk of this VM, this geometry and this very image
        (``DigestCacheError`` saying why not)."""
        cache = cls(geometry, region_bytes)
        regions = len(cache.written.marks)
        need = HEADER.size + cache.chunks * (dt.DIGEST_SIZE + 1) + regions + CRC.size
        if len(raw) != need:
            raise DigestCacheError(f"{len(raw)} bytes, not {need}")
        body, (crc,) = raw[:-CRC.size], CRC.unpack(raw[-CRC.size:])
        if zlib.crc32(body) != crc:
            raise DigestCacheError("checksum mismatch")
        (magic, version, _reserved, chunk, region, size, vm, disk, isize, mtime, ctime, ino,
         dev) = HEADER.unpack_from(body)
        if magic != MAGIC or version != VERSION:
            raise DigestCacheError(f"not a digest cache of version {VERSION}")
        if (chunk, region, size) != (geometry.chunk_size, region_bytes, geometry.size):
            raise DigestCacheError(f"another geometry (chunk {chunk}, region {region}, disk {size} bytes)")
        if vm != vm_id.bytes or disk != disk_id.bytes:
            raise DigestCacheError("another VM's or disk's")
        if (isize, mtime, ctime, ino, dev) != (identity.size, _time(identity.mtime_ns), _time(identity.ctime_ns),
                                               identity.ino, identity.dev):
            raise DigestCacheError("the image is not the one it was taken of")
        pos = HEADER.size
        cache.digests = bytearray(body[pos:pos + cache.chunks * dt.DIGEST_SIZE])
        pos += cache.chunks * dt.DIGEST_SIZE
        cache.known = bytearray(body[pos:pos + cache.chunks])
        pos += cache.chunks
        marks = body[pos:pos + regions]
        if any(b > 1 for b in cache.known) or any(b > 1 for b in marks):
            raise DigestCacheError("flags other than 0 and 1")
        cache.written.mark([r for r, m in enumerate(marks) if m])
        return cache


def _time(ns: int | None) -> int:
    return -1 if ns is None else ns
