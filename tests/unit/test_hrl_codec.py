"""The HRL codec (hvr_common.pure.hrl, hrl_decoder): round trips, streaming, and every way a log can be damaged.

Each damage test states what must never happen: a truncated, flipped,
reordered or spliced log is never taken for the clean log it came from.
"""

from __future__ import annotations

import ast
import random
import struct
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvr_common.pure import hrl
from hvr_common.pure.errors import CorruptError, HvrError
from hvr_common.pure.hrl import (
    END_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD_LENGTH,
    RECORD,
    RECORD_FLAG_FUA,
    RECORD_FLAG_NO_HOLE,
    RECORD_MAGIC,
    RECORD_SIZE,
    VERSION,
    HrlCorruptError,
    HrlEncoder,
    HrlHeader,
    LogSummary,
    Record,
    RecordKind,
    decode_header,
    encode_header,
)
from hvr_common.pure.hrl_decoder import ASSEMBLE_BYTES, HrlDecoder, decode_bytes
from hvr_common.pure.stream_decoder import NEED_DATA

U64 = 2**64 - 1
DISK = 1 << 16

HEADER_1 = HrlHeader(
    vm_id=uuid.UUID("6f1c1d9e-8a44-4f5e-9d7e-0b1f7c2a9d01"),
    disk_id=uuid.UUID("0b8e9d1c-2f3a-4b5c-8d6e-7f8091a2b3c4"),
    generation=3, sequence=7, disk_size=DISK, created_ns=1_700_000_000_000_000_000,
)


# --- helpers ----------------------------------------------------------------------------------

def build_log(header: HrlHeader, ops, *, closed_ns: int | None = 1_700_000_001_000_000_000):
    """Encode ``ops`` ((kind, offset, data-or-length, flags)); return (bytes, expected records, encoder)."""
    enc = HrlEncoder(header)
    out = bytearray(enc.header_bytes())
    expected = []
    for kind, offset, arg, flags in ops:
        position = enc.position
        if kind is RecordKind.WRITE:
            out += enc.write(offset, arg, flags)
            out += arg
            expected.append(Record(kind, flags, offset, len(arg), position, position + RECORD_SIZE, bytes(arg)))
        elif kind is RecordKind.TRIM:
            out += enc.trim(offset, arg, flags)
            expected.append(Record(kind, flags, offset, arg, position, position + RECORD_SIZE, None))
        else:
            out += enc.zero(offset, arg, flags)
            expected.append(Record(kind, flags, offset, arg, position, position + RECORD_SIZE, None))
        assert enc.position == len(out)
    if closed_ns is not None:
        out += enc.end(closed_ns)
        assert enc.position == len(out)
    return bytes(out), expected, enc


