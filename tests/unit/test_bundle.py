"""The bundle codec on its own: round trip, and every kind of damage refused."""

from __future__ import annotations

import os
import struct
import uuid

import pytest
import zstandard

from bundles import bundle, hrl_bytes
from hvr_common.pure.bundle import FRAME, BundleCorruptError, BundleKind, header_size
from hvr_common.pure.bundle_decoder import BundleDecoder, BundleDone
from hvr_common.pure.stream_decoder import NEED_DATA

SIZE = 1 << 20


def _decode(raw: bytes, expect: dict | None = None, chunk: int | None = None, *, reuse: bool = False,
            lend: bool = False):
    """Records of ``raw`` fed whole or in ``chunk``-sized pieces.

    With ``reuse`` every piece is a view of one buffer that is scribbled over and
    resized once the decoder answered NEED_DATA (as a receiver reusing its
    buffer does): that fails or corrupts records if the decoder kept any of it.
    """
    dec = BundleDecoder(keep_data=True, lend_data=lend, expect=expect)
    records = []
    pieces = [raw] if chunk is None else [raw[i:i + chunk] for i in range(0, len(raw), chunk)]
    reused = bytearray()
    for piece in pieces:
        if reuse:
            reused[:] = piece
            piece = memoryview(reused)
        dec.receive_data(piece)
        while (ev := dec.next_event()) is not NEED_DATA:
            if isinstance(ev, tuple):
                data = ev[1].data
                records.append((ev[0], ev[1].offset, None if data is None else bytes(data)))
        if reuse:
            piece.release()
            reused[:] = b"\xa5" * (len(reused) + 3)
    dec.finish()
    return records


def _sample(compress=True):
    vm, d1, d2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    data = os.urandom(5000) + bytes(70000)
    logs = [(d1, SIZE, 0, SIZE, hrl_bytes(vm, d1, 3, 9, SIZE, [("write", 100, data), ("trim", 0, 10)])),
            (d2, SIZE, 0, SIZE, hrl_bytes(vm, d2, 3, 9, SIZE, [("write", 4096, b"x" * 4096)]))]
    return vm, d1, d2, data, bundle(BundleKind.CYCLE, vm, 3, 9, logs, compress=compress)


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_round_trip_whole_and_in_pieces(chunk):
    vm, d1, d2, data, raw = _sample()
    records = _decode(raw, {"vm_id": vm, "generation": 3, "sequence": 9, "disks": {d1: SIZE, d2: SIZE}}, chunk)
    assert records == [(0, 100, data), (0, 0, None), (1, 4096, b"x" * 4096)]


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 7, 4096, 65536])
def test_pieces_of_a_reused_buffer_decode_like_the_whole(compress, chunk):
    vm, d1, d2, data, raw = _sample(compress)
    expect = {"vm_id": vm, "generation": 3, "sequence": 9, "disks": {d1: SIZE, d2: SIZE}}
    whole = _decode(raw, expect)
    assert whole == [(0, 100, data), (0, 0, None), (1, 4096, b"x" * 4096)]
    assert _decode(raw, expect, chunk, reuse=True) == whole
    assert _decode(raw, expect, chunk, reuse=True, lend=True) == whole


def test_records_of_a_raw_frame_come_out_before_the_frame_is_whole():
    """An uncompressed frame is passed on as it arrives: a receiver writes records while the rest
    of a 1 MiB frame is still on its way, and never holds a whole frame."""
    vm, d1 = uuid.uuid4(), uuid.uuid4()
    writes = [("write", i * 4096, os.urandom(4096)) for i in range(240)]
    raw = bundle(BundleKind.CYCLE, vm, 1, 1, [(d1, SIZE, 0, SIZE, hrl_bytes(vm, d1, 1, 1, SIZE, writes))],
                 compress=False)
    codec, stored_len, _ = FRAME.unpack_from(raw, header_size(1))
    assert codec == 0 and stored_len > 900_000  # one raw frame holds all the records
    dec = BundleDecoder(keep_data=True, lend_data=True)
    dec.receive_data(raw[:200_000])
    early = []
    while (ev := dec.next_event()) is not NEED_DATA:
        if isinstance(ev, tuple):
            early.append(ev[1].offset)
    assert early == [i * 4096 for i in range(len(early))] and len(early) >= 40
    rest = []
    for i in range(200_000, len(raw), 100_000):
        dec.receive_data(raw[i:i + 100_000])
        while (ev := dec.next_event()) is not NEED_DATA:
            if isinstance(ev, tuple):
                rest.append(ev[1].offset)
    assert early + rest == [w[1] for w in writes]
    assert isinstance(dec.finish(), BundleDone)


def test_a_fed_buffer_is_free_again_after_need_data_and_after_an_error():
    """The caller's buffer is released when the decoder answers NEED_DATA, also when the log in
    a raw frame ended before the frame did, and when the decoder gave up on bad input."""
    vm, d1 = uuid.uuid4(), uuid.uuid4()
    log = hrl_bytes(vm, d1, 1, 1, SIZE, [("write", 0, b"a" * 100)])
    raw = bundle(BundleKind.CYCLE, vm, 1, 1, [(d1, SIZE, 0, SIZE, log + b"JUNK")], compress=False)
    reused = bytearray(raw[:-4])  # up to just after the END record, inside the raw frame
    view = memoryview(reused)
    dec = BundleDecoder(keep_data=False)
    dec.receive_data(view)
    while dec.next_event() is not NEED_DATA:
        pass
    view.release()
    reused[:] = b"\xa5" * (len(reused) + 3)  # a resize: BufferError if any view of it were still held
    dec.receive_data(raw[-4:])
    with pytest.raises(BundleCorruptError, match="after end"):
        while dec.next_event() is not NEED_DATA:
            pass

    bad = bytearray(raw)
    bad[header_size(1)] = 9  # an unknown frame codec
    dec = BundleDecoder(keep_data=False)
    dec.receive_data(memoryview(bad))  # the only view of it is the decoder's
    with pytest.raises(BundleCorruptError, match="bad frame"):
        while dec.next_event() is not NEED_DATA:
            pass
    bad[:] = b"x" * 5


