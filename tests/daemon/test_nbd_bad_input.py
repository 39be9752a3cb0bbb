"""Hostile and broken NBD clients, written by hand with raw sockets.

One test per misbehaviour.  Each checks what the server answers (an error
code, an error reply, or a closed connection, as the NBD spec allows), and
then that the daemon is unharmed: it is still running and a well-behaved
client (qemu-io) still writes and reads correctly on the same export.

The wire format is encoded here independently of hvr's own codec so that a
bug shared by both cannot hide.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from daemons import make_image

KiB = 1024
MiB = 1024 * KiB

IMAGE_BYTES = 64 * MiB
MAX_PAYLOAD_BYTES = 32 * MiB
SOCKET_TIMEOUT_S = 10.0

# --- handshake -------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_LIST = 3
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_INVALID = REP_FLAG_ERROR | 3

INFO_EXPORT = 0

# --- transmission ----------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

TFLAG_READ_ONLY = 1 << 1

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2

EPERM = 1
EINVAL = 22
ENOMEM = 12
ENOSPC = 28
EOVERFLOW = 75

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
INFO_EXPORT_BODY = struct.Struct(">HQH")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
assert GREETING.size == 18
assert OPTION_HEADER.size == 16
assert OPTION_REPLY_HEADER.size == 20
assert INFO_EXPORT_BODY.size == 12
assert REQUEST.size == 28
assert SIMPLE_REPLY.size == 16


class ConnectionClosed(Exception):
    """The server closed the connection."""


class RawNbdClient:
    """A deliberately small NBD client that sends exactly what the test says."""

    def __init__(self, socket_path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(SOCKET_TIMEOUT_S)
        self.sock.connect(str(socket_path))
        self.next_cookie = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbdClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- bytes ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, size: int) -> bytes:
        chunks = []
        remaining = size
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ConnectionClosed(f"closed with {remaining} of {size} bytes unread")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def wait_closed(self, timeout_s: float = SOCKET_TIMEOUT_S) -> bytes:
        """Read until the server closes; return what it sent meanwhile.

        Fails the test if the connection is still open at the deadline.
        """
        received = bytearray()
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise AssertionError(
                    f"server kept the connection open for {timeout_s} s "
                    f"(sent {bytes(received[:64])!r})")
            self.sock.settimeout(remaining_s)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return bytes(received)
            except socket.timeout:
                continue
            if not chunk:
                return bytes(received)
            received += chunk

    # -- handshake ----------------------------------------------------------

    def read_greeting(self) -> int:
        magic, option_magic, handshake_flags = GREETING.unpack(self.recv_exactly(GREETING.size))
        assert magic == NBDMAGIC, hex(magic)
        assert option_magic == IHAVEOPT, hex(option_magic)
        assert handshake_flags & FLAG_FIXED_NEWSTYLE, handshake_flags
        return handshake_flags

    def start_haggling(self) -> None:
        self.read_greeting()
        self.send(CLIENT_FLAGS.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    def send_option(self, option: int, data: bytes = b"", *, declared_length: int | None = None
                    ) -> None:
        length = len(data) if declared_length is None else declared_length
        self.send(OPTION_HEADER.pack(IHAVEOPT, option, length) + data)

    def read_option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply_type, length = OPTION_REPLY_HEADER.unpack(
            self.recv_exactly(OPTION_REPLY_HEADER.size))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return option, reply_type, self.recv_exactly(length)

    def go(self, export_name: str) -> tuple[int, int]:
        """NBD_OPT_GO; returns (size_bytes, transmission_flags)."""
        name = export_name.encode()
        self.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size_bytes = transmission_flags = None
        while True:
            option, reply_type, data = self.read_option_reply()
            assert option == OPT_GO, option
            if reply_type == REP_INFO:
                (info_type,) = struct.unpack_from(">H", data)
                if info_type == INFO_EXPORT:
                    _, size_bytes, transmission_flags = INFO_EXPORT_BODY.unpack(data)
            elif reply_type == REP_ACK:
                assert size_bytes is not None, "NBD_OPT_GO acked without NBD_INFO_EXPORT"
                return size_bytes, transmission_flags
            else:
                raise AssertionError(f"NBD_OPT_GO {export_name!r} failed: reply {reply_type:#x} "
                                     f"{data!r}")

    def connect_export(self, export_name: str) -> tuple[int, int]:
        self.start_haggling()
        return self.go(export_name)

    # -- transmission -------------------------------------------------------

    def send_request(self, command: int, offset: int, length: int, *, flags: int = 0,
                     payload: bytes = b"", magic: int = REQUEST_MAGIC) -> int:
        cookie = self.next_cookie
        self.next_cookie += 1
        self.send(REQUEST.pack(magic, flags, command, cookie, offset, length) + payload)
        return cookie

    def read_simple_reply(self, cookie: int, data_length: int = 0) -> tuple[int, bytes]:
        magic, error, reply_cookie = SIMPLE_REPLY.unpack(self.recv_exactly(SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert reply_cookie == cookie, (reply_cookie, cookie)
        data = self.recv_exactly(data_length) if error == 0 and data_length else b""
        return error, data

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        cookie = self.send_request(CMD_READ, offset, length)
        return self.read_simple_reply(cookie, length)

    def write(self, offset: int, payload: bytes) -> int:
        cookie = self.send_request(CMD_WRITE, offset, len(payload), payload=payload)
        error, _ = self.read_simple_reply(cookie)
        return error

    def disconnect(self) -> None:
        self.send_request(CMD_DISC, 0, 0)
        self.wait_closed()


# ---------------------------------------------------------------------------
# fixtures and the "still healthy" check
# ---------------------------------------------------------------------------


class Served:
    """A writable 64 MiB disk of a VM of its own, on a running server."""

    def __init__(self, server, vm: str, image: Path):
        self.server = server
        self.vm = vm
        self.image = image
        self.export_name = f"{vm}/{image.stem}"
        self.socket_path = server.unix_socket_for(vm, image.stem)
        self.uri = server.nbd_uri(vm, image.stem)

    def raw_client(self) -> RawNbdClient:
        return RawNbdClient(self.socket_path)

    def assert_still_serves(self) -> None:
        """The daemon lives and an independent client writes and reads correctly."""
        self.server.assert_alive()
        pattern = int.from_bytes(os.urandom(1), "big") | 1
        offset = 40 * MiB + 4095
        self.server.run(["qemu-io", "-f", "raw",
                         "-c", f"write -P {pattern} {offset} 131073",
                         self.uri], 60)
        self.server.run(["qemu-io", "-f", "raw",
                         "-c", f"read -P {pattern} {offset} 131073",
                         "-c", f"read -P 0 {offset - 1} 1",
                         self.uri], 60)
        with open(self.image, "rb") as handle:
            handle.seek(offset)
            assert handle.read(131073) == bytes([pattern]) * 131073
        self.server.assert_alive()


_vm_numbers = itertools.count(1)


@pytest.fixture
def served(shared_server, tmp_path) -> Served:
    """One daemon per module (a start per test would double the run time);
    each test gets its own VM and image so no test sees another's data."""
    shared_server.assert_alive()
    vm = f"vm{next(_vm_numbers)}"
    image = make_image(tmp_path / "disk0.img", IMAGE_BYTES)
    shared_server.add_vm(vm, [image])
    return Served(shared_server, vm, image)


