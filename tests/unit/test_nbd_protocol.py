"""The sans-I/O NBD server core (``hvr_common.pure.nbd_protocol`` and its ``nbd_*`` modules), tested without sockets.

Client bytes are built, and server bytes parsed, by a small client-side codec
written in this file from NetworkBlockDevice/nbd ``doc/proto.md``.  It shares
no constant or struct with the module under test, so a wire-format mistake
made in both places cannot hide.

Layout: the client codec; a harness (connections, feeding, draining); the
handshake; each option; the transmission phase; the reply builders; the
property tests (chunking independence, fuzzing); and, last, regression tests
for spec rules the core once broke.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvr_common.pure.nbd_events import (
    NEED_DATA, Disconnect, ExportInfo, NbdProtocolError, Negotiated, OptionHandled, Rejected, Request,
)
from hvr_common.pure.nbd_protocol import NbdServerConnection

KiB = 1024
MiB = 1024 * KiB

# --- the client side of the wire, written from doc/proto.md -----------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
HS_FIXED_NEWSTYLE = 1 << 0
HS_NO_ZEROES = 1 << 1
C_FIXED_NEWSTYLE = 1 << 0
C_NO_ZEROES = 1 << 1

# transmission flags
T_HAS_FLAGS = 1 << 0
T_READ_ONLY = 1 << 1
T_SEND_FLUSH = 1 << 2
T_SEND_FUA = 1 << 3
T_SEND_TRIM = 1 << 5
T_SEND_WRITE_ZEROES = 1 << 6
T_CAN_MULTI_CONN = 1 << 8

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_INVALID = 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7
REP_ERR_TOO_BIG = 2**31 + 9

# NBD_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
F_FUA = 1 << 0
F_NO_HOLE = 1 << 1
F_DF = 1 << 2
F_REQ_ONE = 1 << 3
F_FAST_ZERO = 1 << 4

# structured reply chunk types and flags
CHUNK_FLAG_DONE = 1 << 0
CHUNK_OFFSET_DATA = 1
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = 32769  # 2^15 + 1

# errno values on the wire
NBD_EPERM = 1
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75

BASE_ALLOCATION = "base:allocation"
MAX_STRING_BYTES = 4096


def c_client_flags(flags: int) -> bytes:
    return struct.pack(">I", flags)


def c_option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def c_info_go_data(name: str, info_requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(info_requests))
            + b"".join(struct.pack(">H", r) for r in info_requests))


def c_meta_data(name: str, queries: tuple[str, ...] = ()) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode()
        out += struct.pack(">I", len(qb)) + qb
    return out


def c_request(cmd: int, handle: int = 0, offset: int = 0, length: int = 0, flags: int = 0,
              payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


@dataclass(frozen=True)
class OptionReply:
    option: int
    reply: int
    payload: bytes

    @property
    def final(self) -> bool:
        return self.reply == REP_ACK or bool(self.reply & (1 << 31))


def parse_option_replies(wire: bytes) -> list[OptionReply]:
    """Split server bytes into option replies; fail on any trailing or malformed byte."""
    replies = []
    pos = 0
    while pos < len(wire):
        assert len(wire) - pos >= 20, f"truncated option reply header at {pos}"
        magic, option, reply, length = struct.unpack_from(">QIII", wire, pos)
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x} at {pos}"
        pos += 20
        assert len(wire) - pos >= length, "option reply payload runs past the data"
        replies.append(OptionReply(option, reply, bytes(wire[pos:pos + length])))
        pos += length
    return replies


@dataclass(frozen=True)
class SimpleReply:
    error: int
    handle: int


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    handle: int
    payload: bytes


def parse_replies(wire: bytes) -> list[SimpleReply | Chunk]:
    """Split transmission-phase server bytes (without read data) into replies."""
    replies: list[SimpleReply | Chunk] = []
    pos = 0
    while pos < len(wire):
        assert len(wire) - pos >= 4
        (magic,) = struct.unpack_from(">I", wire, pos)
        if magic == SIMPLE_REPLY_MAGIC:
            assert len(wire) - pos >= 16
            _, error, handle = struct.unpack_from(">IIQ", wire, pos)
            replies.append(SimpleReply(error, handle))
            pos += 16
        elif magic == STRUCTURED_REPLY_MAGIC:
            assert len(wire) - pos >= 20
            _, flags, ctype, handle, length = struct.unpack_from(">IHHQI", wire, pos)
            pos += 20
            assert len(wire) - pos >= length
            replies.append(Chunk(flags, ctype, handle, bytes(wire[pos:pos + length])))
            pos += length
        else:
            raise AssertionError(f"unknown reply magic {magic:#x} at {pos}")
    return replies


def decode_error_chunk(payload: bytes) -> tuple[int, str]:
    assert len(payload) >= 6
    error, msg_len = struct.unpack_from(">IH", payload, 0)
    assert len(payload) == 6 + msg_len, "error chunk length does not match its message length"
    return error, payload[6:].decode("utf-8")


def decode_info_export(payload: bytes) -> tuple[int, int]:
    info_type, size, flags = struct.unpack(">HQH", payload)
    assert info_type == INFO_EXPORT
    return size, flags


# --- harness ----------------------------------------------------------------
DISK = ExportInfo("disk0", size=1 * MiB, description="first disk")
RO_DISK = ExportInfo("ro-disk", size=64 * KiB, read_only=True)
ODD_DISK = ExportInfo("vm1/dïsk-2", size=3 * MiB + 512, multi_conn=False,
                      min_block=512, preferred_block=64 * KiB, max_block=1 * MiB)
EXPORTS = (DISK, RO_DISK, ODD_DISK)

WRITABLE_FLAGS = (T_HAS_FLAGS | T_SEND_FLUSH | T_SEND_FUA | T_SEND_TRIM | T_SEND_WRITE_ZEROES
                  | T_CAN_MULTI_CONN)
READ_ONLY_FLAGS = T_HAS_FLAGS | T_READ_ONLY | T_SEND_FLUSH | T_CAN_MULTI_CONN


def make_conn(exports=EXPORTS, **kw) -> NbdServerConnection:
    by_name = {e.name: e for e in exports}
    return NbdServerConnection(by_name.get, lambda: list(exports), **kw)


def drain(conn: NbdServerConnection, limit: int = 100_000) -> list:
    """All events available now; fails if ``next_event`` never says NEED_DATA."""
    events = []
    for _ in range(limit):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
    raise AssertionError("next_event never returned NEED_DATA")


def feed(conn: NbdServerConnection, data: bytes) -> list:
    conn.receive_data(data)
    return drain(conn)


def in_options(client_flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES, **kw) -> NbdServerConnection:
    conn = make_conn(**kw)
    assert feed(conn, c_client_flags(client_flags)) == []
    assert conn.data_to_send() == b""
    return conn


def negotiated(export: str = "disk0", *, structured: bool = False, meta: bool = False,
               **kw) -> NbdServerConnection:
    conn = in_options(**kw)
    if structured:
        feed(conn, c_option(OPT_STRUCTURED_REPLY))
    if meta:
        feed(conn, c_option(OPT_SET_META_CONTEXT, c_meta_data(export, (BASE_ALLOCATION,))))
    events = feed(conn, c_option(OPT_GO, c_info_go_data(export)))
    assert isinstance(events[-1], Negotiated)
    conn.data_to_send()
    return conn


def request_tuple(ev) -> tuple:
    assert type(ev) is Request, ev
    return (ev.cmd, ev.flags, ev.handle, ev.offset, ev.length, ev.data)


def event_key(ev):
    """A comparable form of any event (``Request`` has no ``__eq__``)."""
    if type(ev) is Request:
        return ("Request",) + request_tuple(ev)
    return ev


def expect_error_reply(conn: NbdServerConnection, *, structured: bool, handle: int, error: int) -> None:
    replies = parse_replies(conn.data_to_send())
    assert len(replies) == 1, replies
    reply = replies[0]
    if structured:
        assert isinstance(reply, Chunk)
        assert reply.flags == CHUNK_FLAG_DONE
        assert reply.type == CHUNK_ERROR
        assert reply.handle == handle
        got_error, message = decode_error_chunk(reply.payload)
        assert got_error == error
        assert message
    else:
        assert reply == SimpleReply(error, handle)


# --- handshake ----------------------------------------------------------------
def test_greeting_is_fixed_newstyle_with_no_zeroes():
    conn = make_conn()
    greeting = conn.greeting()
    assert greeting == bytes.fromhex("4e42444d41474943" "49484156454f5054" "0003")
    magic, opt_magic, flags = struct.unpack(">QQH", greeting)
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
    assert flags == HS_FIXED_NEWSTYLE | HS_NO_ZEROES
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("flags", [C_FIXED_NEWSTYLE, C_FIXED_NEWSTYLE | C_NO_ZEROES])
def test_known_client_flags_open_option_haggling(flags):
    conn = make_conn()
    conn.receive_data(c_client_flags(flags)[:3])
    assert conn.next_event() is NEED_DATA
    assert conn.phase == "client_flags"
    conn.receive_data(c_client_flags(flags)[3:])
    assert conn.next_event() is NEED_DATA
    assert conn.phase == "options"


@pytest.mark.parametrize("flags", [1 << 2, 1 << 15, 1 << 31, C_FIXED_NEWSTYLE | 1 << 2,
                                   C_FIXED_NEWSTYLE | C_NO_ZEROES | 1 << 31])
def test_unknown_client_flag_bits_are_fatal(flags):
    conn = make_conn()
    conn.receive_data(c_client_flags(flags))
    with pytest.raises(NbdProtocolError):
        conn.next_event()
    assert conn.phase == "closed"


@pytest.mark.parametrize("flags", [0, C_NO_ZEROES])
def test_client_without_fixed_newstyle_is_refused(flags):
    conn = make_conn()
    conn.receive_data(c_client_flags(flags))
    with pytest.raises(NbdProtocolError):
        conn.next_event()


def test_bad_option_magic_is_fatal():
    conn = in_options()
    conn.receive_data(struct.pack(">QII", NBDMAGIC, OPT_LIST, 0))
    with pytest.raises(NbdProtocolError):
        conn.next_event()


def test_option_split_across_receives_waits_for_all_of_it():
    conn = in_options()
    wire = c_option(OPT_GO, c_info_go_data("disk0"))
    for i in range(len(wire) - 1):
        conn.receive_data(wire[i:i + 1])
        assert conn.next_event() is NEED_DATA
        assert conn.data_to_send() == b""
    events = feed(conn, wire[-1:])
    assert [type(e) for e in events] == [Negotiated]


# --- NBD_OPT_LIST -----------------------------------------------------------------
def test_list_returns_every_export_then_ack():
    conn = in_options()
    events = feed(conn, c_option(OPT_LIST))
    assert events == [OptionHandled(OPT_LIST, REP_ACK)]
    replies = parse_option_replies(conn.data_to_send())
    assert [r.option for r in replies] == [OPT_LIST] * (len(EXPORTS) + 1)
    assert [r.reply for r in replies] == [REP_SERVER] * len(EXPORTS) + [REP_ACK]
    assert replies[-1].payload == b""
    listed = []
    for r in replies[:-1]:
        (name_len,) = struct.unpack_from(">I", r.payload, 0)
        assert name_len <= len(r.payload) - 4
        listed.append((r.payload[4:4 + name_len].decode(), r.payload[4 + name_len:].decode()))
    assert listed == [(e.name, e.description) for e in EXPORTS]
    assert conn.phase == "options"


def test_list_with_no_exports_is_a_lone_ack():
    conn = in_options(exports=())
    feed(conn, c_option(OPT_LIST))
    assert parse_option_replies(conn.data_to_send()) == [OptionReply(OPT_LIST, REP_ACK, b"")]


def test_list_with_data_is_invalid_and_the_session_continues():
    conn = in_options()
    events = feed(conn, c_option(OPT_LIST, b"x"))
    assert [(e.option, e.reply) for e in events] == [(OPT_LIST, REP_ERR_INVALID)]
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [(OPT_LIST, REP_ERR_INVALID)]
    assert replies[0].payload.decode()  # a human-readable reason
    assert isinstance(feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))[-1], Negotiated)


# --- NBD_OPT_INFO and NBD_OPT_GO ------------------------------------------------------
@pytest.mark.parametrize("export,flags", [(DISK, WRITABLE_FLAGS), (RO_DISK, READ_ONLY_FLAGS),
                                          (ODD_DISK, WRITABLE_FLAGS & ~T_CAN_MULTI_CONN)])
def test_info_without_requests_sends_info_export_then_ack(export, flags):
    conn = in_options()
    events = feed(conn, c_option(OPT_INFO, c_info_go_data(export.name)))
    assert events == [OptionHandled(OPT_INFO, REP_ACK)]
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [(OPT_INFO, REP_INFO), (OPT_INFO, REP_ACK)]
    assert decode_info_export(replies[0].payload) == (export.size, flags)
    assert conn.phase == "options"


def test_info_answers_name_block_size_and_description_requests():
    conn = in_options()
    feed(conn, c_option(OPT_INFO, c_info_go_data(
        ODD_DISK.name, (INFO_NAME, INFO_BLOCK_SIZE, 0x7777))))  # unknown request ignored
    replies = parse_option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [REP_INFO, REP_INFO, REP_INFO, REP_ACK]
    infos = {struct.unpack_from(">H", r.payload)[0]: r.payload[2:] for r in replies[:-1]}
    assert set(infos) == {INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE}
    assert infos[INFO_NAME].decode() == ODD_DISK.name
    assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (512, 64 * KiB, 1 * MiB)


def test_info_description_is_sent_when_the_export_has_one():
    conn = in_options()
    feed(conn, c_option(OPT_INFO, c_info_go_data("disk0", (INFO_DESCRIPTION,))))
    replies = parse_option_replies(conn.data_to_send())
    infos = {struct.unpack_from(">H", r.payload)[0]: r.payload[2:] for r in replies[:-1]}
    assert infos[INFO_DESCRIPTION].decode() == DISK.description


def test_go_enters_transmission_without_zero_padding():
    conn = in_options(client_flags=C_FIXED_NEWSTYLE)  # no NO_ZEROES: still no padding after GO
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0", (INFO_BLOCK_SIZE,))))
    assert events == [Negotiated(DISK, False, {})]
    replies = parse_option_replies(conn.data_to_send())  # fails on any trailing zero
    assert [(r.option, r.reply) for r in replies] == [(OPT_GO, REP_INFO)] * 2 + [(OPT_GO, REP_ACK)]
    assert decode_info_export(replies[0].payload) == (DISK.size, WRITABLE_FLAGS)
    assert struct.unpack(">HIII", replies[1].payload) == (INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)
    assert conn.phase == "transmission"
    assert conn.export == DISK


@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_info_go_unknown_export_is_err_unknown(option):
    conn = in_options()
    events = feed(conn, c_option(option, c_info_go_data("no-such-disk", (INFO_NAME,))))
    assert [(e.option, e.reply) for e in events] == [(option, REP_ERR_UNKNOWN)]
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [(option, REP_ERR_UNKNOWN)]  # no REP_INFO
    assert "no-such-disk" in replies[0].payload.decode()
    assert conn.phase == "options"


MALFORMED_INFO_GO = {
    "empty": b"",
    "short name length": b"\0\0\0",
    "name runs past the data": struct.pack(">I", 10) + b"disk0" + b"\0\0",
    "missing request count": struct.pack(">I", 5) + b"disk0",
    "count larger than list": struct.pack(">I", 5) + b"disk0" + struct.pack(">HH", 2, INFO_NAME),
    "count smaller than list": struct.pack(">I", 5) + b"disk0"
    + struct.pack(">HHH", 1, INFO_NAME, INFO_BLOCK_SIZE),
    "trailing byte": c_info_go_data("disk0") + b"\0",
    "NUL in name": c_info_go_data("disk\x000"),
    "name not UTF-8": struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",
    "name longer than 4096 bytes": c_info_go_data("d" * (MAX_STRING_BYTES + 1)),
}


@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
@pytest.mark.parametrize("data", MALFORMED_INFO_GO.values(), ids=MALFORMED_INFO_GO.keys())
def test_info_go_malformed_data_is_err_invalid(option, data):
    conn = in_options()
    events = feed(conn, c_option(option, data))
    assert [(e.option, e.reply) for e in events] == [(option, REP_ERR_INVALID)]
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [(option, REP_ERR_INVALID)]
    assert conn.phase == "options"
    assert isinstance(feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))[-1], Negotiated)


def test_info_then_go_on_another_export():
    conn = in_options()
    feed(conn, c_option(OPT_INFO, c_info_go_data("disk0")))
    conn.data_to_send()
    events = feed(conn, c_option(OPT_GO, c_info_go_data("ro-disk")))
    assert events == [Negotiated(RO_DISK, False, {})]


# --- NBD_OPT_EXPORT_NAME --------------------------------------------------------
def test_export_name_with_no_zeroes_sends_size_and_flags_only():
    conn = in_options(client_flags=C_FIXED_NEWSTYLE | C_NO_ZEROES)
    events = feed(conn, c_option(OPT_EXPORT_NAME, b"disk0"))
    assert events == [Negotiated(DISK, False, {})]
    assert conn.data_to_send() == struct.pack(">QH", DISK.size, WRITABLE_FLAGS)
    assert conn.phase == "transmission"


def test_export_name_without_no_zeroes_adds_124_zero_bytes():
    conn = in_options(client_flags=C_FIXED_NEWSTYLE)
    events = feed(conn, c_option(OPT_EXPORT_NAME, RO_DISK.name.encode()))
    assert events == [Negotiated(RO_DISK, False, {})]
    assert conn.data_to_send() == struct.pack(">QH", RO_DISK.size, READ_ONLY_FLAGS) + bytes(124)


def test_export_name_keeps_structured_replies_negotiated_before():
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    events = feed(conn, c_option(OPT_EXPORT_NAME, ODD_DISK.name.encode()))
    assert events == [Negotiated(ODD_DISK, True, {})]


@pytest.mark.parametrize("name", [b"no-such-disk", b"\xff\xfe", b"disk\x000", b""])
def test_export_name_that_cannot_be_served_is_fatal(name):
    conn = in_options()
    conn.receive_data(c_option(OPT_EXPORT_NAME, name))
    with pytest.raises(NbdProtocolError):
        conn.next_event()
    assert conn.phase == "closed"
    assert conn.data_to_send() == b""  # EXPORT_NAME cannot be answered with an error


# --- NBD_OPT_STRUCTURED_REPLY -------------------------------------------------------
def test_structured_reply_is_acked_and_reported_by_go():
    conn = in_options()
    events = feed(conn, c_option(OPT_STRUCTURED_REPLY))
    assert events == [OptionHandled(OPT_STRUCTURED_REPLY, REP_ACK)]
    assert parse_option_replies(conn.data_to_send()) == [OptionReply(OPT_STRUCTURED_REPLY, REP_ACK, b"")]
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, True, {})]


def test_structured_reply_with_data_is_invalid_and_not_negotiated():
    conn = in_options()
    events = feed(conn, c_option(OPT_STRUCTURED_REPLY, b"\0"))
    assert [(e.option, e.reply) for e in events] == [(OPT_STRUCTURED_REPLY, REP_ERR_INVALID)]
    conn.data_to_send()
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, False, {})]


# --- meta contexts ------------------------------------------------------------------
@pytest.mark.parametrize("option", [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT])
def test_meta_context_before_structured_replies_is_invalid(option):
    conn = in_options()
    events = feed(conn, c_option(option, c_meta_data("disk0", (BASE_ALLOCATION,))))
    assert [(e.option, e.reply) for e in events] == [(option, REP_ERR_INVALID)]
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [(option, REP_ERR_INVALID)]
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, False, {})]


def _set_meta(conn, name, queries):
    events = feed(conn, c_option(OPT_SET_META_CONTEXT, c_meta_data(name, queries)))
    return events, parse_option_replies(conn.data_to_send())


def test_set_meta_context_base_allocation_gets_a_context_id():
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    events, replies = _set_meta(conn, "disk0", (BASE_ALLOCATION,))
    assert events == [OptionHandled(OPT_SET_META_CONTEXT, REP_ACK)]
    assert [r.reply for r in replies] == [REP_META_CONTEXT, REP_ACK]
    (ctx_id,) = struct.unpack_from(">I", replies[0].payload)
    assert ctx_id != 0
    assert replies[0].payload[4:].decode() == BASE_ALLOCATION
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, True, {ctx_id: BASE_ALLOCATION})]
    assert conn.meta_contexts == {ctx_id: BASE_ALLOCATION}


@pytest.mark.parametrize("queries", [("x-unknown:thing",), ("nbd-server:foo", "qemu:dirty-bitmap:b0"), ()])
def test_set_meta_context_unknown_or_no_query_selects_nothing(queries):
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    events, replies = _set_meta(conn, "disk0", queries)
    assert events == [OptionHandled(OPT_SET_META_CONTEXT, REP_ACK)]
    assert replies == [OptionReply(OPT_SET_META_CONTEXT, REP_ACK, b"")]
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, True, {})]


def test_set_meta_context_ignores_unknown_beside_base_allocation():
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    _, replies = _set_meta(conn, "disk0", ("x-foo:bar", BASE_ALLOCATION, BASE_ALLOCATION))
    assert [r.reply for r in replies] == [REP_META_CONTEXT, REP_ACK]
    assert replies[0].payload[4:].decode() == BASE_ALLOCATION


def test_meta_contexts_set_for_another_export_are_dropped_by_go():
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    _set_meta(conn, "ro-disk", (BASE_ALLOCATION,))
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, True, {})]


def test_later_set_meta_context_replaces_the_earlier_one():
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    _set_meta(conn, "disk0", (BASE_ALLOCATION,))
    _set_meta(conn, "disk0", ())
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, True, {})]


@pytest.mark.parametrize("queries", [(), ("base:",), (BASE_ALLOCATION,)])
def test_list_meta_context_offers_base_allocation_with_id_zero(queries):
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    events = feed(conn, c_option(OPT_LIST_META_CONTEXT, c_meta_data("disk0", queries)))
    assert events == [OptionHandled(OPT_LIST_META_CONTEXT, REP_ACK)]
    replies = parse_option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [REP_META_CONTEXT, REP_ACK]
    assert replies[0].payload == struct.pack(">I", 0) + BASE_ALLOCATION.encode()
    # listing selects nothing
    assert feed(conn, c_option(OPT_GO, c_info_go_data("disk0"))) == [Negotiated(DISK, True, {})]


def test_list_meta_context_with_unknown_namespace_is_a_lone_ack():
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    feed(conn, c_option(OPT_LIST_META_CONTEXT, c_meta_data("disk0", ("x-other:",))))
    assert parse_option_replies(conn.data_to_send()) == [OptionReply(OPT_LIST_META_CONTEXT, REP_ACK, b"")]


MALFORMED_META = {
    "empty": b"",
    "name runs past the data": struct.pack(">I", 99) + b"disk0",
    "missing query count": struct.pack(">I", 5) + b"disk0",
    "query count too large": c_meta_data("disk0", (BASE_ALLOCATION,))[:9] + struct.pack(">I", 2)
    + c_meta_data("disk0", (BASE_ALLOCATION,))[13:],
    "query runs past the data": c_meta_data("disk0", (BASE_ALLOCATION,))[:-1],
    "trailing byte": c_meta_data("disk0", (BASE_ALLOCATION,)) + b"\0",
    "query not UTF-8": c_meta_data("disk0")[:-4] + struct.pack(">II", 1, 1) + b"\xff",
}


@pytest.mark.parametrize("option", [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT])
@pytest.mark.parametrize("data", MALFORMED_META.values(), ids=MALFORMED_META.keys())
def test_meta_context_malformed_data_is_invalid(option, data):
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    events = feed(conn, c_option(option, data))
    assert [(e.option, e.reply) for e in events] == [(option, REP_ERR_INVALID)]
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [REP_ERR_INVALID]


@pytest.mark.parametrize("option", [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT])
def test_meta_context_for_unknown_export_is_err_unknown(option):
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    feed(conn, c_option(option, c_meta_data("no-such-disk", (BASE_ALLOCATION,))))
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [REP_ERR_UNKNOWN]


# --- unsupported, oversized, abort, shutdown ---------------------------------------------
@pytest.mark.parametrize("option", [OPT_PEEK_EXPORT, OPT_STARTTLS, OPT_EXTENDED_HEADERS, 0, 12, 999,
                                    2**31 - 1, 2**32 - 1])
def test_unsupported_option_is_err_unsup_and_the_session_continues(option):
    conn = in_options()
    events = feed(conn, c_option(option, b"ignored payload"))
    assert [(e.option, e.reply) for e in events] == [(option, REP_ERR_UNSUP)]
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [(option, REP_ERR_UNSUP)]
    assert replies[0].payload.decode()
    assert feed(conn, c_option(OPT_GO, c_info_go_data("disk0"))) == [Negotiated(DISK, False, {})]


def test_oversized_option_is_discarded_then_too_big_and_the_session_continues():
    conn = in_options()
    # the discarded data looks like an ABORT: it must never be parsed as one
    junk = (c_option(OPT_ABORT) * ((64 * KiB) // 16 + 1))[: 64 * KiB + 1]
    events = feed(conn, c_option(OPT_LIST, junk))
    assert [(e.option, e.reply) for e in events] == [(OPT_LIST, REP_ERR_TOO_BIG)]
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [(OPT_LIST, REP_ERR_TOO_BIG)]
    assert conn.phase == "options"
    assert feed(conn, c_option(OPT_GO, c_info_go_data("disk0"))) == [Negotiated(DISK, False, {})]


def test_oversized_option_reply_waits_until_its_data_is_discarded():
    conn = in_options()
    wire = c_option(OPT_INFO, bytes(100 * KiB)) + c_option(OPT_GO, c_info_go_data("disk0"))
    cut = 16 + 50 * KiB
    feed(conn, wire[:cut])
    assert conn.data_to_send() == b""  # still discarding
    events = feed(conn, wire[cut:])
    assert [type(e) for e in events] == [OptionHandled, Negotiated]
    assert (events[0].option, events[0].reply) == (OPT_INFO, REP_ERR_TOO_BIG)
    replies = parse_option_replies(conn.data_to_send())
    assert [(r.option, r.reply) for r in replies] == [
        (OPT_INFO, REP_ERR_TOO_BIG), (OPT_GO, REP_INFO), (OPT_GO, REP_ACK)]


def test_option_of_exactly_64_kib_is_read_not_refused():
    conn = in_options()
    events = feed(conn, c_option(OPT_INFO, bytes(64 * KiB)))
    assert [(e.option, e.reply) for e in events] == [(OPT_INFO, REP_ERR_INVALID)]


def test_hostile_option_length_is_fatal_without_waiting_for_data():
    conn = in_options()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, OPT_LIST, 2**32 - 1))
    with pytest.raises(NbdProtocolError):
        conn.next_event()


def test_abort_is_acked_and_disconnects():
    conn = in_options()
    events = feed(conn, c_option(OPT_ABORT) + c_option(OPT_LIST))
    assert events == [Disconnect("options")]
    assert parse_option_replies(conn.data_to_send()) == [OptionReply(OPT_ABORT, REP_ACK, b"")]
    assert conn.phase == "closed"
    assert feed(conn, c_option(OPT_LIST)) == []
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("option,data", [(OPT_GO, c_info_go_data("disk0")), (OPT_LIST, b""),
                                         (OPT_INFO, c_info_go_data("disk0"))])
def test_shutting_down_server_refuses_options_but_acks_abort(option, data):
    conn = in_options(shutting_down=lambda: True)
    events = feed(conn, c_option(option, data))
    assert [(e.option, e.reply) for e in events] == [(option, REP_ERR_SHUTDOWN)]
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [REP_ERR_SHUTDOWN]
    assert feed(conn, c_option(OPT_ABORT)) == [Disconnect("options")]
    assert parse_option_replies(conn.data_to_send()) == [OptionReply(OPT_ABORT, REP_ACK, b"")]


def test_option_error_messages_respect_the_string_limit():
    conn = in_options()
    name = "n" * MAX_STRING_BYTES  # the longest legal name; the message quoting it is longer
    feed(conn, c_option(OPT_GO, c_info_go_data(name)))
    (reply,) = parse_option_replies(conn.data_to_send())
    assert reply.reply == REP_ERR_UNKNOWN
    assert 0 < len(reply.payload) <= MAX_STRING_BYTES
    reply.payload.decode("utf-8")


# --- transmission: valid requests ------------------------------------------------------
@pytest.fixture(params=[False, True], ids=["simple", "structured"])
def structured(request):
    return request.param


def test_read_becomes_a_request(structured):
    conn = negotiated(structured=structured)
    events = feed(conn, c_request(CMD_READ, handle=0xDEADBEEFCAFEF00D, offset=4096, length=8192))
    assert [request_tuple(e) for e in events] == [(CMD_READ, 0, 0xDEADBEEFCAFEF00D, 4096, 8192, None)]
    assert conn.data_to_send() == b""


def test_write_carries_its_payload():
    conn = negotiated()
    payload = bytes(range(256)) * 3
    events = feed(conn, c_request(CMD_WRITE, handle=2, offset=DISK.size - len(payload),
                                  length=len(payload), flags=F_FUA, payload=payload))
    assert [request_tuple(e) for e in events] == [
        (CMD_WRITE, F_FUA, 2, DISK.size - len(payload), len(payload), payload)]


def test_write_waits_for_its_whole_payload():
    conn = negotiated()
    wire = c_request(CMD_WRITE, handle=3, offset=0, length=1000, payload=b"\xab" * 1000)
    assert feed(conn, wire[:28 + 999]) == []
    events = feed(conn, wire[28 + 999:])
    assert [request_tuple(e) for e in events] == [(CMD_WRITE, 0, 3, 0, 1000, b"\xab" * 1000)]


@pytest.mark.parametrize("cmd,flags,offset,length", [
    (CMD_FLUSH, 0, 0, 0),
    (CMD_TRIM, 0, 512, 4096),
    (CMD_TRIM, F_FUA, 0, 1 * MiB),
    (CMD_WRITE_ZEROES, 0, 0, 1 * MiB),
    (CMD_WRITE_ZEROES, F_FUA | F_NO_HOLE, 1 * MiB - 1, 1),
    (CMD_READ, 0, 1 * MiB, 0),
])
def test_commands_become_requests_with_their_fields(cmd, flags, offset, length):
    conn = negotiated()
    events = feed(conn, c_request(cmd, handle=99, offset=offset, length=length, flags=flags))
    assert [request_tuple(e) for e in events] == [(cmd, flags, 99, offset, length, None)]


@pytest.mark.parametrize("flags", [0, F_REQ_ONE])
def test_block_status_with_a_negotiated_context_becomes_a_request(flags):
    conn = negotiated(structured=True, meta=True)
    events = feed(conn, c_request(CMD_BLOCK_STATUS, handle=5, offset=0, length=DISK.size, flags=flags))
    assert [request_tuple(e) for e in events] == [(CMD_BLOCK_STATUS, flags, 5, 0, DISK.size, None)]


def test_several_requests_in_one_receive_come_out_in_order():
    conn = negotiated()
    wire = (c_request(CMD_READ, 1, 0, 512) + c_request(CMD_WRITE, 2, 512, 3, payload=b"abc")
            + c_request(CMD_FLUSH, 3) + c_request(CMD_DISC, 4))
    events = feed(conn, wire)
    assert [event_key(e) for e in events] == [
        ("Request", CMD_READ, 0, 1, 0, 512, None), ("Request", CMD_WRITE, 0, 2, 512, 3, b"abc"),
        ("Request", CMD_FLUSH, 0, 3, 0, 0, None), Disconnect("transmission")]


def test_disc_disconnects_silently_and_ends_parsing():
    conn = negotiated()
    events = feed(conn, c_request(CMD_DISC, handle=1) + c_request(CMD_READ, 2, 0, 512))
    assert events == [Disconnect("transmission")]
    assert conn.phase == "closed"
    assert conn.data_to_send() == b""  # there is no reply to NBD_CMD_DISC


def test_bad_request_magic_is_fatal():
    conn = negotiated()
    conn.receive_data(struct.pack(">IHHQQI", SIMPLE_REPLY_MAGIC, 0, CMD_READ, 1, 0, 512))
    with pytest.raises(NbdProtocolError):
        conn.next_event()
    assert conn.phase == "closed"


def test_partial_request_header_waits():
    conn = negotiated()
    wire = c_request(CMD_READ, 1, 0, 512)
    assert feed(conn, wire[:27]) == []
    assert len(feed(conn, wire[27:])) == 1


# --- transmission: rejected requests ---------------------------------------------------
@pytest.mark.parametrize("cmd,offset,length,error", [
    (CMD_READ, DISK.size - 511, 512, NBD_EINVAL),
    (CMD_READ, DISK.size + 1, 0, NBD_EINVAL),
    (CMD_READ, 2**64 - 1, 1, NBD_EINVAL),
    (CMD_TRIM, 0, DISK.size + 1, NBD_EINVAL),
    (CMD_WRITE_ZEROES, DISK.size - 1, 2, NBD_ENOSPC),
    (CMD_WRITE_ZEROES, 0, DISK.size + 1, NBD_ENOSPC),
    (CMD_WRITE_ZEROES, DISK.size + 1, 1, NBD_EINVAL),
    (CMD_WRITE_ZEROES, DISK.size + 4096, 1, NBD_EINVAL),
])
def test_out_of_range_requests_are_rejected(structured, cmd, offset, length, error):
    conn = negotiated(structured=structured)
    events = feed(conn, c_request(cmd, handle=7, offset=offset, length=length))
    assert len(events) == 1 and isinstance(events[0], Rejected)
    assert (events[0].cmd, events[0].handle, events[0].offset, events[0].length, events[0].error) == (
        cmd, 7, offset, length, error)
    expect_error_reply(conn, structured=structured, handle=7, error=error)


@pytest.mark.parametrize("offset,error", [(DISK.size - 10, NBD_ENOSPC), (DISK.size + 1, NBD_EINVAL),
                                          (DISK.size + 512, NBD_EINVAL)])
def test_out_of_range_write_is_rejected_after_its_payload_and_the_next_request_parses(
        structured, offset, error):
    conn = negotiated(structured=structured)
    payload = b"\x55" * 100
    events = feed(conn, c_request(CMD_WRITE, 8, offset, 100, payload=payload) + c_request(CMD_FLUSH, 9))
    assert len(events) == 2
    assert isinstance(events[0], Rejected) and events[0].error == error
    assert request_tuple(events[1]) == (CMD_FLUSH, 0, 9, 0, 0, None)
    expect_error_reply(conn, structured=structured, handle=8, error=error)


def test_block_status_out_of_range_is_einval():
    conn = negotiated(structured=True, meta=True)
    events = feed(conn, c_request(CMD_BLOCK_STATUS, 4, DISK.size - 1, 2))
    assert [e.error for e in events] == [NBD_EINVAL]
    expect_error_reply(conn, structured=True, handle=4, error=NBD_EINVAL)


@pytest.mark.parametrize("cmd", [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES])
def test_read_only_export_refuses_writes_with_eperm(structured, cmd):
    conn = negotiated("ro-disk", structured=structured)
    payload = b"x" * 16 if cmd == CMD_WRITE else b""
    events = feed(conn, c_request(cmd, 11, 0, 16, payload=payload) + c_request(CMD_READ, 12, 0, 16))
    assert isinstance(events[0], Rejected) and events[0].error == NBD_EPERM
    assert request_tuple(events[1]) == (CMD_READ, 0, 12, 0, 16, None)
    expect_error_reply(conn, structured=structured, handle=11, error=NBD_EPERM)


def test_read_only_export_still_reads_and_flushes():
    conn = negotiated("ro-disk")
    events = feed(conn, c_request(CMD_READ, 1, 0, RO_DISK.size) + c_request(CMD_FLUSH, 2))
    assert [e.cmd for e in events] == [CMD_READ, CMD_FLUSH]
    assert all(type(e) is Request for e in events)


@pytest.mark.parametrize("cmd,flags", [
    (CMD_READ, F_NO_HOLE), (CMD_READ, F_REQ_ONE), (CMD_READ, 1 << 9),
    (CMD_WRITE, F_DF), (CMD_WRITE, F_NO_HOLE), (CMD_WRITE, 1 << 15),
    (CMD_FLUSH, F_NO_HOLE), (CMD_TRIM, F_DF), (CMD_TRIM, F_NO_HOLE),
    (CMD_WRITE_ZEROES, F_FAST_ZERO), (CMD_WRITE_ZEROES, F_DF),
    (CMD_BLOCK_STATUS, F_DF), (CMD_BLOCK_STATUS, F_NO_HOLE),
])
def test_flags_not_documented_for_a_command_are_einval(structured, cmd, flags):
    conn = negotiated(structured=structured, meta=structured)
    payload = b"z" * 8 if cmd == CMD_WRITE else b""
    events = feed(conn, c_request(cmd, 21, 0, 8, flags=flags, payload=payload) + c_request(CMD_FLUSH, 22))
    assert isinstance(events[0], Rejected)
    assert (events[0].cmd, events[0].handle, events[0].error) == (cmd, 21, NBD_EINVAL)
    assert request_tuple(events[1]) == (CMD_FLUSH, 0, 22, 0, 0, None)  # payload was consumed
    expect_error_reply(conn, structured=structured, handle=21, error=NBD_EINVAL)


@pytest.mark.parametrize("cmd", [CMD_CACHE, 8, 9, 0x100, 0xFFFF])
def test_unknown_command_is_einval(structured, cmd):
    conn = negotiated(structured=structured)
    events = feed(conn, c_request(cmd, 31, 0, 512) + c_request(CMD_READ, 32, 0, 512))
    assert isinstance(events[0], Rejected) and events[0].error == NBD_EINVAL
    assert type(events[1]) is Request
    expect_error_reply(conn, structured=structured, handle=31, error=NBD_EINVAL)


def test_block_status_without_meta_context_is_einval():
    conn = negotiated(structured=True)
    events = feed(conn, c_request(CMD_BLOCK_STATUS, 41, 0, 4096))
    assert [e.error for e in events] == [NBD_EINVAL]
    expect_error_reply(conn, structured=True, handle=41, error=NBD_EINVAL)


def test_block_status_of_zero_length_is_einval():
    conn = negotiated(structured=True, meta=True)
    events = feed(conn, c_request(CMD_BLOCK_STATUS, 42, 0, 0))
    assert [e.error for e in events] == [NBD_EINVAL]


def test_read_beyond_the_max_payload_is_rejected():
    conn = negotiated(max_payload=4096)
    events = feed(conn, c_request(CMD_READ, 51, 0, 4097) + c_request(CMD_READ, 52, 0, 4096))
    assert isinstance(events[0], Rejected) and events[0].error in (NBD_EOVERFLOW, NBD_EINVAL)
    assert request_tuple(events[1]) == (CMD_READ, 0, 52, 0, 4096, None)


@pytest.mark.parametrize("split", [None, 1, 28, 28 + 100, 28 + 4096])
def test_write_beyond_the_max_payload_is_discarded_then_einval(structured, split):
    conn = negotiated(structured=structured, max_payload=4096)
    # the discarded payload looks like requests: it must never be parsed as them
    payload = (c_request(CMD_DISC) * 200)[:5000]
    wire = c_request(CMD_WRITE, 61, 0, 5000, payload=payload) + c_request(CMD_READ, 62, 0, 512)
    if split is None:
        events = feed(conn, wire)
    else:
        events = feed(conn, wire[:split])
        if split < 28 + 5000:
            assert conn.data_to_send() == b""  # no reply before the payload is gone
        events += feed(conn, wire[split:])
    assert len(events) == 2
    assert isinstance(events[0], Rejected)
    assert (events[0].cmd, events[0].handle, events[0].length, events[0].error) == (
        CMD_WRITE, 61, 5000, NBD_EINVAL)
    assert request_tuple(events[1]) == (CMD_READ, 0, 62, 0, 512, None)
    expect_error_reply(conn, structured=structured, handle=61, error=NBD_EINVAL)


def test_write_of_exactly_max_payload_is_accepted():
    conn = negotiated(max_payload=4096)
    events = feed(conn, c_request(CMD_WRITE, 63, 0, 4096, payload=bytes(4096)))
    assert request_tuple(events[0]) == (CMD_WRITE, 0, 63, 0, 4096, bytes(4096))


LARGE_WRITE_BYTES = 64 * KiB + 3  # large enough for the core to gather the payload chunk by chunk


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _large_write_wire() -> tuple[bytes, list]:
    big = _pattern(LARGE_WRITE_BYTES, 7)
    wire = (c_request(CMD_WRITE, 81, 4096, len(big), flags=F_FUA, payload=big)
            + c_request(CMD_READ, 82, 0, 512)
            + c_request(CMD_WRITE, 83, 0, 5, payload=b"small")
            + c_request(CMD_WRITE, 84, DISK.size - 70_000, 70_000, payload=_pattern(70_000, 3)))
    expected = [("Request", CMD_WRITE, F_FUA, 81, 4096, len(big), big),
                ("Request", CMD_READ, 0, 82, 0, 512, None),
                ("Request", CMD_WRITE, 0, 83, 0, 5, b"small"),
                ("Request", CMD_WRITE, 0, 84, DISK.size - 70_000, 70_000, _pattern(70_000, 3))]
    return wire, expected


_END1 = 28 + LARGE_WRITE_BYTES
LARGE_CUTS = {
    "whole": [],
    "inside the header": [10],
    "right after the header": [28],
    "one payload byte": [29],
    "payload then next header": [_END1],
    "across the payload end": [_END1 - 1, _END1 + 5],
    "tail and next requests together": [1000, 2000, 60_000, _END1 + 30],
    "every 997 bytes": list(range(1, 28 + LARGE_WRITE_BYTES + 200_000, 997)),
    "second large write split in its header": [_END1 + 56 + 33 + 3, _END1 + 56 + 33 + 40],
}


@pytest.mark.parametrize("cuts", LARGE_CUTS.values(), ids=LARGE_CUTS.keys())
def test_large_writes_are_reassembled_whatever_the_chunking(cuts):
    wire, expected = _large_write_wire()
    events, sent = run_chunks(negotiated(), wire, cuts)
    assert [event_key(e) for e in events] == expected
    assert sent == b""


def test_large_write_fed_byte_by_byte():
    big = _pattern(LARGE_WRITE_BYTES, 11)
    wire = c_request(CMD_WRITE, 85, 0, len(big), payload=big) + c_request(CMD_FLUSH, 86)
    events, _ = run_chunks(negotiated(), wire, range(1, len(wire)))
    assert [event_key(e) for e in events] == [("Request", CMD_WRITE, 0, 85, 0, len(big), big),
                                              ("Request", CMD_FLUSH, 0, 86, 0, 0, None)]


@pytest.mark.parametrize("export,offset,flags,error", [
    ("disk0", DISK.size - 100, 0, NBD_ENOSPC),
    ("disk0", 0, F_DF, NBD_EINVAL),
    ("ro-disk", 0, 0, NBD_EPERM),
])
def test_large_write_is_rejected_after_reassembly_and_the_next_request_parses(export, offset, flags, error):
    conn = negotiated(export, structured=True)
    big = _pattern(LARGE_WRITE_BYTES, 5)
    wire = c_request(CMD_WRITE, 87, offset, len(big), flags=flags, payload=big) + c_request(CMD_READ, 88, 0, 16)
    events, sent = run_chunks(conn, wire, [100, 30_000, len(wire) - 20])
    assert len(events) == 2
    assert isinstance(events[0], Rejected) and (events[0].handle, events[0].error) == (87, error)
    assert request_tuple(events[1]) == (CMD_READ, 0, 88, 0, 16, None)
    (chunk,) = parse_replies(sent)
    assert chunk.handle == 87 and decode_error_chunk(chunk.payload)[0] == error


# --- replies built for the shell -------------------------------------------------------
def test_reply_ok_is_a_simple_reply_even_when_structured():
    for structured_replies in (False, True):
        conn = negotiated(structured=structured_replies)
        assert parse_replies(conn.reply_ok(0x0102030405060708)) == [SimpleReply(0, 0x0102030405060708)]


def test_reply_error_simple_without_structured_replies():
    conn = negotiated()
    wire = conn.reply_error(77, 5, "disk on fire")
    assert wire == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 5, 77)


def test_reply_error_is_an_error_chunk_with_structured_replies():
    conn = negotiated(structured=True)
    wire = conn.reply_error(77, 5, "disk on fire")
    (chunk,) = parse_replies(wire)
    assert (chunk.flags, chunk.type, chunk.handle) == (CHUNK_FLAG_DONE, CHUNK_ERROR, 77)
    assert decode_error_chunk(chunk.payload) == (5, "disk on fire")
    assert struct.unpack_from(">I", wire, 16)[0] == 6 + len("disk on fire")


def test_read_reply_header_simple():
    conn = negotiated()
    assert conn.read_reply_header(9, 4096, 512) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 9)


def test_read_reply_header_offset_data_chunk():
    conn = negotiated(structured=True)
    header = conn.read_reply_header(9, 4096, 512)
    assert len(header) == 28
    magic, flags, ctype, handle, length, offset = struct.unpack(">IHHQIQ", header)
    assert (magic, flags, ctype, handle, length, offset) == (
        STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE, CHUNK_OFFSET_DATA, 9, 8 + 512, 4096)
    # header + data parses as one chunk whose payload is offset + data
    (chunk,) = parse_replies(header + b"D" * 512)
    assert chunk.payload == struct.pack(">Q", 4096) + b"D" * 512


@pytest.mark.parametrize("done", [True, False])
def test_reply_block_status_layout(done):
    conn = negotiated(structured=True, meta=True)
    extents = [(4096, 0), (8192, 3), (1, 1)]
    wire = conn.reply_block_status(0xABCDEF, 1, extents, done=done)
    (chunk,) = parse_replies(wire)
    assert chunk.flags == (CHUNK_FLAG_DONE if done else 0)
    assert (chunk.type, chunk.handle) == (CHUNK_BLOCK_STATUS, 0xABCDEF)
    assert len(chunk.payload) == 4 + 8 * len(extents)
    assert struct.unpack_from(">I", chunk.payload)[0] == 1
    assert [struct.unpack_from(">II", chunk.payload, 4 + 8 * i) for i in range(len(extents))] == extents


# --- property tests --------------------------------------------------------------------
PROP_EXPORT = ExportInfo("prop", size=256 * KiB)
PROP_MAX_PAYLOAD = 64 * KiB
HANDLES = st.integers(0, 2**64 - 1)

_REQUEST_FLAGS = {
    CMD_READ: (0,),
    CMD_WRITE: (0, F_FUA),
    CMD_TRIM: (0, F_FUA),
    CMD_WRITE_ZEROES: (0, F_FUA, F_NO_HOLE, F_FUA | F_NO_HOLE),
    CMD_BLOCK_STATUS: (0, F_REQ_ONE),
    CMD_FLUSH: (0,),
}


@st.composite
def valid_requests(draw):
    """(cmd, flags, handle, offset, length, payload-or-None) of a request the core must accept."""
    cmd = draw(st.sampled_from(sorted(_REQUEST_FLAGS)))
    flags = draw(st.sampled_from(_REQUEST_FLAGS[cmd]))
    handle = draw(HANDLES)
    size = PROP_EXPORT.size
    if cmd == CMD_FLUSH:
        return (cmd, flags, handle, 0, 0, None)
    if cmd == CMD_WRITE:
        payload = draw(st.binary(max_size=48))
        length = len(payload)
    else:
        low = 1 if cmd == CMD_BLOCK_STATUS else 0
        high = min(size, PROP_MAX_PAYLOAD) if cmd == CMD_READ else size
        length = draw(st.integers(low, high))
        payload = None
    offset = draw(st.one_of(st.integers(0, size - length), st.just(size - length)))
    return (cmd, flags, handle, offset, length, payload)


def encode_requests(requests) -> bytes:
    return b"".join(c_request(cmd, handle, offset, length, flags, payload or b"")
                    for cmd, flags, handle, offset, length, payload in requests)


def prop_conn(max_payload: int = PROP_MAX_PAYLOAD) -> NbdServerConnection:
    conn = NbdServerConnection({PROP_EXPORT.name: PROP_EXPORT}.get, lambda: [PROP_EXPORT],
                               max_payload=max_payload)
    feed(conn, c_client_flags(C_FIXED_NEWSTYLE) + c_option(OPT_STRUCTURED_REPLY)
         + c_option(OPT_SET_META_CONTEXT, c_meta_data("prop", (BASE_ALLOCATION,)))
         + c_option(OPT_GO, c_info_go_data("prop")))
    assert conn.phase == "transmission"
    conn.data_to_send()
    return conn


def run_chunks(conn: NbdServerConnection, wire: bytes, cuts) -> tuple[list, bytes]:
    """Feed ``wire`` cut at ``cuts``; return the events and all bytes sent."""
    events: list = []
    sent = b""
    bounds = [0, *sorted(set(cuts)), len(wire)]
    for start, end in zip(bounds, bounds[1:]):
        events += feed(conn, wire[start:end])
        sent += conn.data_to_send()
    return events, sent


# database=None: these tests write nothing outside their own process
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY_SETTINGS
@given(requests=st.lists(valid_requests(), max_size=8), disconnect=st.booleans(), data=st.data())
def test_requests_round_trip_whatever_the_chunking(requests, disconnect, data):
    wire = encode_requests(requests) + (c_request(CMD_DISC, handle=1) if disconnect else b"")
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12), label="cuts")
    expected = [("Request",) + r for r in requests] + ([Disconnect("transmission")] if disconnect else [])
    for how in ([], range(1, len(wire)), cuts):  # whole, byte by byte, random chunks
        events, sent = run_chunks(prop_conn(), wire, how)
        assert [event_key(e) for e in events] == expected
        assert sent == b""  # nothing valid is rejected


@st.composite
def large_writes(draw):
    """A WRITE big enough to be gathered chunk-wise; the payload is given by a seed (short reprs)."""
    length = draw(st.integers(LARGE_WRITE_BYTES - 3, LARGE_WRITE_BYTES + 50))
    return ("large", CMD_WRITE, draw(st.sampled_from([0, F_FUA])), draw(HANDLES),
            draw(st.integers(0, PROP_EXPORT.size - length)), length, draw(st.integers(0, 2**32)))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(st.one_of(valid_requests(), large_writes()), min_size=1, max_size=5),
       data=st.data())
def test_large_and_small_requests_round_trip_in_random_chunks(requests, data):
    requests = [r[1:6] + (_pattern(r[5], r[6]),) if r[0] == "large" else r for r in requests]
    wire = encode_requests(requests)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=16), label="cuts")
    for how in ([], cuts):
        events, sent = run_chunks(prop_conn(max_payload=2 * LARGE_WRITE_BYTES), wire, how)
        assert [event_key(e) for e in events] == [("Request",) + r for r in requests]
        assert sent == b""


# Option haggling: each step is (option, data); GO on a known export ends it.
EXPORT_NAMES = st.sampled_from(["disk0", "ro-disk", ODD_DISK.name, "", "missing"])
INFO_REQUESTS = st.lists(st.sampled_from([INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x4242]),
                         unique=True, max_size=4).map(tuple)
META_QUERIES = st.lists(st.sampled_from([BASE_ALLOCATION, "base:", "x-a:b", "qemu:allocation-depth"]),
                        max_size=3).map(tuple)
OPTION_STEPS = st.one_of(
    st.tuples(st.just(OPT_LIST), st.sampled_from([b"", b"junk"])),
    st.tuples(st.just(OPT_INFO), st.builds(c_info_go_data, EXPORT_NAMES, INFO_REQUESTS)),
    st.tuples(st.just(OPT_GO), st.builds(c_info_go_data, st.just("missing"), INFO_REQUESTS)),
    st.tuples(st.just(OPT_STRUCTURED_REPLY), st.sampled_from([b"", b"\0"])),
    st.tuples(st.sampled_from([OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT]),
              st.builds(c_meta_data, EXPORT_NAMES, META_QUERIES)),
    st.tuples(st.sampled_from([OPT_PEEK_EXPORT, OPT_STARTTLS, OPT_EXTENDED_HEADERS, 77, 2**32 - 1]),
              st.binary(max_size=16)),
    st.tuples(st.sampled_from([OPT_INFO, OPT_GO, OPT_SET_META_CONTEXT]), st.binary(max_size=24)),
)


@PROPERTY_SETTINGS
@given(client_flags=st.sampled_from([C_FIXED_NEWSTYLE, C_FIXED_NEWSTYLE | C_NO_ZEROES]),
       steps=st.lists(OPTION_STEPS, max_size=8),
       go_name=st.sampled_from(["disk0", "ro-disk", ODD_DISK.name]), go_requests=INFO_REQUESTS)
def test_option_haggling_is_the_same_fed_whole_or_byte_by_byte(client_flags, steps, go_name, go_requests):
    steps = steps + [(OPT_GO, c_info_go_data(go_name, go_requests))]
    wire = c_client_flags(client_flags) + b"".join(c_option(o, d) for o, d in steps)
    whole_events, whole_sent = run_chunks(make_conn(), wire, [])
    byte_events, byte_sent = run_chunks(make_conn(), wire, range(1, len(wire)))
    assert byte_sent == whole_sent
    assert byte_events == whole_events
    assert isinstance(whole_events[-1], Negotiated) and whole_events[-1].export.name == go_name
    assert len(whole_events) == len(steps)
    # every option got, in order, zero or more intermediate replies then exactly one final one
    replies = parse_option_replies(whole_sent)
    finals = [r for r in replies if r.final]
    assert [r.option for r in finals] == [o for o, _ in steps]
    assert finals[-1].reply == REP_ACK
    for reply in finals[:-1]:
        reply.payload.decode("utf-8")  # error messages are strings


GARBAGE = st.binary(max_size=96)


def _maybe_lying(draw, honest: int, bits: int) -> int:
    """Mostly the honest length or count, sometimes one more, sometimes any value of the field."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.integers(0, 2**bits - 1))
    if choice == 1:
        return min(honest + 1, 2**bits - 1)
    return honest