def feed(data: bytes, splits, keep_data: bool = True):
    """Feed ``data`` in pieces cut at ``splits``; return every event up to and including the summary."""
    decoder = HrlDecoder(keep_data=keep_data)
    events = []
    cuts = sorted(set(s for s in splits if 0 < s < len(data)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    for piece in pieces:
        decoder.receive_data(piece)
        while (event := decoder.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, LogSummary):
                break
        if events and isinstance(events[-1], LogSummary):
            break
    if not events or not isinstance(events[-1], LogSummary):
        events.append(decoder.finish())
    return events


def mixed_ops(rng: random.Random, count: int, disk: int = DISK):
    ops = []
    for _ in range(count):
        kind = rng.choice([RecordKind.WRITE, RecordKind.WRITE, RecordKind.TRIM, RecordKind.ZERO])
        length = rng.randint(1, 200)
        offset = rng.randrange(0, disk - length + 1)
        if kind is RecordKind.WRITE:
            ops.append((kind, offset, rng.randbytes(length), rng.choice([0, RECORD_FLAG_FUA])))
        elif kind is RecordKind.TRIM:
            ops.append((kind, offset, length, rng.choice([0, RECORD_FLAG_FUA])))
        else:
            ops.append((kind, offset, length, rng.choice([0, RECORD_FLAG_NO_HOLE, 3])))
    return ops


SMALL_OPS = [
    (RecordKind.WRITE, 0, b"hello, replica", 0),
    (RecordKind.TRIM, 4096, 8192, 0),
    (RecordKind.WRITE, 100, bytes(range(40)), RECORD_FLAG_FUA),
    (RecordKind.ZERO, 512, 1024, RECORD_FLAG_NO_HOLE),
    (RecordKind.WRITE, DISK - 3, b"end", 0),
]


@pytest.fixture(scope="module")
def small_log():
    data, expected, enc = build_log(HEADER_1, SMALL_OPS)
    return data, expected, enc


# --- strategies -------------------------------------------------------------------------------

headers = st.builds(
    HrlHeader,
    vm_id=st.uuids(), disk_id=st.uuids(),
    generation=st.integers(0, U64), sequence=st.integers(0, U64),
    disk_size=st.integers(0, U64), created_ns=st.integers(0, U64),
)


@st.composite
def op_lists(draw, disk: int = DISK, max_ops: int = 12):
    ops = []
    for _ in range(draw(st.integers(0, max_ops))):
        kind = draw(st.sampled_from([RecordKind.WRITE, RecordKind.TRIM, RecordKind.ZERO]))
        if kind is RecordKind.WRITE:
            data = draw(st.binary(min_size=1, max_size=600))
            offset = draw(st.integers(0, disk - len(data)))
            ops.append((kind, offset, data, draw(st.sampled_from([0, RECORD_FLAG_FUA]))))
        else:
            length = draw(st.integers(1, disk))
            offset = draw(st.integers(0, disk - length))
            flags = [0, RECORD_FLAG_FUA] + ([RECORD_FLAG_NO_HOLE, 3] if kind is RecordKind.ZERO else [])
            ops.append((kind, offset, length, draw(st.sampled_from(flags))))
    return ops


# --- header -----------------------------------------------------------------------------------

def test_struct_sizes():
    assert HEADER.size == HEADER_SIZE == 128
    assert RECORD.size == RECORD_SIZE == 32
    assert END_PAYLOAD.size == 24
    assert MAX_RECORD_LENGTH == 32 * 1024 * 1024
    assert VERSION == 1 and MAGIC == b"HVR-HRL\n" and RECORD_MAGIC == 0x52524C48
    assert issubclass(HrlCorruptError, CorruptError) and HrlCorruptError.code == "hrl_corrupt"


@given(headers)
def test_header_round_trip(header):
    raw = encode_header(header)
    assert len(raw) == HEADER_SIZE
    assert raw[:8] == MAGIC
    assert decode_header(raw) == header
    assert zlib.crc32(raw[:124]) == int.from_bytes(raw[124:], "little")


def test_header_layout_is_the_documented_one():
    raw = encode_header(HEADER_1)
    assert raw[0:8] == b"HVR-HRL\n"
    assert struct.unpack_from("<HHI", raw, 8) == (1, 128, 0)
    assert raw[16:32] == HEADER_1.vm_id.bytes
    assert raw[32:48] == HEADER_1.disk_id.bytes
    assert struct.unpack_from("<QQQQ", raw, 48) == (3, 7, DISK, HEADER_1.created_ns)
    assert raw[80:124] == bytes(44)


def _reseal(raw: bytearray) -> bytes:
    raw[124:128] = zlib.crc32(bytes(raw[:124])).to_bytes(4, "little")
    return bytes(raw)


def _patched(offset: int, value: bytes, *, reseal: bool = True) -> bytes:
    raw = bytearray(encode_header(HEADER_1))
    raw[offset:offset + len(value)] = value
    return _reseal(raw) if reseal else bytes(raw)


@pytest.mark.parametrize("raw, message", [
    (_patched(0, b"QFI\xfb"), "not an HRL file"),
    (_patched(8, struct.pack("<H", 2)), "unsupported HRL version 2"),
    (_patched(60, b"\x01", reseal=False), "header checksum mismatch"),
    (_patched(124, b"\x00\x00\x00\x00", reseal=False), "header checksum mismatch"),
    (_patched(10, struct.pack("<H", 256)), "header_size"),
    (_patched(12, struct.pack("<I", 1)), "unsupported flags"),
    (_patched(100, b"\x01"), "reserved"),
    (encode_header(HEADER_1)[:127], "truncated HRL header"),
])
def test_decode_header_says_what_is_wrong(raw, message):
    with pytest.raises(HrlCorruptError, match=message) as info:
        decode_header(raw)
    assert isinstance(info.value, HvrError) and info.value.code == "hrl_corrupt"


def test_errors_say_which_part_of_the_log_is_bad(small_log):
    """Recovery treats a bad header (nothing was durable) unlike a bad end (a closed log)."""
    data, _, _ = small_log
    for damaged, part in ((data[:100], "header"), (b"x" + data[1:], "header"), (data + b"\0", "end")):
        with pytest.raises(HrlCorruptError) as info:
            decode_bytes(damaged)
        assert info.value.detail["part"] == part
    with pytest.raises(HrlCorruptError) as info:
        decode_bytes(data[:-1])[2].require_clean("log")
    assert info.value.detail["part"] == "records"


def test_unknown_version_is_refused_before_its_checksum():
    # a later version may checksum differently: the version alone decides
    raw = _patched(8, struct.pack("<H", 2), reseal=False)
    with pytest.raises(HrlCorruptError, match="unsupported HRL version 2"):
        decode_header(raw)


@pytest.mark.parametrize("field", ["generation", "sequence", "disk_size", "created_ns"])
def test_encode_header_rejects_values_beyond_u64(field):
    values = {"generation": 0, "sequence": 0, "disk_size": 0, "created_ns": 0, field: 2**64}
    with pytest.raises(ValueError, match=field):
        encode_header(HrlHeader(uuid.uuid4(), uuid.uuid4(), **values))


# --- records ----------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(headers.map(lambda h: HrlHeader(h.vm_id, h.disk_id, h.generation, h.sequence, DISK, h.created_ns)),
       op_lists(), st.integers(0, U64))
def test_log_round_trip(header, ops, closed_ns):
    data, expected, enc = build_log(header, ops, closed_ns=closed_ns)
    got_header, records, summary = decode_bytes(data)
    assert got_header == header
    assert records == expected
    assert summary == LogSummary(
        clean=True, record_count=len(ops), write_bytes=sum(len(a) for k, _, a, _ in ops if k is RecordKind.WRITE),
        valid_length=len(data), torn_bytes=0, closed_ns=closed_ns, final_crc=enc.crc, reason=None,
    )
    assert enc.record_count == summary.record_count and enc.write_bytes == summary.write_bytes


@settings(max_examples=100, deadline=None)
@given(op_lists(), st.lists(st.integers(0, 4000), max_size=30), st.booleans(), st.booleans())
def test_any_split_of_the_input_gives_the_same_events(ops, splits, keep_data, closed):
    data, _, _ = build_log(HEADER_1, ops, closed_ns=5 if closed else None)
    whole = feed(data, [], keep_data)
    assert feed(data, splits, keep_data) == whole
    assert whole[0] == HEADER_1
    assert whole[-1].clean is closed


def test_byte_by_byte_equals_whole(small_log):
    data, expected, _ = small_log
    for keep_data in (True, False):
        whole = feed(data, [], keep_data)
        bytewise = feed(data, range(len(data)), keep_data)
        assert bytewise == whole
        assert [r.data for r in whole[1:-1]] == ([r.data for r in expected] if keep_data else [None] * len(expected))
        assert whole[-1].clean


def test_keep_data_false_streams_payload_without_holding_it():
    payload = random.Random(1).randbytes(1 << 20)
    data, _, _ = build_log(HEADER_1.__class__(**{**_fields(HEADER_1), "disk_size": 1 << 21}),
                           [(RecordKind.WRITE, 4096, payload, 0)])
    decoder = HrlDecoder(keep_data=False)
    most = 0
    events = []
    for i in range(0, len(data), 4096):
        decoder.receive_data(data[i:i + 4096])
        most = max(most, decoder.buffered_bytes)
        while (event := decoder.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, LogSummary):
                break
        most = max(most, decoder.buffered_bytes)
    assert most <= 4096
    assert events[1] == Record(RecordKind.WRITE, 0, 4096, 1 << 20, 128, 160, None)
    assert events[-1].clean and events[-1].write_bytes == 1 << 20
    # and a flipped payload byte is still caught without the payload being kept
    bad = bytearray(data)
    bad[160 + 777_777] ^= 0x10
    _, records, summary = decode_bytes(bytes(bad), keep_data=False)
    assert records == [] and not summary.clean and summary.reason == "record checksum mismatch at 128"


def _fields(header: HrlHeader) -> dict:
    return {f: getattr(header, f) for f in HrlHeader.__dataclass_fields__}


def test_record_layout_and_crc_chain(small_log):
    data, expected, enc = small_log
    prev = int.from_bytes(data[124:128], "little")
    for record in expected:
        p = record.position
        magic, kind, flags, res16, offset, length, plen, crc, res32 = RECORD.unpack_from(data, p)
        assert (magic, kind, flags, res16, res32) == (RECORD_MAGIC, record.kind, record.flags, 0, 0)
        assert (offset, length) == (record.offset, record.length)
        assert plen == (record.length if record.kind is RecordKind.WRITE else 0)
        assert crc == zlib.crc32(data[p + 32:p + 32 + plen], zlib.crc32(data[p:p + 24], prev))
        prev = crc
    end = len(data) - 56
    assert RECORD.unpack_from(data, end)[:7] == (RECORD_MAGIC, 0x7F, 0, 0, 0, 0, 24)
    assert END_PAYLOAD.unpack_from(data, end + 32) == (5, 14 + 40 + 3, 1_700_000_001_000_000_000)
    assert enc.crc == zlib.crc32(data[end + 32:], zlib.crc32(data[end:end + 24], prev))


def test_encoder_takes_bytearray_and_memoryview():
    payload = bytes(range(256)) * 4
    outputs = []
    for data in (payload, bytearray(payload), memoryview(payload), memoryview(bytearray(payload))):
        enc = HrlEncoder(HEADER_1)
        outputs.append(enc.write(10, data) + enc.end(1))
    assert len(set(outputs)) == 1


@pytest.mark.parametrize("call, message", [
    (lambda e: e.write(0, b""), "length 0"),
    (lambda e: e.trim(0, 0), "length 0"),
    (lambda e: e.zero(5, -1), "length -1"),
    (lambda e: e.write(DISK - 1, b"ab"), "outside disk"),
    (lambda e: e.write(-1, b"ab"), "outside disk"),
    (lambda e: e.trim(DISK, 1), "outside disk"),
    (lambda e: e.zero(1, DISK), "outside disk"),
    (lambda e: e.write(0, b"x", RECORD_FLAG_NO_HOLE), "flags"),
    (lambda e: e.trim(0, 1, RECORD_FLAG_NO_HOLE), "flags"),
    (lambda e: e.zero(0, 1, 0x80), "flags"),
    (lambda e: e.trim(0, 2**32), "length"),
])
def test_encoder_rejects_bad_arguments(call, message):
    enc = HrlEncoder(HEADER_1)
    before = (enc.crc, enc.position, enc.record_count)
    with pytest.raises(ValueError, match=message):
        call(enc)
    assert (enc.crc, enc.position, enc.record_count) == before


def test_encoder_write_limit():
    big = HrlHeader(uuid.uuid4(), uuid.uuid4(), 0, 0, 1 << 30, 0)
    enc = HrlEncoder(big)
    assert len(enc.write(0, bytes(MAX_RECORD_LENGTH))) == RECORD_SIZE
    with pytest.raises(ValueError, match="length"):
        enc.write(0, bytes(MAX_RECORD_LENGTH + 1))


def test_encoder_refuses_records_after_end():
    enc = HrlEncoder(HEADER_1)
    assert len(enc.end(1)) == 56
    with pytest.raises(ValueError, match="END"):
        enc.trim(0, 1)
    with pytest.raises(ValueError, match="END"):
        enc.end(2)


def test_zero_disk_size_log_holds_no_records():
    header = HrlHeader(uuid.uuid4(), uuid.uuid4(), 0, 0, 0, 0)
    enc = HrlEncoder(header)
    with pytest.raises(ValueError):
        enc.write(0, b"x")
    _, records, summary = decode_bytes(enc.header_bytes() + enc.end(0))
    assert records == [] and summary.clean


# --- damage -----------------------------------------------------------------------------------

def _outcome(data: bytes):
    """("error", message) or (records, summary)."""
    try:
        _, records, summary = decode_bytes(data)
    except HrlCorruptError as e:
        return "error", str(e)
    return records, summary


def test_truncation_at_every_offset_is_detected(small_log):
    data, expected, _ = small_log
    ends = [r.position for r in expected[1:]] + [len(data) - 56]
    for n in range(len(data)):
        outcome = _outcome(data[:n])
        if n < HEADER_SIZE:
            assert outcome[0] == "error", n
            assert ("truncated HRL header" in outcome[1]) or ("empty" in outcome[1])
            continue
        records, summary = outcome
        assert not summary.clean, n
        # what is left is exactly the records that fit, and the rest is the torn tail
        fitting = [r for r, end in zip(expected, ends) if end <= n]
        assert records == fitting, n
        assert summary.valid_length == (fitting[-1].position + RECORD_SIZE
                                         + (fitting[-1].length if fitting[-1].kind is RecordKind.WRITE else 0)
                                         if fitting else HEADER_SIZE)
        assert summary.torn_bytes == n - summary.valid_length
        assert summary.reason.startswith("truncated record at" if summary.torn_bytes else "no end record")
        with pytest.raises(HrlCorruptError, match="is not cleanly closed"):
            summary.require_clean("log")


def test_bit_flip_at_every_byte_is_detected(small_log):
    data, expected, _ = small_log
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            outcome = _outcome(bytes(flipped))
            if outcome[0] == "error":
                assert i < HEADER_SIZE or i >= len(data) - 56, (i, bit, outcome)
                continue
            records, summary = outcome
            assert not summary.clean, (i, bit)
            # only records wholly before the damage survive
            assert records == expected[:len(records)], (i, bit)
            assert all(r.position + RECORD_SIZE + (r.length if r.data else 0) <= i for r in records), (i, bit)


def test_bit_flips_in_the_header_say_what_is_wrong(small_log):
    data, _, _ = small_log
    for i in range(HEADER_SIZE):
        flipped = bytearray(data)
        flipped[i] ^= 0x04
        with pytest.raises(HrlCorruptError, match="not an HRL file|unsupported HRL version|checksum"):
            decode_bytes(bytes(flipped))


def test_dropped_reordered_and_spliced_records_are_detected(small_log):
    data, expected, _ = small_log
    spans = [(r.position, (expected[i + 1].position if i + 1 < len(expected) else len(data) - 56))
             for i, r in enumerate(expected)]
    chunks = [data[a:b] for a, b in spans]
    head, end = data[:HEADER_SIZE], data[-56:]
    dropped = head + b"".join(chunks[:2] + chunks[3:]) + end
    swapped = head + b"".join([chunks[0], chunks[2], chunks[1], *chunks[3:]]) + end
    # the same records written to another log (another disk): identical bytes, other chain
    other, _, _ = build_log(HrlHeader(HEADER_1.vm_id, uuid.uuid4(), 3, 7, DISK, 0), SMALL_OPS)
    spliced = data[:spans[2][0]] + other[spans[2][0]:]
    for damaged, survivors in ((dropped, 2), (swapped, 1), (spliced, 2)):
        records, summary = _outcome(damaged)
        assert not summary.clean
        assert records == expected[:survivors]
        assert summary.reason == f"record checksum mismatch at {spans[survivors][0]}"


def test_torn_tail_of_an_active_log_ends_it(small_log):
    data, expected, _ = small_log
    active = data[:-56]  # no END: the agent was still writing
    _, records, summary = decode_bytes(active)
    assert records == expected
    assert not summary.clean and summary.reason == "no end record after 5 records"
    assert summary.torn_bytes == 0 and summary.valid_length == len(active) and summary.closed_ns is None
    tails = {
        "half a record header": (data[len(active):len(active) + 20], "truncated record at"),
        "zeroes (unwritten pages)": (bytes(4096), "bad record magic at"),
        "garbage": (random.Random(3).randbytes(300), "bad record magic at"),
        "a record of the next log": (active[expected[1].position:expected[2].position], "record checksum mismatch at"),
    }
    for tail, reason in tails.values():
        _, records, summary = decode_bytes(active + tail)
        assert records == expected
        assert not summary.clean and summary.reason.startswith(reason)
        assert summary.reason.endswith(str(len(active)))
        assert summary.valid_length == len(active) and summary.torn_bytes == len(tail)


def test_invalid_record_ends_the_log_even_if_valid_records_follow(small_log):
    data, expected, _ = small_log
    broken = bytearray(data)
    broken[expected[1].position + 28] = 1  # reserved u32, outside the checksum
    _, records, summary = decode_bytes(bytes(broken))
    assert records == expected[:1]
    assert summary.reason == f"record reserved fields not zero at {expected[1].position}"


def test_stop_is_final_and_later_data_is_tail():
    data, expected, _ = build_log(HEADER_1, SMALL_OPS[:2], closed_ns=None)
    decoder = HrlDecoder()
    decoder.receive_data(data + b"\xff" * 40)
    events = [decoder.next_event() for _ in range(4)]
    assert events == [HEADER_1, *expected, NEED_DATA]
    decoder.receive_data(data)  # anything more is ignored: the log ended
    assert decoder.next_event() is NEED_DATA
    summary = decoder.finish()
    assert summary.torn_bytes == 40 + len(data) and summary.reason == f"bad record magic at {len(data)}"
    assert decoder.finish() == summary


def _record_header(kind, flags=0, offset=0, length=1, payload_length=0, magic=RECORD_MAGIC,
                   res16=0, res32=0) -> bytes:
    return RECORD.pack(magic, kind, flags, res16, offset, length, payload_length, 0, res32)


@pytest.mark.parametrize("header, reason", [
    (_record_header(1, length=2**32 - 1, payload_length=2**32 - 1, offset=0), "beyond disk size"),
    (_record_header(1, length=DISK, payload_length=DISK + 1), "WRITE payload length differs"),
    (_record_header(2, length=0), "zero-length TRIM"),
    (_record_header(3, offset=DISK, length=1), "beyond disk size"),
    (_record_header(2, payload_length=1), "TRIM with a payload"),
    (_record_header(9), "unknown record kind 0x9"),
    (_record_header(1, flags=RECORD_FLAG_NO_HOLE, payload_length=1), "invalid flags 0x2 for WRITE"),
    (_record_header(0x7F, length=0, payload_length=23), "malformed end record"),
    (_record_header(0x7F, flags=1, length=0, payload_length=24), "invalid flags"),
    (_record_header(2, res16=1), "reserved"),
    (_record_header(2, magic=RECORD_MAGIC ^ 1), "bad record magic"),
])
def test_invalid_record_header_stops_without_waiting_for_payload(header, reason):
    decoder = HrlDecoder()
    decoder.receive_data(encode_header(HEADER_1) + header)
    assert decoder.next_event() == HEADER_1
    assert decoder.next_event() is NEED_DATA
    assert decoder.state == "torn" and decoder.buffered_bytes == 0
    summary = decoder.finish()
    assert summary.reason == f"{reason} at 128" or (reason in summary.reason and summary.reason.endswith(" at 128"))


def test_oversized_write_is_refused_from_its_header():
    big = HrlHeader(uuid.uuid4(), uuid.uuid4(), 0, 0, 1 << 40, 0)
    decoder = HrlDecoder()
    decoder.receive_data(encode_header(big) + _record_header(1, length=MAX_RECORD_LENGTH + 1,
                                                             payload_length=MAX_RECORD_LENGTH + 1))
    decoder.next_event()
    assert decoder.next_event() is NEED_DATA
    assert decoder.finish().reason == f"WRITE of {MAX_RECORD_LENGTH + 1} bytes exceeds {MAX_RECORD_LENGTH} at 128"


def test_data_after_end_record_is_an_error(small_log):
    data, _, _ = small_log
    with pytest.raises(HrlCorruptError, match=f"data after end record at {len(data)}"):
        decode_bytes(data + b"\0")
    decoder = HrlDecoder()
    for i in range(len(data)):
        decoder.receive_data(data[i:i + 1])
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, LogSummary):
                break
    assert decoder.next_event().clean  # the summary, again
    decoder.receive_data(b"x")
    with pytest.raises(HrlCorruptError, match="data after end record"):
        decoder.next_event()
    with pytest.raises(HrlCorruptError, match="data after end record"):
        decoder.finish()


