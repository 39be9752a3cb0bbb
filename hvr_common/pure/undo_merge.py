"""Undo history: merging two adjacent points' undo logs, and laying logs over an image (pure).

Point A (older) and point B (its successor) have undo logs U_A and U_B.
Thinning removes B: the merged log M keeps A's identity and holds, for every
byte, A's pre-image where U_A has one and else B's.  Laying M over an image
gives the same bytes as laying U_B and then U_A (``docs/undo-format.md``,
section "Merging").

:func:`merge_plan` works on decoded records without their data: each piece
names the log it comes from and the position of its first byte there, so a
shell can copy the pieces from file to file, one at a time.  :func:`merge_logs`
carries the plan out on two logs held in memory.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, MutableSequence, Sequence
from dataclasses import dataclass

from hvr_common.pure.undo import UndoEncoder, UndoHeader, UndoKind, UndoRecord
from hvr_common.pure.undo_decoder import decode_bytes
from hvr_common.pure.undo_capture import CapturedSet


@dataclass(frozen=True, slots=True)
class MergePiece:
    """One record of the merged log: a range of a DATA or HOLE record of one of the two inputs."""

    disk_id: uuid.UUID
    offset: int
    length: int
    kind: UndoKind
    from_older: bool  # True: from the older log (A), False: from the newer one (B)
    source: int | None  # DATA: position, in its input log, of the byte at offset; HOLE: None


def merged_header(older: UndoHeader, newer: UndoHeader) -> UndoHeader:
    """The header of the merged log: A's point, merged through B's newest point."""
    if older.vm_id != newer.vm_id:
        raise ValueError(f"undo logs of different VMs: {older.vm_id} and {newer.vm_id}")
    if not older.merged_through < newer.point_id:
        raise ValueError(f"undo log of point {older.point_id} (merged through {older.merged_through}) "
                         f"is not older than point {newer.point_id}")
    if older.sequence > newer.sequence:
        raise ValueError(f"older point stands at sequence {older.sequence}, after the newer one's "
                         f"{newer.sequence}")
    return UndoHeader(older.vm_id, older.point_id, older.sequence, newer.merged_through, older.created_ns)


def _piece(record: UndoRecord, offset: int, length: int, from_older: bool) -> MergePiece:
    source = record.data_position + (offset - record.offset) if record.kind is UndoKind.DATA else None
    return MergePiece(record.disk_id, offset, length, record.kind, from_older, source)


def merge_plan(older: Iterable[UndoRecord], newer: Iterable[UndoRecord]) -> list[MergePiece]:
    """The merged log's records, sorted by (disk, offset), disjoint: A's records whole, B's
    records cut to the bytes A has no pre-image of.  Overlapping records within either
    log raise :class:`UndoCorruptError`."""
    older = list(older)
    newer = list(newer)
    covered = CapturedSet.from_records(older)
    CapturedSet.from_records(newer)  # checks that B's records are disjoint too
    pieces = [_piece(r, r.offset, r.length, True) for r in older]
    for record in newer:
        for offset, length in covered.uncaptured(record.disk_id, record.offset, record.length):
            pieces.append(_piece(record, offset, length, False))
    pieces.sort(key=lambda p: (p.disk_id.bytes, p.offset))
    return pieces


def merge_logs(older: bytes, newer: bytes, closed_ns: int) -> bytes:
    """Merge two closed undo logs held in memory into one closed log (the bytes of the new file)."""
    older_header, older_records, older_summary = decode_bytes(older, keep_data=False)
    newer_header, newer_records, newer_summary = decode_bytes(newer, keep_data=False)
    older_summary.require_clean(f"undo log of point {older_header.point_id}")
    newer_summary.require_clean(f"undo log of point {newer_header.point_id}")
    encoder = UndoEncoder(merged_header(older_header, newer_header))
    out = bytearray(encoder.header_bytes())
    with memoryview(older) as a, memoryview(newer) as b:
        for piece in merge_plan(older_records, newer_records):
            if piece.kind is UndoKind.HOLE:
                out += encoder.hole(piece.disk_id, piece.offset, piece.length)
            else:
                data = (a if piece.from_older else b)[piece.source:piece.source + piece.length]
                out += encoder.data(piece.disk_id, piece.offset, data)
                out += data
    out += encoder.end(closed_ns)
    return bytes(out)


def lay_over(images: Mapping[uuid.UUID, MutableSequence[int]], records: Iterable[UndoRecord]) -> None:
    """Lay one undo log's records over in-memory images (``bytearray`` per disk): DATA puts its
    bytes back, HOLE leaves zeroes.  Records need their data (decoded with keep_data)."""
    for record in records:
        image = images.get(record.disk_id)
        if image is None:
            raise ValueError(f"undo record at {record.position} names unknown disk {record.disk_id}")
        if record.end > len(image):
            raise ValueError(f"undo record [{record.offset}, {record.end}) beyond disk {record.disk_id} "
                             f"of {len(image)} bytes")
        if record.kind is UndoKind.HOLE:
            image[record.offset:record.end] = bytes(record.length)
        elif record.data is None:
            raise ValueError(f"undo DATA record at {record.position} decoded without its data")
        else:
            image[record.offset:record.end] = record.data


def reach_point(images: Mapping[uuid.UUID, MutableSequence[int]],
                logs: Sequence[tuple[UndoHeader, Sequence[UndoRecord]]]) -> None:
    """Turn the newest state into point k: lay the logs of the points newest..k, newest first.

    ``logs`` are (header, records) pairs; each log must belong to an older point than
    the one before it, and all to one VM.  The newest log may be open (its valid
    records); every other one must have been read clean by the caller.
    """
    for (newer, _), (older, _) in zip(logs, logs[1:]):
        merged_header(older, newer)  # same VM, points in order
    for _, records in logs:
        lay_over(images, records)


def superseded(headers: Iterable[UndoHeader]) -> list[int]:
    """Point ids whose logs a merged log already holds: left behind when a merge stopped
    between its rename and the deletion of the newer log.  They are deleted at start."""
    out = []
    through = -1
    for header in sorted(headers, key=lambda h: h.point_id):
        if header.point_id <= through:
            out.append(header.point_id)
        through = max(through, header.merged_through)
    return out