# names and queries: mostly valid UTF-8 (so parsing goes on past them), sometimes not
STRINGISH = st.one_of(st.text(max_size=8).map(str.encode), st.sampled_from([b"disk0", b"base:allocation"]),
                      st.binary(max_size=8))


@st.composite
def option_bodies(draw, meta: bool):
    """Option data shaped like INFO/GO data or meta-context data, with lengths that may lie."""
    name = draw(STRINGISH)
    body = struct.pack(">I", _maybe_lying(draw, len(name), 32)) + name
    if meta:
        queries = draw(st.lists(STRINGISH, max_size=3))
        body += struct.pack(">I", _maybe_lying(draw, len(queries), 32))
        for q in queries:
            body += struct.pack(">I", _maybe_lying(draw, len(q), 32)) + q
    else:
        requests = draw(st.lists(st.integers(0, 2**16 - 1), max_size=4))
        body += (struct.pack(">H", _maybe_lying(draw, len(requests), 16))
                 + b"".join(struct.pack(">H", r) for r in requests))
    if draw(st.integers(0, 7)) == 0:  # torn or padded
        body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=3))
    return body


@st.composite
def option_garbage(draw):
    """Option frames with a valid magic but arbitrary numbers, lengths and data."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        option = draw(st.one_of(st.sampled_from([OPT_INFO, OPT_GO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT]),
                                st.integers(0, 12), st.integers(0, 2**32 - 1)))
        if draw(st.integers(0, 3)):
            body = draw(option_bodies(meta=option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT)))
        else:
            body = draw(GARBAGE)
        parts.append(struct.pack(">QII", IHAVEOPT, option, _maybe_lying(draw, len(body), 32)) + body)
        if not draw(st.integers(0, 7)):
            parts.append(draw(GARBAGE))
    return b"".join(parts)


@st.composite
def request_garbage(draw):
    """Request frames with a valid magic but arbitrary fields, plus stray bytes."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        flags = draw(st.integers(0, 2**16 - 1))
        cmd = draw(st.one_of(st.integers(0, 9), st.integers(0, 2**16 - 1)))
        offset = draw(st.one_of(st.integers(0, 2 * PROP_EXPORT.size), st.integers(0, 2**64 - 1)))
        length = draw(st.one_of(st.integers(0, 200), st.integers(0, 2**32 - 1),
                                st.integers(LARGE_WRITE_BYTES - 10, LARGE_WRITE_BYTES + 10)))
        parts.append(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, draw(HANDLES), offset, length))
        parts.append(draw(GARBAGE))
    return b"".join(parts)