def test_end_record_with_wrong_counts_is_corrupt():
    enc = HrlEncoder(HEADER_1)
    data = enc.header_bytes() + enc.trim(0, 10)
    enc.record_count += 1  # a writer that lost count: the checksum is right, the content is not
    with pytest.raises(HrlCorruptError, match="counts 2 records"):
        decode_bytes(data + enc.end(1))


def test_a_second_end_record_is_data_after_end():
    enc = HrlEncoder(HEADER_1)
    data = enc.header_bytes() + enc.end(1)
    enc._closed = False
    with pytest.raises(HrlCorruptError, match="data after end record"):
        decode_bytes(data + enc.end(2))


def test_non_hrl_input_is_refused_as_soon_as_the_magic_differs():
    decoder = HrlDecoder()
    decoder.receive_data(b"HVR")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"_")
    with pytest.raises(HrlCorruptError, match="not an HRL file"):
        decoder.next_event()


def test_finish_on_empty_or_partial_header():
    with pytest.raises(HrlCorruptError, match="empty file"):
        HrlDecoder().finish()
    decoder = HrlDecoder()
    decoder.receive_data(encode_header(HEADER_1)[:50])
    assert decoder.next_event() is NEED_DATA
    with pytest.raises(HrlCorruptError, match="truncated HRL header: 50 of 128 bytes"):
        decoder.finish()


