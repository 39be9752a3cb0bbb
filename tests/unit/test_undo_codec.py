"""The undo log codec and history rules (hvr_common.pure.undo, undo_decoder, undo_capture, undo_merge).

What must never happen: a damaged log taken for the clean log it came from; a
byte captured twice, or a byte captured after it was overwritten; a merged
log or a chain of logs that does not give back the point's exact bytes.
"""

from __future__ import annotations

import random
import struct
import uuid
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvr_common.pure.errors import CorruptError, HvrError
from hvr_common.pure.undo import (
    END_PAYLOAD,
    END_RECORD_SIZE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_DATA_LENGTH,
    RECORD,
    RECORD_MAGIC,
    RECORD_SIZE,
    VERSION,
    UndoCorruptError,
    UndoEncoder,
    UndoHeader,
    UndoKind,
    UndoRecord,
    UndoSummary,
    decode_header,
    encode_header,
    file_name,
)
from hvr_common.pure.undo_capture import CapturedRanges, CapturedSet
from hvr_common.pure.undo_decoder import NEED_DATA, UndoDecoder, decode_bytes
from hvr_common.pure.undo_merge import lay_over, merge_logs, merge_plan, merged_header, reach_point, superseded

U64 = 2**64 - 1
DISK_SIZE = 512
VM = uuid.UUID("6f1c1d9e-8a44-4f5e-9d7e-0b1f7c2a9d01")
DISKS = (uuid.UUID("0b8e9d1c-2f3a-4b5c-8d6e-7f8091a2b3c4"), uuid.UUID("a1b2c3d4-0000-4000-8000-000000000002"))
HEADER_1 = UndoHeader(VM, point_id=5, sequence=41, merged_through=5, created_ns=1_700_000_000_000_000_000)
CLOSED_NS = 1_700_000_001_000_000_000


# --- helpers ----------------------------------------------------------------------------------

def build_log(header: UndoHeader, specs, *, closed_ns: int | None = CLOSED_NS):
    """Encode ``specs`` ((kind, disk, offset, data-or-length)); return (bytes, expected records, encoder)."""
    enc = UndoEncoder(header)
    out = bytearray(enc.header_bytes())
    expected = []
    for kind, disk, offset, arg in specs:
        position = enc.position
        if kind is UndoKind.DATA:
            out += enc.data(disk, offset, arg)
            out += arg
            expected.append(UndoRecord(kind, disk, offset, len(arg), position, position + RECORD_SIZE, bytes(arg)))
        else:
            out += enc.hole(disk, offset, arg)
            expected.append(UndoRecord(kind, disk, offset, arg, position, position + RECORD_SIZE, None))
        assert enc.position == len(out)
    if closed_ns is not None:
        out += enc.end(closed_ns)
        assert enc.position == len(out)
    return bytes(out), expected, enc


def outcome(data: bytes):
    """("error", exception) or (records, summary)."""
    try:
        _, records, summary = decode_bytes(data)
    except UndoCorruptError as e:
        return "error", e
    return records, summary


SMALL = [
    (UndoKind.DATA, DISKS[0], 0, b"old contents"),
    (UndoKind.HOLE, DISKS[1], 4096, 8192),
    (UndoKind.DATA, DISKS[1], 100, bytes(range(40))),
    (UndoKind.HOLE, DISKS[0], 2**40, 1),
    (UndoKind.DATA, DISKS[0], 20, b"end"),
]


@pytest.fixture(scope="module")
def small_log():
    return build_log(HEADER_1, SMALL)


headers = st.builds(
    lambda vm, point, extra, seq, ns: UndoHeader(vm, point, seq, min(point + extra, U64), ns),
    st.uuids(), st.integers(0, U64), st.integers(0, U64), st.integers(0, U64), st.integers(0, U64))