def _fuzz_conn(phase: str) -> NbdServerConnection:
    if phase == "transmission":
        conn = prop_conn()
        conn.max_payload = 64  # make the discard path reachable with small inputs
        return conn
    if phase == "transmission, large payloads":
        return prop_conn(max_payload=2 * LARGE_WRITE_BYTES)
    conn = make_conn()
    if phase.startswith("options"):
        feed(conn, c_client_flags(C_FIXED_NEWSTYLE))
    if phase == "options, structured":
        feed(conn, c_option(OPT_STRUCTURED_REPLY))
    return conn


def _survives(conn: NbdServerConnection, wire: bytes, cuts) -> None:
    """Only NbdProtocolError may escape, and next_event always ends in NEED_DATA."""
    bounds = [0, *sorted(set(cuts)), len(wire)]
    try:
        for start, end in zip(bounds, bounds[1:]):
            conn.receive_data(wire[start:end])
            drain(conn, limit=len(wire) + 8)
            assert isinstance(conn.data_to_send(), bytes)
    except NbdProtocolError:
        assert conn.phase == "closed"


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(phase=st.sampled_from(["client_flags", "options", "options, structured", "options, structured",
                               "transmission", "transmission", "transmission, large payloads"]),
       data=st.data())
def test_garbage_never_raises_anything_but_nbd_protocol_error(phase, data):
    generator = {"client_flags": GARBAGE,
                 "options": st.one_of(GARBAGE, option_garbage()),
                 "options, structured": option_garbage(),
                 "transmission": st.one_of(GARBAGE, request_garbage()),
                 "transmission, large payloads": request_garbage()}[phase]
    wire = data.draw(generator, label="wire")
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8), label="cuts")
    _survives(_fuzz_conn(phase), wire, [])
    _survives(_fuzz_conn(phase), wire, range(1, len(wire)))
    _survives(_fuzz_conn(phase), wire, cuts)


