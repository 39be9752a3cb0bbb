"""Fuzz targets: each decoder or parser of hostile bytes driven to its end, and the seeds they start from.

A target takes bytes (and where it matters a list of cut points, so the same
bytes arrive in different pieces) and must either finish or raise an
:class:`HvrError` (the decoders' "bad data" exceptions); anything else
escaping is a bug the fuzzer reports.  The hypothesis tests and the atheris
runner (``tests/fuzz/atheris_runner.py``) share these.
"""

from __future__ import annotations

import struct
import time
import uuid

from hvr_common.pure.bundle import BundleKind, FrameEncoder, BundleHeader, DiskEntry
from hvr_common.pure.bundle_decoder import BundleDecoder, BundleDone
from hvr_common.pure.errors import HvrError
from hvr_common.pure.hrl import HrlEncoder, HrlHeader, LogSummary
from hvr_common.pure.hrl_decoder import HrlDecoder
from hvr_common.pure.nbd_events import NEED_DATA as NBD_NEED_DATA, ExportInfo
from hvr_common.pure.nbd_protocol import NbdServerConnection
from hvr_common.pure.nbd_wire import FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, Opt
from hvr_common.pure.undo import UndoEncoder, UndoHeader, UndoSummary
from hvr_common.pure.stream_decoder import NEED_DATA
from hvr_common.pure.undo_decoder import UndoDecoder

MAX_EVENTS = 100_000
VM_ID = uuid.UUID(int=1)
DISK_ID = uuid.UUID(int=2)
DISK_BYTES = 1024 * 1024
EXPORT = ExportInfo("vm/disk", size=DISK_BYTES)
_TERMINAL = (LogSummary, UndoSummary, BundleDone)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def _drain(decoder) -> bool:
    """Take every event now available; True once the decoder reached its end (it repeats its last event)."""
    for _ in range(MAX_EVENTS):
        event = decoder.next_event()
        if event is NEED_DATA:
            return False
        if isinstance(event, _TERMINAL):
            return True
    raise AssertionError("the decoder never asked for more data")


def _stream(decoder, data: bytes, cuts: list[int]) -> None:
    try:
        for piece in pieces(data, cuts):
            decoder.receive_data(piece)
            if _drain(decoder):
                return
        decoder.finish()
    except HvrError:
        pass


def hrl(data: bytes, cuts: list[int] = ()) -> None:
    _stream(HrlDecoder(keep_data=True), data, list(cuts))


def undo(data: bytes, cuts: list[int] = ()) -> None:
    _stream(UndoDecoder(keep_data=True), data, list(cuts))


def bundle(data: bytes, cuts: list[int] = ()) -> None:
    expect = {"vm_id": VM_ID, "generation": 1, "sequence": 1, "kind": BundleKind.CYCLE,
              "disks": {DISK_ID: DISK_BYTES}}
    _stream(BundleDecoder(keep_data=True, max_bytes=len(data), expect=expect), data, list(cuts))
    _stream(BundleDecoder(keep_data=False), data, list(cuts))


def _nbd(prefix: bytes, data: bytes, cuts: list[int]) -> NbdServerConnection:
    conn = NbdServerConnection({EXPORT.name: EXPORT}.get, lambda: [EXPORT])
    conn.greeting()
    try:
        for piece in [prefix, *pieces(data, cuts)]:
            conn.receive_data(piece)
            for _ in range(MAX_EVENTS):
                if conn.next_event() is NBD_NEED_DATA:
                    break
            else:
                raise AssertionError("the NBD connection never asked for more data")
            conn.data_to_send()
    except HvrError:
        pass
    return conn


def nbd_handshake(data: bytes, cuts: list[int] = ()) -> None:
    _nbd(b"", data, list(cuts))


def nbd_transmission(data: bytes, cuts: list[int] = ()) -> None:
    _nbd(TRANSMISSION_PREFIX, data, list(cuts))


# --- seeds: valid inputs the fuzzers mutate --------------------------------------------------------

def hrl_seed() -> bytes:
    enc = HrlEncoder(HrlHeader(VM_ID, DISK_ID, 1, 1, DISK_BYTES, 1))
    out = bytearray(enc.header_bytes())
    out += enc.write(4096, b"a" * 512) + b"a" * 512
    out += enc.trim(8192, 4096)
    out += enc.zero(0, 512)
    out += enc.end(2)
    return bytes(out)


def undo_seed() -> bytes:
    enc = UndoEncoder(UndoHeader(VM_ID, 1, 1, 1, 1))
    return bytes(enc.header_bytes() + enc.data(DISK_ID, 0, b"u" * 512) + enc.hole(DISK_ID, 4096, 4096) + enc.end(2))


def bundle_seed(compress: bool = True) -> bytes:
    log = hrl_seed()
    fe = FrameEncoder(compress)
    payload = b"".join(fe.feed(log) + fe.finish())
    entry = DiskEntry(DISK_ID, fe.stored_bytes, fe.raw_bytes, 0, DISK_BYTES, fe.frames)
    return BundleHeader(BundleKind.CYCLE, VM_ID, 1, 1, time.time_ns(), (entry,)).encode() + payload


def _option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


TRANSMISSION_PREFIX = (struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
                       + _option(Opt.EXPORT_NAME, EXPORT.name.encode()))


def nbd_handshake_seed() -> bytes:
    name = EXPORT.name.encode()
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    return (struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) + _option(Opt.STRUCTURED_REPLY)
            + _option(Opt.LIST) + _option(Opt.INFO, go) + _option(Opt.GO, go))


def nbd_transmission_seed() -> bytes:
    def req(cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> bytes:
        return struct.pack(">IHHQQI", 0x25609513, flags, cmd, 7, offset, length) + payload
    return (req(1, 0, 512, b"w" * 512) + req(0, 0, 512) + req(3, 0, 0) + req(4, 0, 4096) + req(6, 0, 4096)
            + req(7, 0, 4096) + req(2, 0, 0))


TARGETS = {"hrl": (hrl, hrl_seed), "undo": (undo, undo_seed), "bundle": (bundle, bundle_seed),
           "nbd_handshake": (nbd_handshake, nbd_handshake_seed),
           "nbd_transmission": (nbd_transmission, nbd_transmission_seed)}