# ---------------------------------------------------------------------------
# the misbehaviours
# ---------------------------------------------------------------------------


def test_garbage_instead_of_handshake(served):
    with served.raw_client() as client:
        client.send(b"GET / HTTP/1.1\r\nHost: hvr\r\n\r\n" + os.urandom(256))
        client.wait_closed()
    served.assert_still_serves()


def test_connect_and_vanish_before_handshake(served):
    for _ in range(5):
        served.raw_client().close()
    with served.raw_client() as client:
        client.read_greeting()  # and vanish without answering
    served.assert_still_serves()


def test_unknown_client_flags_close_the_connection(served):
    with served.raw_client() as client:
        client.read_greeting()
        client.send(CLIENT_FLAGS.pack(FLAG_FIXED_NEWSTYLE | 0x8000_0000))
        client.wait_closed()
    served.assert_still_serves()


def test_garbage_in_option_haggling(served):
    with served.raw_client() as client:
        client.start_haggling()
        client.send(b"\xde\xad\xbe\xef" * 4 + os.urandom(64))  # no IHAVEOPT magic
        client.wait_closed()
    served.assert_still_serves()


def test_truncated_option_then_vanish(served):
    with served.raw_client() as client:
        client.start_haggling()
        # Promise 4096 bytes of option data, send 10 and go away.
        client.send(OPTION_HEADER.pack(IHAVEOPT, OPT_GO, 4096) + b"\x00" * 10)
    served.assert_still_serves()