VALID_OPTION_DATA = {
    "INFO": (OPT_INFO, c_info_go_data("disk0", (INFO_NAME, INFO_BLOCK_SIZE))),
    "GO": (OPT_GO, c_info_go_data(ODD_DISK.name, (INFO_DESCRIPTION,))),
    "LIST_META_CONTEXT": (OPT_LIST_META_CONTEXT, c_meta_data("disk0", ("base:", "x-a:b"))),
    "SET_META_CONTEXT": (OPT_SET_META_CONTEXT, c_meta_data("ro-disk", (BASE_ALLOCATION, "x-a:b"))),
}


@pytest.mark.parametrize("option,data", VALID_OPTION_DATA.values(), ids=VALID_OPTION_DATA.keys())
def test_every_truncation_of_option_data_is_err_invalid(option, data):
    for cut in range(len(data)):
        conn = in_options()
        feed(conn, c_option(OPT_STRUCTURED_REPLY))
        conn.data_to_send()
        events = feed(conn, c_option(option, data[:cut]))
        assert [(e.option, e.reply) for e in events] == [(option, REP_ERR_INVALID)], cut
        assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [REP_ERR_INVALID]
        assert conn.phase == "options"


@pytest.mark.parametrize("option,data", VALID_OPTION_DATA.values(), ids=VALID_OPTION_DATA.keys())
def test_every_flipped_byte_of_option_data_gets_one_final_reply(option, data):
    for index in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            flipped = data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]
            conn = in_options()
            feed(conn, c_option(OPT_STRUCTURED_REPLY))
            conn.data_to_send()
            events = feed(conn, c_option(option, flipped))
            assert len(events) == 1 and isinstance(events[0], (OptionHandled, Negotiated)), (index, mask)
            replies = parse_option_replies(conn.data_to_send())
            assert [r.final for r in replies].count(True) == 1 and replies[-1].final
            assert all(r.option == option for r in replies)