def test_every_truncation_is_refused():
    *_, raw = _sample()
    for cut in range(len(raw)):
        with pytest.raises(BundleCorruptError):
            _decode(raw[:cut])


def test_identity_mismatches_are_refused():
    vm, d1, d2, _, raw = _sample()
    for expect in ({"vm_id": uuid.uuid4()}, {"generation": 4}, {"sequence": 10}, {"kind": BundleKind.INITIAL},
                   {"disks": {d1: SIZE}}, {"disks": {d1: SIZE, d2: SIZE, uuid.uuid4(): SIZE}},
                   {"disks": {d1: SIZE, d2: SIZE * 2}}):
        with pytest.raises(BundleCorruptError):
            _decode(raw, expect)


def test_zstd_frame_declaring_a_huge_size_is_refused_without_allocating_it():
    vm, d1 = uuid.uuid4(), uuid.uuid4()
    log = hrl_bytes(vm, d1, 1, 1, SIZE, [("write", 0, bytes(60000))])
    raw = bytes(bundle(BundleKind.CYCLE, vm, 1, 1, [(d1, SIZE, 0, SIZE, log)], compress=True))
    start = header_size(1)
    codec, _stored_len, raw_len = FRAME.unpack_from(raw, start)
    assert codec == 1
    # A frame whose header claims 2**45 bytes of content (frame header descriptor: 8-byte
    # content size, single segment), followed by one raw block of 16 bytes.
    lie = (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 45)
           + struct.pack("<I", (16 << 3) | 1)[:3] + bytes(16))
    assert zstandard.frame_content_size(lie) == 1 << 45
    patched = raw[:start] + FRAME.pack(1, len(lie), raw_len) + lie
    with pytest.raises(BundleCorruptError, match="declares"):
        _decode(patched)


def test_garbage_after_the_bundle_is_refused():
    *_, raw = _sample()
    with pytest.raises(BundleCorruptError):
        _decode(raw + b"\0")


def test_decoder_reports_done_once():
    *_, raw = _sample()
    dec = BundleDecoder(keep_data=False)
    dec.receive_data(raw)
    seen = []
    while (ev := dec.next_event()) is not NEED_DATA:
        seen.append(type(ev).__name__)
    assert seen.count("BundleDone") == 1 and isinstance(dec.finish(), BundleDone)


# --- the streamed form (version 2: no totals, an end-of-disk frame per disk) --------------
def _streamed_sample(compress=True):
    vm, d1, d2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    data = os.urandom(5000) + bytes(3 << 20)  # several frames on the first disk
    logs = [(d1, 8 * SIZE, 0, 8 * SIZE, hrl_bytes(vm, d1, 3, 9, 8 * SIZE, [("write", 100, data)])),
            (d2, SIZE, 0, SIZE, hrl_bytes(vm, d2, 3, 9, SIZE, [("zero", 4096, 4096)]))]
    return vm, d1, d2, data, bundle(BundleKind.CYCLE, vm, 3, 9, logs, compress=compress, streamed=True)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("chunk", [None, 5, 65536])
def test_the_streamed_form_round_trips_whole_and_in_pieces(compress, chunk):
    vm, d1, d2, data, raw = _streamed_sample(compress)
    expect = {"vm_id": vm, "generation": 3, "sequence": 9, "disks": {d1: 8 * SIZE, d2: SIZE}, "streamed": True}
    assert _decode(raw, expect, chunk, reuse=chunk is not None) == [(0, 100, data), (1, 4096, None)]


def test_a_streamed_bundle_without_its_last_end_of_disk_frame_is_truncated():
    *_, raw = _streamed_sample()
    with pytest.raises(BundleCorruptError) as info:
        _decode(raw[:-FRAME.size])
    assert info.value.code == "body_truncated"


def test_an_end_of_disk_frame_with_lengths_or_in_a_counted_bundle_is_refused():
    *_, raw = _streamed_sample(compress=False)
    with pytest.raises(BundleCorruptError, match="end-of-disk"):
        _decode(raw[:-FRAME.size] + struct.pack("<BxxxII", 0xFF, 1, 0))
    *_, counted = _sample(compress=False)
    with pytest.raises(BundleCorruptError, match="bad frame"):
        _decode(counted[:header_size(2)] + struct.pack("<BxxxII", 0xFF, 0, 0) + counted[header_size(2):])


@pytest.mark.parametrize("streamed", [True, False])
def test_a_bundle_of_the_other_form_than_expected_is_refused_as_such(streamed):
    raw = _streamed_sample()[-1] if streamed else _sample()[-1]
    with pytest.raises(BundleCorruptError) as info:
        _decode(raw, {"streamed": not streamed})
    assert info.value.code == "upload_form_mismatch"