def test_finish_with_undelivered_events_is_a_programming_error(small_log):
    decoder = HrlDecoder()
    decoder.receive_data(small_log[0])
    decoder.next_event()
    with pytest.raises(RuntimeError, match="undelivered"):
        decoder.finish()


def test_require_clean():
    _, _, summary = decode_bytes(build_log(HEADER_1, SMALL_OPS)[0])
    summary.require_clean("log 7")  # no error
    torn = decode_bytes(build_log(HEADER_1, SMALL_OPS, closed_ns=None)[0])[2]
    with pytest.raises(HrlCorruptError) as info:
        torn.require_clean("HRL file disk0.img.0000000007.hrl")
    assert info.value.message == ("HRL file disk0.img.0000000007.hrl is not cleanly closed: "
                                  "no end record after 5 records")
    assert info.value.hint and info.value.detail["record_count"] == 5


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes_after_a_header_never_crash(tail, keep_data):
    decoder_input = encode_header(HEADER_1) + tail
    try:
        _, records, summary = decode_bytes(decoder_input, keep_data=keep_data)
    except HrlCorruptError:
        return
    assert summary.valid_length + summary.torn_bytes == len(decoder_input)
    assert summary.clean is False or summary.torn_bytes == 0


# --- purity -----------------------------------------------------------------------------------

