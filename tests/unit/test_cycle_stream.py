"""A bitmap-mode cycle streamed from an image and its copy-before-write side file (no spool file)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import uuid

from hvr_common.pure.bundle_decoder import BundleDecoder, BundleDone
from hvr_common.pure.dirty_map import DirtyMap
from hvr_common.pure.hrl import HrlEncoder, HrlHeader, RecordKind, encode_header
from hvr_common.pure.stream_decoder import NEED_DATA
from hvr_agent import shipper
from hvr_agent.cut_snapshot import CutSnapshot
from hvr_agent.cycle_stream import CycleStream
from hvr_agent.journal import log_path

SIZE = 8 * 1024 * 1024
VM_ID = uuid.UUID(int=7)
DISK_ID = uuid.UUID(int=8)


async def _send(disk: shipper.DiskSource, snap: CutSnapshot) -> tuple[bytes, shipper.SpooledBundle]:
    stream = CycleStream(vm_id=VM_ID, generation=2, sequence=5, disks=[disk], compress=True,
                         snapshots={disk.name: snap})
    try:
        body = b"".join([piece async for piece in stream.body()])
    finally:
        await stream.close()
    return body, stream.bundle


def _image_after(body: bytes, before: bytes) -> bytes:
    model = bytearray(before)
    dec = BundleDecoder(keep_data=True, expect={"vm_id": VM_ID, "generation": 2, "sequence": 5,
                                                "disks": {DISK_ID: SIZE}, "streamed": True})
    dec.receive_data(body)
    while (ev := dec.next_event()) is not NEED_DATA:
        if isinstance(ev, BundleDone):
            break
        if isinstance(ev, tuple):
            rec = ev[1]
            model[rec.offset:rec.offset + rec.length] = rec.data if rec.kind is RecordKind.WRITE else bytes(rec.length)
    dec.finish()
    return bytes(model)


def test_a_streamed_cycle_is_the_cut_time_contents_and_the_same_bytes_when_sent_again(tmp_path):
    rng = random.Random(3)
    image = tmp_path / "d.img"
    at_cut = bytearray(rng.randbytes(SIZE))
    at_cut[SIZE // 2:SIZE // 2 + 65536] = bytes(65536)  # a frozen piece of zeroes: a ZERO record
    image.write_bytes(at_cut)
    frozen = DirtyMap(SIZE)
    for offset, length in [(0, 5 * 1024 * 1024), (SIZE // 2, 65536), (SIZE - 4096, 4096)]:
        frozen.mark(offset, length)
    fd = os.open(image, os.O_RDWR)
    snap = CutSnapshot(5, frozen, fd, tmp_path / "d.img.0000000005.cbw", 0)
    header = HrlHeader(VM_ID, DISK_ID, 2, 5, SIZE, 1)  # a bitmap cut ends an empty log too (B1)
    log_path(image, 5).write_bytes(encode_header(header) + HrlEncoder(header).end(2))
    disk = shipper.DiskSource("d", DISK_ID, image, SIZE)
    try:
        first, sent = asyncio.run(_send(disk, snap))
        assert sent.path is None and sent.sha256 == hashlib.sha256(first).hexdigest() and sent.wire_bytes == len(first)
        assert not list((tmp_path).glob("*.bundle")) and not list(tmp_path.glob(".*.tmp"))
        # the guest overwrites blocks of the cycle after it was read once (the upload was cut): copied aside first
        snap.before_change(0, SIZE)
        os.pwrite(fd, bytes(SIZE), 0)
        again, resent = asyncio.run(_send(disk, snap))
        assert again == first and resent.sha256 == sent.sha256
        stale = bytes(rng.randbytes(SIZE))  # what the replica held: every frozen block becomes its cut-time contents
        got = _image_after(first, stale)
        for offset, length in frozen.runs():
            assert got[offset:offset + length] == bytes(at_cut[offset:offset + length])
        assert got[6 * 1024 * 1024:SIZE - 4096] == stale[6 * 1024 * 1024:SIZE - 4096]  # nothing else travels
    finally:
        snap.close()
        os.close(fd)
