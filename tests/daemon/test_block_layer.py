"""The shared block layer serves any block device: plain raw images, no tracking, no agent.

A catalogue written for the tests (``tests/support/raw_export_server.py``)
hands :class:`hvr_common.block.nbd_server.NbdServer` two
:class:`~hvr_common.block.blockdev.RawImage` devices, one read-write and one
read-only, in a small process of their own.  Independent clients (qemu-io,
nbdsh) then write, read, trim, zero, flush and map them; ``qemu-img compare``
checks the served image against the same writes applied by qemu-io to a plain
file.  The agent's tracked disks pass the same clients in test_nbd_clients.py;
here only the agent's catalogue is checked: removing a VM drops the
connections to its disks and no others.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from daemons import CommandFailed, make_image, run, wait_for
from raw_export_server import WITHDRAWN_REASON, RawExportServer

KiB = 1024
MiB = 1024 * KiB
IMAGE_BYTES = 16 * MiB
CLIENT_TIMEOUT_S = 60

# The same writes through the server (in nbdsh, with FUA and NO_HOLE) and, as qemu-io commands,
# onto the reference file.
QEMU_IO_WRITES = ["write -P 0xa5 0 1M", "write -P 0x5a 3M 64k", "write -z 512k 64k", "discard 3M 4k",
                  "write -P 0x17 5000 777", "flush"]
NBDSH_MIRRORED = ["write -P 0x78 8M 4k", "write -z 10M 64k", "discard 12M 64k"]
NBDSH_WRITES = """
h.pwrite(b'\\x78' * 4096, 8 * 1048576, nbd.CMD_FLAG_FUA)
h.zero(65536, 10 * 1048576, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.trim(65536, 12 * 1048576, nbd.CMD_FLAG_FUA)
h.flush()
"""


@pytest.fixture
def served(tmp_path):
    rw = make_image(tmp_path / "rw.img", IMAGE_BYTES)
    ro = make_image(tmp_path / "ro.img", IMAGE_BYTES)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", ro], CLIENT_TIMEOUT_S)
    with RawExportServer(tmp_path / "server", {"rw": (rw, False), "ro": (ro, True)}) as server:
        yield server, rw, ro


def qemu_io(server: RawExportServer, target, *commands: str, check: bool = True, read_only: bool = False):
    cmd = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        cmd += ["-c", command]
    return server.run([*cmd, str(target)], CLIENT_TIMEOUT_S, check=check)


def nbdsh(server: RawExportServer, snippet: str):
    """``snippet`` runs with ``h``, an unconnected handle that asked for ``base:allocation``."""
    prologue = "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
    return server.run(["nbdsh", "-c", prologue + snippet], CLIENT_TIMEOUT_S)


def test_a_raw_image_is_served_to_independent_clients(served, tmp_path):
    server, rw, _ = served
    uri = server.nbd_uri("rw")
    qemu_io(server, uri, *QEMU_IO_WRITES)
    nbdsh(server, f"h.connect_uri({uri!r})\n" + """
assert h.get_size() == 16 * 1048576
assert not h.is_read_only()
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
""" + NBDSH_WRITES + """
assert h.pread(4096, 8 * 1048576) == b'\\x78' * 4096
assert h.pread(777, 5000) == b'\\x17' * 777
seen = {}
def status(metacontext, offset, entries, err):
    seen.setdefault(offset, entries)
h.block_status(1048576, 6 * 1048576, status)
h.block_status(65536, 0, status)
assert seen[6 * 1048576][1] == 3, seen   # a hole: HOLE | ZERO
assert seen[0][1] == 0, seen             # data
h.shutdown()
""")
    qemu_io(server, uri, "read -P 0xa5 0 4k", "read -P 0x17 5000 777", "read -P 0xa5 8k 504k",
            "read -P 0 512k 64k", "read -P 0 3M 4k", "read -P 0x5a 3076k 60k")

    expected = make_image(tmp_path / "expected.img", IMAGE_BYTES)
    qemu_io(server, expected, *QEMU_IO_WRITES, *NBDSH_MIRRORED)
    compared = server.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(rw), str(expected)],
                          check=False)
    assert compared.returncode == 0 and "Images are identical" in compared.stdout, compared.stdout + compared.stderr


def test_opt_list_names_every_export(served):
    server, _, _ = served
    result = nbdsh(server, f"""
h.set_opt_mode(True)
h.connect_uri({server.nbd_uri()!r})
names = []
h.opt_list(lambda name, description: names.append((name, description)))
h.opt_abort()
print(names)
""")
    assert result.stdout.strip() == "[('ro', 'raw image ro.img'), ('rw', 'raw image rw.img')]", result.stdout


def test_a_read_only_export_refuses_writes(served, tmp_path):
    server, _, ro = served
    before = ro.read_bytes()
    uri = server.nbd_uri("ro")
    # Client-side checks off, so the requests reach the server: it must answer EPERM to each.
    nbdsh(server, f"h.set_strict_mode(0)\nh.connect_uri({uri!r})\n" + """
assert h.is_read_only() and h.can_flush() and not h.can_trim() and not h.can_zero() and not h.can_fua()
for write in (lambda: h.pwrite(b'x' * 4096, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0),
              lambda: h.pwrite(b'x' * 4096, 1048576, nbd.CMD_FLAG_FUA)):
    try:
        write()
    except nbd.Error as exc:
        assert exc.errno == 'EPERM', exc  # libnbd names the error
    else:
        raise AssertionError('a write to a read-only export succeeded')
h.flush()
assert h.pread(65536, 0) == b'\\x3c' * 65536
h.shutdown()
""")
    refused = qemu_io(server, uri, "write -P 0x99 0 4k", check=False)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    qemu_io(server, uri, "read -P 0x3c 0 64k", "read -P 0 64k 64k", read_only=True)
    assert ro.read_bytes() == before


# --- withdrawing exports: a raw client holds a connection open ----------------------
IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
REP_ACK = 1
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def open_export(socket_path: Path, name: str) -> socket.socket:
    """A connection in the transmission phase of export ``name`` (fixed newstyle, NBD_OPT_GO)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(socket_path))
    _recv_exactly(sock, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    body = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(body)) + body)
    while True:
        _magic, _option, reply, length = struct.unpack(">QIII", _recv_exactly(sock, 20))
        _recv_exactly(sock, length)
        if reply == REP_ACK:
            return sock
        assert not reply & (1 << 31), f"NBD_OPT_GO refused: reply type {reply:#x}"