ALLOWED_IMPORTS = {
    "hrl.py": {"__future__", "enum", "struct", "uuid", "zlib", "zlib_ng", "dataclasses", "hvr_common.pure.errors"},
    "hrl_decoder.py": {"__future__", "enum", "zlib", "zlib_ng", "hvr_common.pure.hrl",
                       "hvr_common.pure.stream_decoder"},
    "stream_decoder.py": {"__future__", "enum"},
    "extents.py": {"__future__", "heapq", "collections.abc", "dataclasses", "hvr_common.pure.hrl"},
}


@pytest.mark.parametrize("module", sorted(ALLOWED_IMPORTS))
def test_pure_modules_import_only_what_they_may(module):
    tree = ast.parse((Path(hrl.__file__).parent / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS[module]


# --- large records arriving in pieces (assembled in a buffer of their own) ----------------------

BIG_DISK = 1 << 24


def _big_log(seed: int, sizes: list[int], closed: bool) -> tuple[bytes, list[Record]]:
    rng = random.Random(seed)
    header = HrlHeader(**{**_fields(HEADER_1), "disk_size": BIG_DISK})
    ops = [(RecordKind.WRITE, rng.randrange(0, BIG_DISK - n), rng.randbytes(n), 0) for n in sizes]
    data, expected, _ = build_log(header, ops, closed_ns=9 if closed else None)
    return data, expected


def _feed_lending(data: bytes, splits) -> list:
    """Like ``feed`` with ``lend_data``: each lent payload is copied before the next call (as a writer does).

    Every piece is a view of one buffer the caller reuses: once the decoder has
    answered NEED_DATA the buffer is scribbled over and resized, which fails
    (BufferError) or corrupts the records if the decoder still held any of it.
    """
    decoder = HrlDecoder(keep_data=True, lend_data=True)
    events = []
    cuts = sorted(set(s for s in splits if 0 < s < len(data)))
    reused = bytearray()
    for a, b in zip([0, *cuts], [*cuts, len(data)]):
        reused[:] = data[a:b]
        view = memoryview(reused)
        decoder.receive_data(view)
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, Record) and event.data is not None:
                assert isinstance(event.data, memoryview)
                event = Record(event.kind, event.flags, event.offset, event.length, event.position,
                               event.data_position, bytes(event.data))
            events.append(event)
            if isinstance(event, LogSummary):
                return events
        view.release()
        reused[:] = b"\xa5" * (len(reused) + 1)
    events.append(decoder.finish())
    return events


big_sizes = st.lists(st.one_of(st.integers(1, 300), st.integers(ASSEMBLE_BYTES - 1, 3 * ASSEMBLE_BYTES)),
                     min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), big_sizes, st.lists(st.integers(0, 1 << 20), max_size=40), st.booleans())