# --- spec rules the core once broke (found by this suite; kept as regression tests) -------
@pytest.mark.parametrize("cmd,length", [(CMD_READ, 512), (CMD_FLUSH, 0), (CMD_BLOCK_STATUS, 512),
                                        (CMD_DISC, 0)])
def test_fua_is_accepted_on_every_command_when_send_fua_is_advertised(cmd, length):
    """proto.md: FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated,
    in which case the server MUST accept all commands with this bit set"."""
    conn = negotiated(structured=True, meta=True)
    events = feed(conn, c_request(cmd, 71, 0, length, flags=F_FUA))
    assert len(events) == 1 and not isinstance(events[0], Rejected), events
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("case", ["shutting_down", "oversized"])
def test_export_name_is_never_answered_with_an_option_reply(case):
    """NBD_OPT_EXPORT_NAME has no error reply: a server unwilling to allow the export MUST
    terminate the session (an option reply would be read as export size + flags)."""
    if case == "shutting_down":
        conn = in_options(shutting_down=lambda: True)
        conn.receive_data(c_option(OPT_EXPORT_NAME, b"disk0"))
    else:
        conn = in_options()
        conn.receive_data(c_option(OPT_EXPORT_NAME, b"d" * (64 * KiB + 1)))
    with pytest.raises(NbdProtocolError):
        drain(conn)
    assert not conn.data_to_send().startswith(struct.pack(">Q", OPTION_REPLY_MAGIC))


