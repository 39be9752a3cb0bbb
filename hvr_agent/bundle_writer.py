"""Where a bundle's frames go: a spool file (cycles) or memory (initial windows).

The writers collect each disk's frames after the bundle header, keep the
totals the header needs, and finish the bundle once its header is known:
its digest, and for a spool file the file itself.  What goes into the
frames is :mod:`hvr_agent.shipper`'s business.

Write order of a cycle's spool file (``<outbox>/<vm>/<sequence:010d>.bundle``):

1. a temporary file is created and the header's space is left as zeroes;
2. each disk's frames are appended;
3. the header (which needs every disk's frame totals) is written at offset 0;
4. the SHA-256 of the whole file is computed by reading it back;
5. the file is renamed to its final name.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from hvr_common.pure.bundle import BundleHeader, DiskEntry, FrameEncoder, header_size
from hvr_common.pure.hrl import HrlEncoder

_READ_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SpooledBundle:
    path: Path
    sha256: str
    wire_bytes: int  # the file's size: what travels
    raw_bytes: int  # the HRL bytes inside, uncompressed
    write_bytes: int  # WRITE payload bytes inside
    frames: int
    compressed_frames: int
    cut_ns: int  # cycle: when its logs were closed (newest END time); initial: when it was built


def spool_path(outbox: Path, sequence: int) -> Path:
    return outbox / f"{sequence:010d}.bundle"


class BundleWriter:
    """Collects a bundle's frames after its header; keeps the totals the header needs."""

    def __init__(self) -> None:
        self.entries: list[DiskEntry] = []
        self.raw_bytes = 0
        self.write_bytes = 0
        self.frames = 0
        self.compressed_frames = 0

    def write(self, pieces: list[bytes]) -> None:
        raise NotImplementedError

    def add_disk(self, disk_id: uuid.UUID, encoder: FrameEncoder, hrl: HrlEncoder,
                 range_start: int, range_end: int) -> None:
        self.write(encoder.finish())
        self.entries.append(DiskEntry(disk_id, encoder.stored_bytes, encoder.raw_bytes, range_start, range_end,
                                      encoder.frames))
        self.raw_bytes += encoder.raw_bytes
        self.write_bytes += hrl.write_bytes
        self.frames += encoder.frames
        self.compressed_frames += encoder.compressed_frames


class SpoolWriter(BundleWriter):
    """Appends frames after a reserved header, then writes the header and digests the file."""

    def __init__(self, final: Path, disk_count: int):
        super().__init__()
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.file.write(bytes(header_size(disk_count)))

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.file.write(piece)

    def commit(self, header: BundleHeader, cut_ns: int) -> SpooledBundle:
        try:
            self.file.seek(0)
            self.file.write(header.encode())
            self.file.close()
            digest = hashlib.sha256()
            size = 0
            with open(self.tmp, "rb", buffering=0) as f:
                while chunk := f.read(_READ_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
            os.replace(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        return SpooledBundle(self.final, digest.hexdigest(), size, self.raw_bytes, self.write_bytes,
                             self.frames, self.compressed_frames, cut_ns)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


@dataclass(frozen=True, slots=True)
class MemoryBundle:
    """A bundle held in memory as its pieces, header first: an initial window on its way."""

    pieces: tuple[bytes | memoryview, ...]
    sha256: str
    wire_bytes: int
    write_bytes: int  # WRITE payload bytes inside
    compressed_frames: int


class MemoryWriter(BundleWriter):
    """Keeps the frames in memory as they are made; the digest is taken once the header is known."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[bytes | memoryview] = []

    def write(self, pieces: list[bytes]) -> None:
        self.pieces += pieces

    def commit(self, header: BundleHeader) -> MemoryBundle:
        pieces = (header.encode(), *self.pieces)
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        return MemoryBundle(pieces, digest.hexdigest(), sum(len(p) for p in pieces), self.write_bytes,
                            self.compressed_frames)