def test_go_with_inconsistent_length_is_invalid_and_session_continues(served):
    with served.raw_client() as client:
        client.start_haggling()
        name = served.export_name.encode()
        # The name length claims 200 bytes; the option holds only len(name) of them.
        client.send_option(OPT_GO, struct.pack(">I", 200) + name + struct.pack(">H", 0))
        option, reply_type, _ = client.read_option_reply()
        assert option == OPT_GO
        assert reply_type == REP_ERR_INVALID, hex(reply_type)
        size_bytes, _ = client.go(served.export_name)
        assert size_bytes == IMAGE_BYTES
        error, data = client.read(0, 4096)
        assert (error, data) == (0, bytes(4096))
        client.disconnect()
    served.assert_still_serves()


def test_unknown_option_gets_err_unsup_and_session_continues(served):
    with served.raw_client() as client:
        client.start_haggling()
        client.send_option(0x4856_5200, b"not an option the server knows")
        option, reply_type, _ = client.read_option_reply()
        assert option == 0x4856_5200
        assert reply_type == REP_ERR_UNSUP, hex(reply_type)
        # LIST still works, then GO, then I/O.
        client.send_option(OPT_LIST)
        names = []
        while True:
            option, reply_type, data = client.read_option_reply()
            assert option == OPT_LIST
            if reply_type == REP_ACK:
                break
            assert reply_type == REP_SERVER, hex(reply_type)
            (name_length,) = struct.unpack_from(">I", data)
            names.append(data[4:4 + name_length].decode())
        assert served.export_name in names
        size_bytes, _ = client.go(served.export_name)
        assert size_bytes == IMAGE_BYTES
        assert client.write(4096, b"\x17" * 4096) == 0
        assert client.read(4096, 4096) == (0, b"\x17" * 4096)
        client.disconnect()
    served.assert_still_serves()


def test_go_for_unknown_export_is_an_error_reply(served):
    with served.raw_client() as client:
        client.start_haggling()
        name = f"{served.vm}/no-such-disk".encode()
        client.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        option, reply_type, _ = client.read_option_reply()
        assert option == OPT_GO
        assert reply_type & REP_FLAG_ERROR, hex(reply_type)
        client.send_option(OPT_ABORT)
        # The server may ack the abort or just close; either way it ends.
        client.wait_closed()
    served.assert_still_serves()


def test_oversized_read_is_refused(served):
    with served.raw_client() as client:
        client.connect_export(served.export_name)
        # The largest allowed request is served...
        error, data = client.read(0, MAX_PAYLOAD_BYTES)
        assert error == 0 and len(data) == MAX_PAYLOAD_BYTES
        # ...one block more gets an error, or the connection is dropped.
        cookie = client.send_request(CMD_READ, 0, MAX_PAYLOAD_BYTES + 4096)
        try:
            error, _ = client.read_simple_reply(cookie)
        except ConnectionClosed:
            pass
        else:
            assert error in (EINVAL, EOVERFLOW, ENOMEM), error
            assert client.read(0, 512) == (0, bytes(512))
    served.assert_still_serves()


