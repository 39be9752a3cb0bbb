"""Initial-replication media: the manifest, its digest, the chunk grid (docs/initial-media.md).

Media is a folder written by ``hvrctl initial export`` on the primary and read
by ``hvrctl initial import`` on the replica server: ``manifest.json`` and one
file per chunk of every disk that holds data.  A disk is cut into a grid of
``chunk_bytes`` pieces; a piece that is a hole or reads as zeroes has no file
(the media is sparse).  Every chunk file carries its blake3 digest in the
manifest, and the manifest carries the blake3 digest of its own canonical form
(every field but ``manifest_blake3``, as compact JSON with sorted keys).

No I/O here: :class:`Manifest` is built and checked from values; the daemons
read and write the files.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import blake3

from hvr_common.pure.errors import UsageError
from hvr_common.pure.wire.error_catalogue import error

FORMAT = "hvr-initial-media"
VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


def corrupt(message: str, hint: str = "export the VM again") -> Exception:
    """``media_corrupt``: a chunk or the manifest does not match its digest, or the manifest is malformed."""
    return error("media_corrupt", message, hint=hint)


def digest(data: bytes | memoryview) -> str:
    """The blake3 digest of ``data`` (hex), as chunk digests are written in the manifest."""
    return blake3.blake3(data).hexdigest()


def chunk_name(disk_id: uuid.UUID, offset: int) -> str:
    """Path of a chunk file inside the media folder."""
    return f"{disk_id}/{offset:016x}.chunk"


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    length: int
    blake3: str

    def to_json(self) -> dict:
        return {"offset": self.offset, "length": self.length, "blake3": self.blake3}


@dataclass(frozen=True, slots=True)
class MediaDisk:
    disk_id: uuid.UUID
    name: str
    size_bytes: int
    chunks: tuple[Chunk, ...]

    @property
    def data_bytes(self) -> int:
        return sum(c.length for c in self.chunks)

    def to_json(self) -> dict:
        return {"disk_id": str(self.disk_id), "name": self.name, "size_bytes": self.size_bytes,
                "chunks": [c.to_json() for c in self.chunks]}


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the media holds: one point of every disk of one VM.

    ``base_sequence`` is the point: the VM's cut S.  The images were read
    after that cut while the VM kept writing, so a chunk may hold writes made
    after S; they are all in the logs S + 1, S + 2, ... which the primary
    ships as cycles after the import, so the replica converges.
    """

    vm_id: uuid.UUID
    vm_name: str
    generation: int
    base_sequence: int
    created_ns: int
    chunk_bytes: int
    disks: tuple[MediaDisk, ...]

    @property
    def data_bytes(self) -> int:
        return sum(d.data_bytes for d in self.disks)

    def body(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "vm_id": str(self.vm_id), "vm_name": self.vm_name,
                "generation": self.generation, "base_sequence": self.base_sequence, "created_ns": self.created_ns,
                "chunk_bytes": self.chunk_bytes, "disks": [d.to_json() for d in self.disks]}

    def digest(self) -> str:
        return digest(_canonical(self.body()))

    def encode(self) -> bytes:
        """``manifest.json``: the body and its own digest, indented for people."""
        return (json.dumps({**self.body(), "manifest_blake3": self.digest()}, indent=1) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        """Parse and check ``manifest.json``: its digest, its fields, its chunk grid; media_corrupt if not."""
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(f"the manifest is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise corrupt("the manifest is not a JSON object")
        if doc.get("format") != FORMAT:
            raise corrupt(f"not hvr initial-replication media (format {doc.get('format')!r})")
        if doc.get("version") != VERSION:
            raise UsageError(f"media format version {doc.get('version')!r} is not supported (this hvr reads "
                             f"version {VERSION})", hint="import it with the hvr version that exported it")
        stated = doc.pop("manifest_blake3", None)
        if not isinstance(stated, str) or digest(_canonical(doc)) != stated:
            raise corrupt("the manifest does not match its digest (manifest_blake3): it was changed or damaged")
        try:
            manifest = cls(uuid.UUID(doc["vm_id"]), str(doc["vm_name"]), _int(doc["generation"]),
                           _int(doc["base_sequence"]), _int(doc["created_ns"]), _int(doc["chunk_bytes"]),
                           tuple(_disk(d) for d in doc["disks"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise corrupt(f"the manifest is malformed: {exc!r}") from None
        manifest.check_grid()
        return manifest

    def check_grid(self) -> None:
        """Chunks lie on the grid, in order, inside their disk."""
        if self.chunk_bytes <= 0:
            raise corrupt("chunk_bytes must be positive")
        for disk in self.disks:
            end = 0
            for c in disk.chunks:
                if (c.offset % self.chunk_bytes or c.offset < end or c.length <= 0 or c.length > self.chunk_bytes
                        or c.offset + c.length > disk.size_bytes):
                    raise corrupt(f"chunk at {c.offset} of disk {disk.name} is off the grid")
                end = c.offset + c.length


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _int(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _disk(d: dict) -> MediaDisk:
    chunks = tuple(Chunk(_int(c["offset"]), _int(c["length"]), str(c["blake3"])) for c in d["chunks"])
    return MediaDisk(uuid.UUID(d["disk_id"]), str(d["name"]), _int(d["size_bytes"]), chunks)


def grid(size_bytes: int, chunk_bytes: int, data_extents) -> list[tuple[int, int]]:
    """The chunks ``(offset, length)`` of a disk that touch data, from its ``(offset, length)`` data extents."""
    out: list[tuple[int, int]] = []
    for offset, length in data_extents:
        first = offset // chunk_bytes * chunk_bytes
        for start in range(first, offset + length, chunk_bytes):
            if out and out[-1][0] >= start:
                continue
            out.append((start, min(chunk_bytes, size_bytes - start)))
    return out