def test_large_records_split_anywhere_decode_like_the_whole(seed, sizes, splits, closed):
    data, expected = _big_log(seed, sizes, closed)
    whole = feed(data, [], True)
    assert [e for e in whole if isinstance(e, Record)] == expected
    assert feed(data, splits, True) == whole
    assert feed(data, splits, False) == feed(data, [], False)
    assert _feed_lending(data, splits) == whole


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), big_sizes, st.lists(st.integers(0, 1 << 20), max_size=10),
       st.floats(0, 1), st.integers(0, 7))
def test_large_records_cut_short_or_damaged_keep_only_what_is_whole(seed, sizes, splits, where, bit):
    data, expected = _big_log(seed, sizes, True)
    at = HEADER_SIZE + int(where * (len(data) - HEADER_SIZE - 1))
    truncated = data[:at]
    flipped = bytearray(data)
    flipped[at] ^= 1 << bit
    for damaged in (truncated, bytes(flipped)):
        events = feed(damaged, splits, True)
        records = [e for e in events if isinstance(e, Record)]
        summary = events[-1]
        assert not summary.clean  # a cut or a flipped bit anywhere after the header is always noticed
        assert records == expected[:len(records)]
        assert all(r.data_position + r.length <= at for r in records)
        assert _feed_lending(damaged, splits) == events
        if isinstance(summary, LogSummary):
            assert summary.valid_length + summary.torn_bytes == len(damaged)