def test_oversized_write_is_refused(served):
    oversized_bytes = 2 * MAX_PAYLOAD_BYTES
    with served.raw_client() as client:
        client.connect_export(served.export_name)
        cookie = client.send_request(CMD_WRITE, 0, oversized_bytes)
        # The server may drop the connection at once, or drain the payload
        # and answer with an error; it must not apply the write.
        chunk = b"\xee" * MiB
        try:
            for _ in range(oversized_bytes // len(chunk)):
                client.send(chunk)
            error, _ = client.read_simple_reply(cookie)
        except (BrokenPipeError, ConnectionResetError, ConnectionClosed):
            pass
        else:
            assert error != 0, "a write above the maximum payload was accepted"
            assert client.read(0, 4096) == (0, bytes(4096))
            client.disconnect()
    with open(served.image, "rb") as handle:
        assert handle.read(MiB) == bytes(MiB), "the oversized write was applied"
    served.assert_still_serves()


def test_out_of_range_read_is_einval(served):
    with served.raw_client() as client:
        size_bytes, _ = client.connect_export(served.export_name)
        assert size_bytes == IMAGE_BYTES
        for offset, length in [(size_bytes, 4096), (size_bytes - 512, 4096),
                               (2**63, 512), (2**64 - 512, 512)]:
            error, _ = client.read(offset, length)
            assert error == EINVAL, (offset, length, error)
        # The connection survives its errors.
        assert client.read(size_bytes - 512, 512) == (0, bytes(512))
        client.disconnect()
    served.assert_still_serves()


def test_out_of_range_write_is_enospc_or_einval(served):
    with served.raw_client() as client:
        size_bytes, _ = client.connect_export(served.export_name)
        for offset, length in [(size_bytes, 4096), (size_bytes - 512, 4096),
                               (2**64 - 512, 512)]:
            error = client.write(offset, b"\x99" * length)
            assert error in (ENOSPC, EINVAL), (offset, length, error)
        # The in-range part of the refused write was not applied, and the
        # image did not grow.
        assert client.read(size_bytes - 512, 512) == (0, bytes(512))
        assert client.write(size_bytes - 512, b"\x42" * 512) == 0
        assert client.read(size_bytes - 512, 512) == (0, b"\x42" * 512)
        client.disconnect()
    assert served.image.stat().st_size == IMAGE_BYTES
    served.assert_still_serves()


def test_write_to_read_only_export_is_eperm(served, tmp_path):
    golden = make_image(tmp_path / "golden" / "base.img", 4 * MiB)
    with open(golden, "r+b") as handle:
        handle.write(b"\x61" * 8192)
    golden_vm = f"golden-{served.vm}"
    served.server.add_vm(golden_vm, [golden], read_only=True)
    with RawNbdClient(served.server.unix_socket_for(golden_vm, "base")) as client:
        size_bytes, transmission_flags = client.connect_export(f"{golden_vm}/base")
        assert size_bytes == 4 * MiB
        assert transmission_flags & TFLAG_READ_ONLY
        # The spec says SHOULD be EPERM and the agent promises it; qemu-nbd,
        # the reference, rejects the command up front with EINVAL.
        allowed = {EPERM} if served.server.name == "agent" else {EPERM, EINVAL}
        assert client.write(0, b"\x62" * 4096) in allowed
        assert client.read(0, 8192) == (0, b"\x61" * 8192)
        client.disconnect()
    assert golden.read_bytes()[:8192] == b"\x61" * 8192
    served.assert_still_serves()


def test_client_vanishes_mid_write(served):
    with served.raw_client() as client:
        client.connect_export(served.export_name)
        client.send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, 1, 8 * MiB, 1 * MiB)
                    + b"\x33" * (512 * KiB))
    served.assert_still_serves()


def test_client_vanishes_before_reading_its_reply(served):
    with served.raw_client() as client:
        client.connect_export(served.export_name)
        for cookie in range(4):
            client.send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, cookie, 0, MAX_PAYLOAD_BYTES))
    served.assert_still_serves()


def test_bad_request_magic_closes_the_connection(served):
    with served.raw_client() as client:
        client.connect_export(served.export_name)
        assert client.read(0, 512) == (0, bytes(512))
        client.send(REQUEST.pack(0x1234_5678, 0, CMD_WRITE, 7, 0, 4096) + b"\x55" * 4096)
        client.wait_closed()
    with open(served.image, "rb") as handle:
        assert handle.read(4096) == bytes(4096), "a request with a bad magic was applied"
    served.assert_still_serves()


def test_abort_gets_its_ack_before_the_close(served):
    with served.raw_client() as client:
        client.start_haggling()
        client.send_option(2)  # NBD_OPT_ABORT
        option, reply_type, data = client.read_option_reply()
        assert (option, reply_type, data) == (2, REP_ACK, b"")
        client.wait_closed()
    served.assert_still_serves()


def test_zero_length_write_is_answered_and_changes_nothing(served):
    with served.raw_client() as client:
        client.connect_export(served.export_name)
        before = client.read(0, 4096)
        assert client.write(0, b"") == 0
        assert client.write(0, b"\x42" * 512) == 0  # the connection still works
        assert client.read(512, 4096 - 512) == (0, before[1][512:])
        client.disconnect()
    served.assert_still_serves()