@pytest.mark.parametrize("bad_set", [b"", c_meta_data("no-such-disk", (BASE_ALLOCATION,))],
                         ids=["malformed", "unknown export"])
def test_failed_set_meta_context_clears_earlier_contexts(bad_set):
    """proto.md: SET_META_CONTEXT "replaces all previously-set metadata contexts (including
    when this command fails)"."""
    conn = in_options()
    feed(conn, c_option(OPT_STRUCTURED_REPLY))
    _set_meta(conn, "disk0", (BASE_ALLOCATION,))
    events = feed(conn, c_option(OPT_SET_META_CONTEXT, bad_set))
    assert events[0].reply & (1 << 31)
    events = feed(conn, c_option(OPT_GO, c_info_go_data("disk0")))
    assert events == [Negotiated(DISK, True, {})]


def test_oversized_option_event_does_not_depend_on_chunking():
    """The REP_ERR_TOO_BIG event comes out even when the discarded data arrives later."""
    wire = c_option(OPT_LIST, bytes(64 * KiB + 1))
    conn = in_options()
    events = feed(conn, wire[:100]) + feed(conn, wire[100:])
    assert [(e.option, e.reply) for e in events] == [(OPT_LIST, REP_ERR_TOO_BIG)]


def test_option_error_message_stays_utf8_when_truncated():
    """Messages are cut to 4096 bytes without splitting a UTF-8 character."""
    conn = in_options()
    name = "\u20ac" * 1365  # 4095 bytes: a legal name; the message quoting it exceeds 4096 bytes
    feed(conn, c_option(OPT_GO, c_info_go_data(name)))
    (reply,) = parse_option_replies(conn.data_to_send())
    assert reply.reply == REP_ERR_UNKNOWN
    assert len(reply.payload) <= MAX_STRING_BYTES
    reply.payload.decode("utf-8")