@st.composite
def spec_lists(draw, max_records: int = 10):
    specs = []
    for _ in range(draw(st.integers(0, max_records))):
        disk = draw(st.sampled_from(DISKS))
        if draw(st.booleans()):
            data = draw(st.binary(min_size=1, max_size=300))
            specs.append((UndoKind.DATA, disk, draw(st.integers(0, U64 - len(data))), data))
        else:
            length = draw(st.integers(1, U64 // 16))  # the counts in the END record are u64 too
            specs.append((UndoKind.HOLE, disk, draw(st.integers(0, U64 - length)), length))
    return specs


def disjoint_specs(rng: random.Random, disk_size: int = DISK_SIZE):
    """Records that overlap nowhere (per disk), as one point's log holds them, in random order."""
    specs = []
    for disk in DISKS:
        cuts = sorted(set(rng.sample(range(1, disk_size), rng.randint(0, 12))) | {0, disk_size})
        for a, b in zip(cuts, cuts[1:]):
            if rng.random() < 0.5:
                specs.append((UndoKind.DATA, disk, a, rng.randbytes(b - a)) if rng.random() < 0.7
                             else (UndoKind.HOLE, disk, a, b - a))
    rng.shuffle(specs)
    return specs


# --- header -----------------------------------------------------------------------------------

def test_struct_sizes_and_constants():
    assert HEADER.size == HEADER_SIZE == 128
    assert RECORD.size == RECORD_SIZE == 48
    assert END_PAYLOAD.size == 32 and END_RECORD_SIZE == 80
    assert MAGIC == b"HVR-UND\n" and VERSION == 1 and struct.pack("<I", RECORD_MAGIC) == b"UNDR"
    assert MAX_DATA_LENGTH == 32 * 1024 * 1024
    assert issubclass(UndoCorruptError, CorruptError) and UndoCorruptError.code == "undo_corrupt"


@given(headers)
def test_header_round_trip(header):
    raw = encode_header(header)
    assert len(raw) == HEADER_SIZE and raw[:8] == MAGIC
    assert decode_header(raw) == header
    assert zlib.crc32(raw[:124]) == int.from_bytes(raw[124:], "little")


def test_header_layout_is_the_documented_one():
    raw = encode_header(HEADER_1)
    assert struct.unpack_from("<HHI", raw, 8) == (1, 128, 0)
    assert raw[16:32] == VM.bytes
    assert struct.unpack_from("<QQQQ", raw, 32) == (5, 41, 5, HEADER_1.created_ns)
    assert raw[64:124] == bytes(60)


def _patched(offset: int, value: bytes, *, reseal: bool = True) -> bytes:
    raw = bytearray(encode_header(HEADER_1))
    raw[offset:offset + len(value)] = value
    if reseal:
        raw[124:128] = zlib.crc32(bytes(raw[:124])).to_bytes(4, "little")
    return bytes(raw)


@pytest.mark.parametrize("raw, message", [
    (_patched(0, b"HVR-HRL\n"), "not an undo log"),
    (_patched(8, struct.pack("<H", 2)), "unsupported undo log version 2"),
    (_patched(8, struct.pack("<H", 2), reseal=False), "unsupported undo log version 2"),  # before its crc
    (_patched(40, b"\x01", reseal=False), "header checksum mismatch"),
    (_patched(10, struct.pack("<H", 64)), "header_size"),
    (_patched(12, struct.pack("<I", 1)), "unsupported flags"),
    (_patched(100, b"\x01"), "reserved"),
    (_patched(48, struct.pack("<Q", 4)), "merged_through 4 before point 5"),
    (encode_header(HEADER_1)[:127], "truncated undo log header"),
])
def test_decode_header_says_what_is_wrong(raw, message):
    with pytest.raises(UndoCorruptError, match=message) as info:
        decode_header(raw)
    assert isinstance(info.value, HvrError) and info.value.detail == {"part": "header", "offset": 0}


def test_a_file_that_is_no_undo_log_is_refused_at_once():
    decoder = UndoDecoder()
    decoder.receive_data(b"QFI\xfb")  # a qcow2 image, say: refused before 128 bytes arrive
    with pytest.raises(UndoCorruptError, match="not an undo log"):
        decoder.next_event()
    for data, message in ((b"", "empty file"), (MAGIC, "truncated undo log header: 8 of 128")):
        with pytest.raises(UndoCorruptError, match=message):
            decode_bytes(data)
    with pytest.raises(UndoCorruptError, match="unsupported undo log version 7") as info:
        decode_bytes(_patched(8, struct.pack("<H", 7)) + bytes(100))
    assert "upgrade hvr" in str(info.value)


@pytest.mark.parametrize("field", ["point_id", "sequence", "merged_through", "created_ns"])
def test_encode_header_rejects_values_beyond_u64(field):
    values = {"point_id": 0, "sequence": 0, "merged_through": 0, "created_ns": 0, field: 2**64}
    with pytest.raises(ValueError, match=field):
        encode_header(UndoHeader(VM, **values))


def test_file_names_sort_as_points_do():
    assert file_name(7) == "00000000000000000007.undo"
    assert file_name(U64, ".undo.merging") == "18446744073709551615.undo.merging"
    rng = random.Random(1)
    ids = [rng.randrange(10 ** rng.randint(1, 19)) for _ in range(50)] + [U64]
    assert sorted(ids) == [int(n[:20]) for n in sorted(file_name(i) for i in ids)]
    with pytest.raises(ValueError):
        file_name(-1)


# --- records ----------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(headers, spec_lists(), st.integers(0, U64), st.lists(st.integers(0, 3000), max_size=20))
def test_log_round_trip_in_any_pieces(header, specs, closed_ns, splits):
    data, expected, enc = build_log(header, specs, closed_ns=closed_ns)
    got_header, records, summary = decode_bytes(data)
    assert (got_header, records) == (header, expected)
    data_bytes = sum(len(a) for k, _, _, a in specs if k is UndoKind.DATA)
    hole_bytes = sum(a for k, _, _, a in specs if k is UndoKind.HOLE)
    assert summary == UndoSummary(True, len(specs), data_bytes, hole_bytes, len(data), 0, closed_ns, enc.crc, None)
    # fed in pieces: the same events
    decoder = UndoDecoder()
    events = []
    cuts = sorted(s for s in set(splits) if 0 < s < len(data))
    for a, b in zip([0, *cuts], [*cuts, len(data)]):
        decoder.receive_data(data[a:b])
        while (event := decoder.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, UndoSummary):
                break
    assert events == [header, *expected, summary]
    # and without the data
    _, bare, _ = decode_bytes(data, keep_data=False)
    assert bare == [UndoRecord(r.kind, r.disk_id, r.offset, r.length, r.position, r.data_position, None)
                    for r in expected]


def test_record_layout_and_crc_chain(small_log):
    data, expected, enc = small_log
    prev = int.from_bytes(data[124:128], "little")
    for r in expected:
        p = r.position
        magic, kind, flags, reserved, disk, offset, length, plen, crc = RECORD.unpack_from(data, p)
        assert (magic, kind, flags, reserved, disk, offset, length) == (
            RECORD_MAGIC, r.kind, 0, 0, r.disk_id.bytes, r.offset, r.length)
        assert plen == (r.length if r.kind is UndoKind.DATA else 0)
        assert crc == zlib.crc32(data[p + 48:p + 48 + plen], zlib.crc32(data[p:p + 44], prev))
        prev = crc
    end = len(data) - END_RECORD_SIZE
    assert RECORD.unpack_from(data, end)[:8] == (RECORD_MAGIC, 0x7F, 0, 0, bytes(16), 0, 0, 32)
    assert END_PAYLOAD.unpack_from(data, end + 48) == (5, 12 + 40 + 3, 8192 + 1, CLOSED_NS)
    assert enc.crc == zlib.crc32(data[end + 48:], zlib.crc32(data[end:end + 44], prev))


@pytest.mark.parametrize("call, message", [
    (lambda e: e.data(DISKS[0], 0, b""), "length 0"),
    (lambda e: e.data(DISKS[0], 0, bytes(MAX_DATA_LENGTH + 1)), "length"),
    (lambda e: e.hole(DISKS[0], 0, 0), "length 0"),
    (lambda e: e.hole(DISKS[0], -1, 5), "offset -1"),
    (lambda e: e.hole(DISKS[0], U64, 1), "out of range"),
])
def test_encoder_rejects_bad_arguments(call, message):
    enc = UndoEncoder(HEADER_1)
    before = (enc.crc, enc.position, enc.record_count)
    with pytest.raises(ValueError, match=message):
        call(enc)
    assert (enc.crc, enc.position, enc.record_count) == before


def test_encoder_refuses_counts_beyond_u64():
    enc = UndoEncoder(HEADER_1)
    enc.hole(DISKS[0], 0, U64 - 1)
    with pytest.raises(ValueError, match="u64"):
        enc.hole(DISKS[1], 0, 2)
    assert enc.record_count == 1 and enc.hole_bytes == U64 - 1


def test_encoder_refuses_records_after_end():
    enc = UndoEncoder(HEADER_1)
    assert len(enc.end(1)) == END_RECORD_SIZE
    with pytest.raises(ValueError, match="END"):
        enc.hole(DISKS[0], 0, 1)


def test_encoder_resumes_an_open_log_after_a_restart(small_log):
    data, expected, _ = small_log
    whole, _, _ = build_log(HEADER_1, SMALL + [(UndoKind.HOLE, DISKS[1], 7, 9)])
    open_part = data[:expected[4].position + 20]  # torn inside the last record
    header, records, summary = decode_bytes(open_part)
    assert not summary.clean and summary.valid_length == expected[4].position
    enc = UndoEncoder(header, resume=summary)
    rest = bytearray(open_part[:summary.valid_length])  # the caller cut the torn tail
    rest += enc.data(DISKS[0], 20, b"end") + b"end" + enc.hole(DISKS[1], 7, 9) + enc.end(CLOSED_NS)
    assert bytes(rest) == whole
    with pytest.raises(ValueError, match="closed"):
        UndoEncoder(HEADER_1, resume=decode_bytes(data)[2])


# --- damage -----------------------------------------------------------------------------------

def test_truncation_at_every_length_is_a_clean_end(small_log):
    data, expected, _ = small_log
    ends = [r.position + RECORD_SIZE + (r.length if r.data else 0) for r in expected]
    for n in range(len(data)):
        result = outcome(data[:n])
        if n < HEADER_SIZE:
            assert result[0] == "error" and result[1].detail["part"] == "header", n
            continue
        records, summary = result
        fitting = [r for r, end in zip(expected, ends) if end <= n]
        assert records == fitting, n
        assert not summary.clean and summary.closed_ns is None, n
        assert summary.valid_length == (ends[len(fitting) - 1] if fitting else HEADER_SIZE)
        assert summary.torn_bytes == n - summary.valid_length
        assert summary.reason.startswith("truncated record at" if summary.torn_bytes else "no end record")
        with pytest.raises(UndoCorruptError, match="not cleanly closed"):
            summary.require_clean("undo log")


def test_every_flipped_bit_is_detected(small_log):
    data, expected, _ = small_log
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            result = outcome(bytes(flipped))
            if result[0] == "error":
                assert result[1].detail["part"] in ("header", "records"), (i, bit)
                if result[1].detail["part"] == "records":  # corruption in the middle names its record
                    bad = result[1].detail["offset"]
                    assert bad in [r.position for r in expected] and bad <= i, (i, bit)
                continue
            records, summary = result
            assert not summary.clean, (i, bit)
            assert records == expected[:len(records)], (i, bit)
            assert all(r.position + RECORD_SIZE + (r.length if r.data else 0) <= i for r in records), (i, bit)


def test_bad_checksum_in_the_middle_of_a_closed_log_is_corruption_with_its_offset(small_log):
    data, expected, _ = small_log
    bad = bytearray(data)
    bad[expected[2].data_position + 5] ^= 0xFF
    with pytest.raises(UndoCorruptError, match=f"record checksum mismatch at {expected[2].position} in a closed") as e:
        decode_bytes(bytes(bad))
    assert e.value.detail == {"part": "records", "offset": expected[2].position}


def test_bad_checksum_in_an_open_log_is_a_torn_tail(small_log):
    """Pages of unsynced appends reach the disk in any order: a record whose payload page was
    lost can be followed by valid records.  With no END record, that is the end of the log."""
    data, expected, _ = small_log
    torn = bytearray(data[:-END_RECORD_SIZE])
    torn[expected[2].data_position + 5] ^= 0xFF
    _, records, summary = decode_bytes(bytes(torn))
    assert records == expected[:2] and not summary.clean
    assert summary.reason == f"record checksum mismatch at {expected[2].position}"
    assert summary.valid_length == expected[2].position and summary.torn_bytes == len(torn) - expected[2].position
    assert summary.final_crc == build_log(HEADER_1, SMALL[:2], closed_ns=None)[2].crc  # the chain a resumed writer continues


def test_torn_tails_of_an_open_log(small_log):
    data, expected, _ = small_log
    active = data[:-END_RECORD_SIZE]
    for tail, reason in ((data[len(active):len(active) + 30], "truncated record at"),
                         (bytes(4096), "bad record magic at"),
                         (random.Random(3).randbytes(300), "bad record magic at"),
                         (active[expected[1].position:expected[2].position], "record checksum mismatch at")):
        _, records, summary = decode_bytes(active + tail)
        assert records == expected and not summary.clean
        assert summary.reason == f"{reason} {len(active)}"
        assert summary.valid_length == len(active) and summary.torn_bytes == len(tail)


def test_dropped_and_reordered_records_are_detected(small_log):
    data, expected, _ = small_log
    spans = [(r.position, expected[i + 1].position if i + 1 < len(expected) else len(data) - END_RECORD_SIZE)
             for i, r in enumerate(expected)]
    chunks = [data[a:b] for a, b in spans]
    head, end = data[:HEADER_SIZE], data[-END_RECORD_SIZE:]
    for damaged in (head + b"".join(chunks[:2] + chunks[3:]) + end,
                    head + b"".join([chunks[0], chunks[2], chunks[1], *chunks[3:]]) + end):
        result = outcome(damaged)
        assert result[0] == "error" or not result[1].clean


@pytest.mark.parametrize("fields, reason", [
    ((RECORD_MAGIC ^ 1, 1, 0, 0, DISKS[0].bytes, 0, 1, 1), "bad record magic"),
    ((RECORD_MAGIC, 9, 0, 0, DISKS[0].bytes, 0, 1, 1), "unknown record kind 0x9"),
    ((RECORD_MAGIC, 1, 1, 0, DISKS[0].bytes, 0, 1, 1), "record flags or reserved field not zero"),
    ((RECORD_MAGIC, 2, 0, 1, DISKS[0].bytes, 0, 1, 0), "record flags or reserved field not zero"),
    ((RECORD_MAGIC, 1, 0, 0, DISKS[0].bytes, 0, 0, 0), "zero-length DATA"),
    ((RECORD_MAGIC, 2, 0, 0, DISKS[0].bytes, U64, 1, 0), "HOLE beyond the u64 range"),
    ((RECORD_MAGIC, 1, 0, 0, DISKS[0].bytes, 0, 5, 6), "DATA payload length differs from its length"),
    ((RECORD_MAGIC, 1, 0, 0, DISKS[0].bytes, 0, MAX_DATA_LENGTH + 1, MAX_DATA_LENGTH + 1),
     f"DATA of {MAX_DATA_LENGTH + 1} bytes exceeds {MAX_DATA_LENGTH}"),
    ((RECORD_MAGIC, 2, 0, 0, DISKS[0].bytes, 0, 5, 5), "HOLE with a payload"),
    ((RECORD_MAGIC, 0x7F, 0, 0, DISKS[0].bytes, 0, 0, 32), "malformed end record"),
    ((RECORD_MAGIC, 0x7F, 0, 0, bytes(16), 0, 0, 31), "malformed end record"),
])
def test_invalid_record_header_ends_the_log_without_waiting_for_its_payload(fields, reason):
    decoder = UndoDecoder()
    decoder.receive_data(encode_header(HEADER_1) + RECORD.pack(*fields, 0))
    assert decoder.next_event() == HEADER_1
    assert decoder.next_event() is NEED_DATA and decoder.state == "torn"
    assert decoder.finish().reason == f"{reason} at 128"


def test_end_record_with_wrong_counts_or_data_after_it_is_corruption(small_log):
    data, _, _ = small_log
    with pytest.raises(UndoCorruptError, match=f"data after end record at {len(data)}") as e:
        decode_bytes(data + b"\0")
    assert e.value.detail == {"part": "end", "offset": len(data)}
    enc = UndoEncoder(HEADER_1)
    log = bytearray(enc.header_bytes() + enc.hole(DISKS[0], 0, 10))
    enc.record_count = 2  # an END that does not match the records before it
    log += enc.end(1)
    with pytest.raises(UndoCorruptError, match="end record at 176 counts 2 records") as e:
        decode_bytes(bytes(log))
    assert e.value.detail == {"part": "end", "offset": 176}


def test_a_finished_decoder_ignores_later_data(small_log):
    data, expected, _ = small_log
    decoder = UndoDecoder()
    decoder.receive_data(data[:-END_RECORD_SIZE] + b"\xff" * 60)
    assert [decoder.next_event() for _ in range(7)] == [HEADER_1, *expected, NEED_DATA]
    decoder.receive_data(data)
    assert decoder.next_event() is NEED_DATA
    summary = decoder.finish()
    assert summary.torn_bytes == 60 + len(data) and summary.reason.startswith("bad record magic")
    assert decoder.finish() == summary


# --- captured ranges --------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60)), max_size=30))
def test_uncaptured_is_exactly_the_bytes_not_yet_captured(steps):
    """Capture what is uncaptured of each range, as the listener does: the set equals the union
    of the ranges, no byte is captured twice, and the answer is sorted, disjoint, and exact."""
    ranges = CapturedRanges()
    model: set[int] = set()
    for offset, length in steps:
        gaps = ranges.uncaptured(offset, length)
        assert [b for o, n in gaps for b in range(o, o + n)] == [
            b for b in range(offset, offset + length) if b not in model]
        assert all(n > 0 for _, n in gaps)
        assert all(a[0] + a[1] < b[0] for a, b in zip(gaps, gaps[1:]))  # maximal pieces
        for o, n in gaps:
            ranges.add(o, n)
            model.update(range(o, o + n))
        assert ranges.uncaptured(offset, length) == []
    stored = list(ranges)
    assert [b for o, n in stored for b in range(o, o + n)] == sorted(model)
    assert all(a[0] + a[1] < b[0] for a, b in zip(stored, stored[1:]))  # touching ranges joined
    assert ranges.captured_bytes == len(model)


def test_adding_a_captured_byte_again_is_refused():
    ranges = CapturedRanges()
    ranges.add(10, 10)
    for offset, length in ((10, 1), (19, 5), (0, 11), (0, 100), (12, 2)):
        with pytest.raises(ValueError, match="already partly captured"):
            ranges.add(offset, length)
    ranges.add(0, 10)
    ranges.add(20, 5)
    assert list(ranges) == [(0, 25)]
    with pytest.raises(ValueError):
        ranges.add(30, 0)


def test_captured_set_is_per_disk_and_rebuilt_from_the_log(small_log):
    data, expected, _ = small_log
    captured = CapturedSet.from_records(decode_bytes(data)[1])
    assert captured.disks() == sorted(DISKS, key=lambda d: d.bytes)
    assert list(captured.ranges(DISKS[0])) == [(0, 12), (20, 3), (2**40, 1)]
    assert captured.uncaptured(DISKS[0], 0, 30) == [(12, 8), (23, 7)]
    assert captured.uncaptured(DISKS[1], 0, 30) == [(0, 30)]
    assert captured.uncaptured(uuid.uuid4(), 5, 5) == [(5, 5)]
    overlapping, _, _ = build_log(HEADER_1, SMALL + [(UndoKind.HOLE, DISKS[0], 22, 4)])
    with pytest.raises(UndoCorruptError, match=f"at {len(data) - END_RECORD_SIZE} overlaps") as e:
        CapturedSet.from_records(decode_bytes(overlapping)[1])
    assert e.value.detail["offset"] == len(data) - END_RECORD_SIZE


# --- merge ------------------------------------------------------------------------------------

def images_of(rng: random.Random) -> dict[uuid.UUID, bytearray]:
    return {disk: bytearray(rng.randbytes(DISK_SIZE)) for disk in DISKS}


@settings(max_examples=150, deadline=None)
@given(st.randoms(use_true_random=False))
def test_laying_the_merged_log_equals_laying_the_newer_then_the_older(rng):
    older_header = UndoHeader(VM, 3, 30, rng.choice([3, 4]), 1)
    newer_header = UndoHeader(VM, 5, 31, rng.choice([5, 9]), 2)
    older, older_records, _ = build_log(older_header, disjoint_specs(rng))
    newer, newer_records, _ = build_log(newer_header, disjoint_specs(rng))
    merged = merge_logs(older, newer, closed_ns=7)
    header, records, summary = decode_bytes(merged)
    assert summary.clean and summary.closed_ns == 7
    assert header == UndoHeader(VM, 3, 30, newer_header.merged_through, 1)
    base = images_of(rng)
    expected = {d: bytearray(b) for d, b in base.items()}
    lay_over(expected, newer_records)
    lay_over(expected, older_records)
    got = {d: bytearray(b) for d, b in base.items()}
    lay_over(got, records)
    assert got == expected
    # the merged log is a valid log of its own: sorted, disjoint, and the union of both
    assert [(r.disk_id.bytes, r.offset) for r in records] == sorted((r.disk_id.bytes, r.offset) for r in records)
    union = CapturedSet.from_records(older_records + [
        UndoRecord(r.kind, r.disk_id, o, n) for r in newer_records
        for o, n in CapturedSet.from_records(older_records).uncaptured(r.disk_id, r.offset, r.length)])
    merged_set = CapturedSet.from_records(records)
    for disk in DISKS:
        assert list(merged_set.ranges(disk)) == list(union.ranges(disk))
    # every pre-image of the older log is kept whole
    assert all(r in [(m.kind, m.disk_id, m.offset, m.length, m.data) for m in records]
               for r in [(r.kind, r.disk_id, r.offset, r.length, r.data) for r in older_records])


def test_merge_plan_points_at_the_bytes_of_each_input():
    older, older_records, _ = build_log(HEADER_1, [(UndoKind.DATA, DISKS[0], 10, b"AAAA")])
    newer, newer_records, _ = build_log(UndoHeader(VM, 6, 42, 6, 0), [
        (UndoKind.DATA, DISKS[0], 8, b"bbbbbbbb"), (UndoKind.HOLE, DISKS[1], 0, 100)])
    plan = merge_plan(decode_bytes(older, keep_data=False)[1], decode_bytes(newer, keep_data=False)[1])
    src = newer_records[0].data_position
    assert [(p.disk_id, p.offset, p.length, p.kind, p.from_older, p.source) for p in plan] == sorted([
        (DISKS[0], 8, 2, UndoKind.DATA, False, src),
        (DISKS[0], 10, 4, UndoKind.DATA, True, older_records[0].data_position),
        (DISKS[0], 14, 2, UndoKind.DATA, False, src + 6),
        (DISKS[1], 0, 100, UndoKind.HOLE, False, None),
    ], key=lambda p: (p[0].bytes, p[1]))


def test_merge_refuses_open_logs_and_logs_out_of_order():
    older, _, _ = build_log(HEADER_1, SMALL)
    newer, _, _ = build_log(UndoHeader(VM, 6, 42, 6, 0), [])
    with pytest.raises(UndoCorruptError, match="point 6 is not cleanly closed"):
        merge_logs(older, newer[:-END_RECORD_SIZE], 1)
    with pytest.raises(ValueError, match="is not older than point 5"):
        merge_logs(newer, older, 1)
    other_vm, _, _ = build_log(UndoHeader(uuid.uuid4(), 6, 42, 6, 0), [])
    with pytest.raises(ValueError, match="different VMs"):
        merge_logs(older, other_vm, 1)
    with pytest.raises(ValueError, match="sequence"):
        merged_header(HEADER_1, UndoHeader(VM, 6, 40, 6, 0))
    overlapping, _, _ = build_log(UndoHeader(VM, 6, 42, 6, 0), [(UndoKind.HOLE, DISKS[0], 0, 9)] * 2)
    with pytest.raises(UndoCorruptError, match="overlaps"):
        merge_logs(older, overlapping, 1)


def test_superseded_logs_are_those_a_merged_log_already_holds():
    def h(point, through):
        return UndoHeader(VM, point, point, through, 0)
    assert superseded([h(1, 1), h(2, 2), h(3, 3)]) == []
    assert superseded([h(4, 4), h(1, 3), h(3, 3), h(2, 2), h(9, 9)]) == [2, 3]
    assert superseded([h(1, 5), h(6, 8), h(7, 7), h(8, 8)]) == [7, 8]


def test_lay_over_refuses_what_it_cannot_lay():
    images = {DISKS[0]: bytearray(8)}
    with pytest.raises(ValueError, match="unknown disk"):
        lay_over(images, [UndoRecord(UndoKind.HOLE, DISKS[1], 0, 1)])
    with pytest.raises(ValueError, match="beyond disk"):
        lay_over(images, [UndoRecord(UndoKind.HOLE, DISKS[0], 4, 5)])
    with pytest.raises(ValueError, match="without its data"):
        lay_over(images, [UndoRecord(UndoKind.DATA, DISKS[0], 0, 1)])
    assert images == {DISKS[0]: bytearray(8)}


# --- reaching a point: a model replica that captures as the listener must ----------------------

class Replica:
    """In-memory disks with recovery points, capturing pre-images by the rules of docs/undo-format.md:
    capture what is uncaptured, make it durable, then overwrite.  ``snapshots`` hold each
    point's true bytes, to compare with what the undo logs give back."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.images = images_of(rng)
        self.holes = {disk: bytearray(DISK_SIZE) for disk in DISKS}  # 1: the byte lies in a hole
        for disk in DISKS:
            start = rng.randrange(DISK_SIZE)
            self._write(disk, start, min(rng.randint(1, 100), DISK_SIZE - start), None)
        self.points: list[dict] = []
        self.sequence = 0
        self.next_point = 1
        self.take_point()

    def take_point(self) -> None:
        if self.points:
            self.points[-1]["log"] += self.encoder.end(self.sequence)
        header = UndoHeader(VM, self.next_point, self.sequence, self.next_point, self.sequence)
        self.next_point += self.rng.randint(1, 3)
        self.encoder = UndoEncoder(header)
        self.captured = CapturedSet()
        self.points.append({"header": header, "log": bytearray(self.encoder.header_bytes()),
                            "snapshot": {d: bytes(image) for d, image in self.images.items()}})
        self.synced = HEADER_SIZE  # log bytes made durable

    def _write(self, disk: uuid.UUID, offset: int, length: int, data: bytes | None) -> None:
        self.images[disk][offset:offset + length] = data if data is not None else bytes(length)
        self.holes[disk][offset:offset + length] = b"\0" * length if data is not None else b"\1" * length

    def _capture(self, disk: uuid.UUID, offset: int, length: int) -> None:
        log = self.points[-1]["log"]
        for start, n in self.captured.uncaptured(disk, offset, length):
            run = start
            while run < start + n:  # one record per run of data or hole: holes stay holes
                hole = self.holes[disk][run]
                end = run
                while end < start + n and self.holes[disk][end] == hole:
                    end += 1
                if hole:
                    log += self.encoder.hole(disk, run, end - run)
                else:
                    old = bytes(self.images[disk][run:end])
                    log += self.encoder.data(disk, run, old) + old
                run = end
            self.captured.add(disk, start, n)

    def random_cycle(self) -> list[tuple]:
        ops = []
        for _ in range(self.rng.randint(1, 6)):
            disk = self.rng.choice(DISKS)
            length = self.rng.randint(1, 64)
            offset = self.rng.randrange(DISK_SIZE - length + 1)
            data = None if self.rng.random() < 0.15 else self.rng.randbytes(length)
            ops.append((disk, offset, length, data))
        return ops

    def apply(self, ops, *, crash_at: int | None = None, capture_first: bool = True) -> None:
        """Apply one cycle; with ``crash_at``, crash while applying operation ``crash_at``."""
        before = ({d: bytearray(i) for d, i in self.images.items()}, {d: bytearray(h) for d, h in self.holes.items()})
        done = []
        for index, (disk, offset, length, data) in enumerate(ops):
            if not capture_first:  # the wrong order: the overwrite may reach the disk before the capture
                self._write(disk, offset, length, data)
                done.append(index)
            self._capture(disk, offset, length)
            if index == crash_at:
                return self._crash(ops, before, done)
            self.synced = len(self.points[-1]["log"])  # fdatasync of the undo log: the commit point
            if capture_first:
                self._write(disk, offset, length, data)
                done.append(index)
        self.sequence += 1

    def _crash(self, ops, before, done) -> None:
        """What a crash leaves: the log durable up to its last sync, then any mangled part of the
        rest; image writes that may or may not have reached the disk.  Then restart and re-apply."""
        log = self.points[-1]["log"]
        tail = log[self.synced:]
        cut = self.rng.randint(0, len(tail))
        tail = tail[:cut]
        if tail and self.rng.random() < 0.5:  # a lost page inside what was written
            a = self.rng.randrange(len(tail))
            tail[a:a + 16] = bytes(len(tail[a:a + 16]))
        del log[self.synced:]
        log += tail
        self.images, self.holes = before
        for index in done:
            if self.rng.random() < 0.7:  # an unflushed image write may be lost
                self._write(*ops[index])
        # restart: read the open log, cut its torn tail, rebuild the captured set, re-apply the cycle
        header, records, summary = decode_bytes(bytes(log))
        assert header == self.points[-1]["header"] and not summary.clean
        del log[summary.valid_length:]
        self.captured = CapturedSet.from_records(records)
        self.encoder = UndoEncoder(header, resume=summary)
        self.synced = len(log)
        self.apply(ops)

    def thin(self, index: int, *, finish: bool = True) -> None:
        """Merge point ``index + 1`` into point ``index`` (both closed); unless ``finish``, stop
        after the rename, before the newer log is deleted, as a crash there would."""
        older, newer = self.points[index], self.points[index + 1]
        older["log"] = bytearray(merge_logs(bytes(older["log"]), bytes(newer["log"]), closed_ns=1))
        older["header"] = decode_header(older["log"])
        assert older["header"].merged_through == newer["header"].merged_through
        if finish:
            del self.points[index + 1]

    def reached(self, k: int) -> dict[uuid.UUID, bytearray]:
        images = {d: bytearray(i) for d, i in self.images.items()}
        logs = []
        for point in reversed(self.points[k:]):
            header, records, summary = decode_bytes(bytes(point["log"]))
            if point is not self.points[-1]:
                summary.require_clean(f"point {header.point_id}")
            CapturedSet.from_records(records)  # no byte captured twice
            logs.append((header, records))
        reach_point(images, logs)
        return images

    def check_every_point(self) -> None:
        for k, point in enumerate(self.points):
            assert self.reached(k) == point["snapshot"], f"point {point['header'].point_id}"


@settings(max_examples=120, deadline=None)
@given(st.randoms(use_true_random=False))
def test_undo_logs_reach_every_point_across_crashes_and_thinning(rng):
    replica = Replica(rng)
    for _ in range(rng.randint(1, 14)):
        roll = rng.random()
        if roll < 0.55:
            ops = replica.random_cycle()
            replica.apply(ops, crash_at=rng.randrange(len(ops)) if rng.random() < 0.4 else None)
        elif roll < 0.8:
            replica.take_point()
        elif len(replica.points) >= 3:
            index = rng.randrange(len(replica.points) - 2)  # the newest point's log is open: never merged
            replica.thin(index, finish=False)  # a crash between the rename and the delete
            gone = superseded(p["header"] for p in replica.points)  # what a restart deletes
            assert gone == [replica.points[index + 1]["header"].point_id]
            replica.points = [p for p in replica.points if p["header"].point_id not in gone]
        replica.check_every_point()


def test_the_model_sees_a_capture_made_after_its_overwrite():
    """The check above can fail: overwrite first, crash before the capture is durable, and
    the re-applied cycle captures the new bytes as old."""
    replica = Replica(random.Random(5))
    replica.take_point()
    ops = [(DISKS[0], 0, 64, b"n" * 64)]
    replica.apply(ops, crash_at=0, capture_first=False)
    assert replica.reached(1) != replica.points[1]["snapshot"]