def test_a_record_being_assembled_is_held_once():
    payload = random.Random(3).randbytes(1 << 20)
    data, _, _ = build_log(HrlHeader(**{**_fields(HEADER_1), "disk_size": 1 << 21}),
                           [(RecordKind.WRITE, 0, payload, 0)], closed_ns=1)
    decoder = HrlDecoder(keep_data=True)
    most = 0
    for i in range(0, len(data), 65536):
        decoder.receive_data(data[i:i + 65536])
        most = max(most, decoder.buffered_bytes)
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, Record):
                assert event.data == payload
            if isinstance(event, LogSummary):
                break
    assert RECORD_SIZE + len(payload) <= most <= RECORD_SIZE + len(payload) + 65536


def test_a_bytearray_fed_while_a_large_record_assembles_is_copied_at_once():
    """Only bytes and memoryviews are kept until NEED_DATA; a bytearray the caller may change
    right away is copied, also its part past the record being assembled."""
    header = HrlHeader(**{**_fields(HEADER_1), "disk_size": BIG_DISK})
    first, second = random.Random(3).randbytes(3 * ASSEMBLE_BYTES), b"second record"
    data, expected, _ = build_log(header, [(RecordKind.WRITE, 0, first, 0),
                                           (RecordKind.WRITE, 1 << 20, second, 0)], closed_ns=5)
    cut = HEADER_SIZE + RECORD_SIZE + ASSEMBLE_BYTES  # inside the first record's payload
    decoder = HrlDecoder(keep_data=True)
    decoder.receive_data(data[:cut])
    while decoder.next_event() is not NEED_DATA:
        pass
    rest = bytearray(data[cut:])
    decoder.receive_data(rest)
    rest[:] = bytes(len(rest))  # the caller reuses its buffer before asking for events
    events = []
    while not isinstance(event := decoder.next_event(), LogSummary):
        assert event is not NEED_DATA, "the log ended early: the fed bytes were not copied"
        events.append(event)
    assert [(r.offset, r.data) for r in events] == [(0, first), (1 << 20, second)]
    assert event.clean