def test_withdrawn_exports_lose_their_connections(served):
    server, _, _ = served
    sock = open_export(server.nbd_socket, "rw")
    try:
        server.withdraw_all()
        sock.settimeout(20)
        assert sock.recv(1) == b"", "the connection to a withdrawn export stayed open"
    finally:
        sock.close()
    wait_for(lambda: WITHDRAWN_REASON in server.stderr_path.read_text(), 10,
             "nbd_connection_closed with the catalogue's reason", context=server.log_tail)
    with pytest.raises(CommandFailed):
        qemu_io(server, server.nbd_uri("rw"), "read 0 4k", read_only=True)
    server.assert_alive()


def read_block(sock: socket.socket, offset: int, length: int) -> bytes:
    """NBD_CMD_READ with a simple reply (no structured replies were negotiated)."""
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 7, offset, length))
    magic, error, handle = struct.unpack(">IIQ", _recv_exactly(sock, 16))
    assert (magic, error, handle) == (SIMPLE_REPLY_MAGIC, 0, 7)
    return _recv_exactly(sock, length)


def test_removing_a_vm_drops_only_the_connections_to_its_disks(agent, tmp_path):
    gone_img, kept_img = make_image(tmp_path / "a.img", 4 * MiB), make_image(tmp_path / "b.img", 4 * MiB)
    agent.add_vm("gone", [gone_img])
    agent.add_vm("kept", [kept_img])
    gone, kept = open_export(agent.nbd_socket, "gone/a"), open_export(agent.nbd_socket, "kept/b")
    try:
        assert read_block(gone, 0, 512) == bytes(512)
        agent.remove_vm("gone")
        gone.settimeout(20)
        assert gone.recv(1) == b"", "the connection to a removed VM's disk stayed open"
        assert read_block(kept, 4096, 512) == bytes(512)
    finally:
        gone.close()
        kept.close()
    wait_for(lambda: '"reason":"vm_removed"' in agent.stdout_path.read_text().replace(" ", ""), 10,
             "nbd_connection_closed with reason vm_removed", context=agent.log_tail)
