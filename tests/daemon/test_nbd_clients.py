"""The NBD export, driven by independent clients: qemu-io, qemu-img, nbdsh,
nbdcopy, nbdinfo and fio.

Most tests run against the agent and against qemu-nbd (the reference): the
same test body, the same clients, the same verdicts.  Every end-to-end test
ends with ``qemu-img compare`` of the served image file against an image
built independently (the same writes applied by ``qemu-io`` to a plain file).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from daemons import AgentProcess, client_env, disk_stem, make_image

KiB = 1024
MiB = 1024 * KiB

CLIENT_TIMEOUT_S = 60


# ---------------------------------------------------------------------------
# client wrappers
# ---------------------------------------------------------------------------


def qemu_io(server, target: str, *commands: str, timeout_s: float = CLIENT_TIMEOUT_S,
            check: bool = True, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run qemu-io commands on ``target`` (an NBD URI or a raw file).

    qemu-io exits non-zero when any command fails, including a ``read -P``
    whose pattern does not match.
    """
    cmd = ["qemu-io", "-f", "raw"]
    if read_only:
        cmd.append("-r")
    for command in commands:
        cmd += ["-c", command]
    cmd.append(target)
    return server.run(cmd, timeout_s, check=check)


def nbdsh(server, uri: str, snippet: str, timeout_s: float = CLIENT_TIMEOUT_S
          ) -> subprocess.CompletedProcess:
    """Run a Python snippet in nbdsh connected to ``uri`` as ``h``.

    An exception in the snippet (a failed ``assert``) exits non-zero.
    """
    return server.run(["nbdsh", "-u", uri, "-c", snippet], timeout_s)


def qemu_img_compare(server, served_image: Path, expected_image: Path) -> None:
    """Byte-for-byte comparison; ``-U`` because the server holds the image."""
    result = server.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw",
         str(served_image), str(expected_image)],
        CLIENT_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, (
        f"served image {served_image} differs from {expected_image}:\n"
        f"{result.stdout}{result.stderr}\n{server.log_tail()}"
    )
    assert "Images are identical" in result.stdout, result.stdout


def fio_json(stdout: str) -> dict:
    """fio's JSON report (the nbd engine prints a line before it)."""
    start = stdout.find("{")
    assert start >= 0, f"fio printed no JSON:\n{stdout}"
    return json.loads(stdout[start:])


def qemu_io_pattern_commands(writes) -> list[str]:
    return [f"write -P {pattern:#04x} {offset} {length}" for pattern, offset, length in writes]


def build_expected_image(path: Path, size_bytes: int, commands: list[str], server) -> Path:
    """The independent image: the same qemu-io commands on a plain raw file."""
    make_image(path, size_bytes)
    if commands:
        qemu_io(server, str(path), *commands)
    return path


# ---------------------------------------------------------------------------
# (a) + (d): qemu-io patterns, aligned and misaligned, verified and compared
# ---------------------------------------------------------------------------

PATTERN_IMAGE_BYTES = 64 * MiB

# (pattern, offset, length), non-overlapping, many deliberately misaligned.
PATTERN_WRITES = [
    (0xAB, 0, 1 * MiB),
    (0x5C, 1 * MiB + 1, 12345),
    (0x11, 4095, 2),
    (0x22, 65535, 131073),
    (0x33, 3 * MiB + 511, 513),
    (0x44, 8 * MiB - 3, 7),
    (0x55, 20 * MiB + 100, 3 * MiB + 17),
    (0x66, PATTERN_IMAGE_BYTES - 7, 7),
]


def test_qemu_io_patterns_read_back_and_match_independent_image(server, tmp_path):
    image = make_image(tmp_path / "disk0.img", PATTERN_IMAGE_BYTES)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")
    # PATTERN_WRITES overlaps 0..1M with (0x11, 4095, 2) and (0x22, 65535, ...),
    # so write in list order and verify the final state, not each write.
    commands = qemu_io_pattern_commands(PATTERN_WRITES)
    qemu_io(server, uri, *commands)

    # A new connection reads back what the earlier one wrote.
    qemu_io(
        server, uri,
        "read -P 0xab 0 4095",
        "read -P 0x11 4095 2",
        "read -P 0xab 4097 61438",
        "read -P 0x22 65535 131073",
        "read -P 0xab 196608 851968",
        "read -P 0x00 1048576 1",
        "read -P 0x5c 1048577 12345",
        "read -P 0x00 1060922 10",
        "read -P 0x33 3146239 513",
        "read -P 0x44 8388605 7",
        "read -P 0x55 20971620 3145745",
        "read -P 0x00 24117365 100",
        f"read -P 0x66 {PATTERN_IMAGE_BYTES - 7} 7",
    )
    # A wrong expectation must be caught: qemu-io's verdict is the oracle.
    wrong = qemu_io(server, uri, "read -P 0xac 0 4095", check=False)
    assert wrong.returncode != 0 and "Pattern verification failed" in wrong.stdout

    expected = build_expected_image(tmp_path / "expected.img", PATTERN_IMAGE_BYTES,
                                    commands, server)
    qemu_img_compare(server, image, expected)


def test_qemu_io_over_tcp(agent, tmp_path):
    image = make_image(tmp_path / "disk0.img", 16 * MiB)
    agent.add_vm("vm1", [image])
    uri = agent.nbd_tcp_uri("vm1", "disk0")
    commands = ["write -P 0x3c 12345 1000000", "write -P 0x7e 15M 1M"]
    qemu_io(agent, uri, *commands)
    qemu_io(agent, uri, "read -P 0x3c 12345 1000000", "read -P 0x7e 15M 1M",
            "read -P 0 0 12345")
    expected = build_expected_image(tmp_path / "expected.img", 16 * MiB, commands, agent)
    qemu_img_compare(agent, image, expected)


def test_fua_writes_and_flush(server, tmp_path):
    image = make_image(tmp_path / "disk0.img", 16 * MiB)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")
    commands = ["write -f -P 0x91 0 64k", "write -P 0x92 1M 3M", "flush",
                "write -f -P 0x93 7M 4097"]
    qemu_io(server, uri, *commands)
    # Once the client has its FUA/FLUSH replies the bytes are in the file.
    expected = build_expected_image(tmp_path / "expected.img", 16 * MiB,
                                    [c for c in commands if c != "flush"], server)
    qemu_img_compare(server, image, expected)


# ---------------------------------------------------------------------------
# (b): nbdsh and nbdcopy
# ---------------------------------------------------------------------------


def test_nbdsh_writes_and_reads(server, tmp_path):
    size_bytes = 32 * MiB
    image = make_image(tmp_path / "disk0.img", size_bytes)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")
    nbdsh(server, uri, "\n".join([
        f"assert h.get_size() == {size_bytes}, h.get_size()",
        "assert not h.is_read_only()",
        "h.pwrite(b'\\xa5' * 65536, 1048576)",
        "h.pwrite(bytes(range(256)) * 17, 777)",  # 4352 bytes, misaligned
        "h.pwrite(b'\\x5a' * 4096, 2097152, nbd.CMD_FLAG_FUA)",
        "h.flush()",
        "assert h.pread(65536, 1048576) == b'\\xa5' * 65536",
        "assert h.pread(4352, 777) == bytes(range(256)) * 17",
        "assert h.pread(777, 0) == bytes(777)",
    ]))
    # A second, independent connection sees the data...
    nbdsh(server, uri, "\n".join([
        "assert h.pread(4352, 777) == bytes(range(256)) * 17",
        "assert h.pread(4096, 2097152) == b'\\x5a' * 4096",
        "assert h.pread(10, 1048576 + 65536) == bytes(10)",
    ]))
    # ...and so does another client implementation.
    qemu_io(server, uri, "read -P 0xa5 1M 64k", "read -P 0x5a 2M 4k")

    commands = ["write -P 0xa5 1M 64k", "write -P 0x5a 2M 4k"]
    expected = build_expected_image(tmp_path / "expected.img", size_bytes, commands, server)
    with open(expected, "r+b") as handle:
        handle.seek(777)
        handle.write(bytes(range(256)) * 17)
    qemu_img_compare(server, image, expected)


def write_random_source_image(path: Path, size_bytes: int, seed: int) -> Path:
    """Random data with holes in between: exercises data, zero and hole paths."""
    rng = random.Random(seed)
    make_image(path, size_bytes)
    with open(path, "r+b") as handle:
        offset = 0
        while offset < size_bytes:
            length = min(rng.choice([4 * KiB, 60 * KiB, 1 * MiB, 3 * MiB + 5]),
                         size_bytes - offset)
            if rng.random() < 0.6:
                handle.seek(offset)
                handle.write(rng.randbytes(length))
            offset += length + rng.choice([0, 512, 2 * MiB])
    return path


def test_nbdcopy_into_export_and_back(server, tmp_path):
    size_bytes = 48 * MiB
    source = write_random_source_image(tmp_path / "source.img", size_bytes, seed=7)
    image = make_image(tmp_path / "disk0.img", size_bytes)
    # Old contents that the copy must overwrite, including where the source has holes.
    with open(image, "r+b") as handle:
        for offset in range(0, size_bytes, 5 * MiB):
            handle.seek(offset)
            handle.write(b"\xee" * 70000)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")

    server.run(["nbdcopy", str(source), uri], CLIENT_TIMEOUT_S)
    back = make_image(tmp_path / "back.img", size_bytes)
    server.run(["nbdcopy", uri, str(back)], CLIENT_TIMEOUT_S)

    qemu_img_compare(server, image, source)
    qemu_img_compare(server, back, source)


# ---------------------------------------------------------------------------
# (c): fio with verification
# ---------------------------------------------------------------------------


def run_fio(server, uri: str, *options: str, timeout_s: float = 120) -> dict:
    result = server.run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}",
                         "--output-format=json", "--verify_state_save=0", *options],
                        timeout_s)
    report = fio_json(result.stdout)
    for job in report["jobs"]:
        assert job["error"] == 0, f"fio job {job['jobname']} error {job['error']}"
    return report


def test_fio_random_writes_verify(server, tmp_path):
    size_bytes = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size_bytes)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")
    report = run_fio(server, uri, "--rw=randwrite", "--bs=4k", f"--size={size_bytes}",
                     "--iodepth=32", "--verify=crc32c", "--do_verify=1",
                     "--verify_fatal=1", "--randseed=1234")
    job = report["jobs"][0]
    assert job["write"]["io_bytes"] == size_bytes
    # The verify pass read back every block it wrote.
    assert job["read"]["io_bytes"] == size_bytes


def test_fio_mixed_sizes_verify(server, tmp_path):
    size_bytes = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size_bytes)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")
    report = run_fio(server, uri, "--rw=randwrite", "--bsrange=512-256k",
                     f"--size={size_bytes}", "--iodepth=8", "--verify=crc32c",
                     "--do_verify=1", "--verify_fatal=1", "--randseed=99")
    job = report["jobs"][0]
    assert job["write"]["io_bytes"] > 0
    assert job["read"]["io_bytes"] == job["write"]["io_bytes"]


# ---------------------------------------------------------------------------
# (e): TRIM and WRITE_ZEROES leave holes that every view agrees on
# ---------------------------------------------------------------------------

HOLE_IMAGE_BYTES = 32 * MiB
HOLE_DATA_END = 16 * MiB
TRIMMED = (2 * MiB, 3 * MiB)            # discard
ZEROED_MAY_UNMAP = (6 * MiB, 8 * MiB)   # write -z -u: WRITE_ZEROES without NO_HOLE
ZEROED_NO_HOLE = (10 * MiB, 11 * MiB)   # write -z: WRITE_ZEROES with NO_HOLE


def extents_covering(extents, start: int, end: int):
    """The extents (dicts with start/offset and length) overlapping [start, end)."""
    covering = []
    for extent in extents:
        begin = extent.get("start", extent.get("offset"))
        if begin < end and begin + extent["length"] > start:
            covering.append(extent)
    assert covering, f"no extent covers [{start}, {end}) in {extents}"
    return covering


def file_is_hole(path: Path, start: int, end: int) -> bool:
    """True if the file has no data in [start, end), by SEEK_DATA."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            next_data = os.lseek(fd, start, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after start
            return True
        return next_data >= end
    finally:
        os.close(fd)


def file_is_data(path: Path, start: int, end: int) -> bool:
    """True if [start, end) is entirely data, by SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, start, os.SEEK_DATA) == start and \
            os.lseek(fd, start, os.SEEK_HOLE) >= end
    finally:
        os.close(fd)


def test_trim_and_write_zeroes_make_holes(server, tmp_path):
    image = make_image(tmp_path / "disk0.img", HOLE_IMAGE_BYTES)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")
    qemu_io(server, uri, f"write -P 0x77 0 {HOLE_DATA_END}")
    assert file_is_data(image, 0, HOLE_DATA_END)

    def span(region):
        return f"{region[0]} {region[1] - region[0]}"

    qemu_io(server, uri,
            f"discard {span(TRIMMED)}",
            f"write -z -u {span(ZEROED_MAY_UNMAP)}",
            f"write -z {span(ZEROED_NO_HOLE)}")

    # Contents: zeros where trimmed/zeroed, the pattern elsewhere.
    qemu_io(server, uri,
            f"read -P 0x77 0 {TRIMMED[0]}",
            f"read -P 0 {span(TRIMMED)}",
            f"read -P 0x77 {TRIMMED[1]} {ZEROED_MAY_UNMAP[0] - TRIMMED[1]}",
            f"read -P 0 {span(ZEROED_MAY_UNMAP)}",
            f"read -P 0x77 {ZEROED_MAY_UNMAP[1]} {ZEROED_NO_HOLE[0] - ZEROED_MAY_UNMAP[1]}",
            f"read -P 0 {span(ZEROED_NO_HOLE)}",
            f"read -P 0x77 {ZEROED_NO_HOLE[1]} {HOLE_DATA_END - ZEROED_NO_HOLE[1]}",
            f"read -P 0 {HOLE_DATA_END} {HOLE_IMAGE_BYTES - HOLE_DATA_END}")

    holes = [TRIMMED, ZEROED_MAY_UNMAP, (HOLE_DATA_END, HOLE_IMAGE_BYTES)]
    data = [(0, TRIMMED[0]), (TRIMMED[1], ZEROED_MAY_UNMAP[0]),
            (ZEROED_MAY_UNMAP[1], ZEROED_NO_HOLE[0]), (ZEROED_NO_HOLE[1], HOLE_DATA_END)]

    # qemu-img's view through NBD block status.
    qemu_map = json.loads(server.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", uri], CLIENT_TIMEOUT_S).stdout)
    for start, end in holes:
        for extent in extents_covering(qemu_map, start, end):
            assert extent["data"] is False and extent["zero"] is True, (
                f"qemu-img map shows [{start}, {end}) as {extent}; full map {qemu_map}")
    for start, end in data:
        for extent in extents_covering(qemu_map, start, end):
            assert extent["data"] is True, (
                f"qemu-img map shows data [{start}, {end}) as {extent}; full map {qemu_map}")

    # libnbd's view of base:allocation (type bit 0 = hole, bit 1 = zero).
    nbd_map = json.loads(server.run(["nbdinfo", "--map", "--json", uri],
                                    CLIENT_TIMEOUT_S).stdout)
    for start, end in holes:
        for extent in extents_covering(nbd_map, start, end):
            assert extent["type"] & 3 == 3, (
                f"nbdinfo --map shows [{start}, {end}) as {extent}; full map {nbd_map}")
    for start, end in data:
        for extent in extents_covering(nbd_map, start, end):
            assert extent["type"] & 1 == 0, (
                f"nbdinfo --map shows data [{start}, {end}) as {extent}; full map {nbd_map}")

    # The served file itself is sparse there.
    for start, end in holes:
        assert file_is_hole(image, start, end), f"file has data in [{start}, {end})"
    for start, end in data:
        assert file_is_data(image, start, end), f"file has a hole in [{start}, {end})"
    # NO_HOLE: the zeroed range stays provisioned.  ext4 may report zeroed-but-
    # allocated (unwritten) extents as holes to SEEK_DATA, so count blocks.
    allocated_bytes = os.stat(image).st_blocks * 512
    provisioned_bytes = HOLE_DATA_END - (TRIMMED[1] - TRIMMED[0]) \
        - (ZEROED_MAY_UNMAP[1] - ZEROED_MAY_UNMAP[0])
    assert allocated_bytes >= provisioned_bytes, (
        f"{allocated_bytes} bytes allocated, expected at least {provisioned_bytes}: "
        f"WRITE_ZEROES with NO_HOLE deallocated its range")

    expected = build_expected_image(tmp_path / "expected.img", HOLE_IMAGE_BYTES,
                                    [f"write -P 0x77 0 {TRIMMED[0]}",
                                     f"write -P 0x77 {TRIMMED[1]} {ZEROED_MAY_UNMAP[0] - TRIMMED[1]}",
                                     f"write -P 0x77 {ZEROED_MAY_UNMAP[1]} "
                                     f"{ZEROED_NO_HOLE[0] - ZEROED_MAY_UNMAP[1]}",
                                     f"write -P 0x77 {ZEROED_NO_HOLE[1]} "
                                     f"{HOLE_DATA_END - ZEROED_NO_HOLE[1]}"], server)
    qemu_img_compare(server, image, expected)


def test_misaligned_trim_and_zero_read_back_zero(server, tmp_path):
    """TRIM and WRITE_ZEROES that do not cover whole blocks zero exactly their bytes."""
    image = make_image(tmp_path / "disk0.img", 8 * MiB)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0")
    qemu_io(server, uri, "write -P 0x42 0 2M")
    nbdsh(server, uri, "\n".join([
        "h.trim(1000, 5000)",              # count, offset
        "h.trim(8192 + 17, 524288 - 3)",
        "h.zero(3000, 1048576 + 333)",
        "h.flush()",
    ]))
    qemu_io(server, uri,
            "read -P 0x42 0 5000", "read -P 0 5000 1000", "read -P 0x42 6000 518285",
            "read -P 0 524285 8209", "read -P 0x42 532494 516415",
            "read -P 0 1048909 3000", "read -P 0x42 1051909 1045243")
    expected = build_expected_image(
        tmp_path / "expected.img", 8 * MiB,
        ["write -P 0x42 0 5000", "write -P 0x42 6000 518285",
         "write -P 0x42 532494 516415", "write -P 0x42 1051909 1045243"], server)
    qemu_img_compare(server, image, expected)


# ---------------------------------------------------------------------------
# (f): many clients at once
# ---------------------------------------------------------------------------


def run_concurrently(server, commands: list[list[str]], timeout_s: float) -> None:
    """Start every command at once; all must exit 0 before the deadline."""
    env = client_env()
    processes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for cmd in commands
    ]
    deadline = time.monotonic() + timeout_s
    failures = []
    for cmd, process in zip(commands, processes):
        try:
            stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            failures.append(f"timed out: {' '.join(cmd)}\n{stdout.decode()}{stderr.decode()}")
            continue
        if process.returncode != 0:
            failures.append(f"exit {process.returncode}: {' '.join(cmd)}\n"
                            f"{stdout.decode()[-2000:]}{stderr.decode()[-2000:]}")
    assert not failures, "\n\n".join(failures) + "\n" + server.log_tail()


def test_many_concurrent_clients(server, tmp_path):
    size_bytes = 32 * MiB
    vm1_disk0 = make_image(tmp_path / "vm1" / "disk0.img", size_bytes)
    vm1_disk1 = make_image(tmp_path / "vm1" / "disk1.img", size_bytes)
    vm2_disk0 = make_image(tmp_path / "vm2" / "disk0.img", size_bytes)
    server.add_vm("vm1", [vm1_disk0, vm1_disk1])
    server.add_vm("vm2", [vm2_disk0])
    uri_vm1_disk0 = server.nbd_uri("vm1", "disk0")
    uri_vm1_disk1 = server.nbd_uri("vm1", "disk1")
    uri_vm2_disk0 = server.nbd_uri("vm2", "disk0")

    # Four writers on the same export, each on its own 8 MiB quarter.
    same_export = {
        quarter: [f"write -P {0x10 + quarter * 4 + i:#04x} {quarter * 8 + i * 2}M 2M"
                  for i in range(4)]
        for quarter in range(4)
    }
    other_export = [f"write -P 0xd{i} {i * 3}M 1M" for i in range(8)]
    writers = [["qemu-io", "-f", "raw", *sum((["-c", c] for c in cmds), []), uri_vm1_disk0]
               for cmds in same_export.values()]
    writers.append(["qemu-io", "-f", "raw", *sum((["-c", c] for c in other_export), []),
                    uri_vm1_disk1])
    writers.append(["nbdsh", "-u", uri_vm2_disk0, "-c",
                    "for i in range(32):\n"
                    "    h.pwrite(bytes([i + 1]) * 65536, i * 1048576 + 4095)\n"
                    "h.flush()"])
    writers.append(["nbdsh", "-u", uri_vm2_disk0, "-c",
                    "for i in range(32):\n"
                    "    h.pwrite(bytes([0x80 + i]) * 4096, i * 1048576 + 524288)\n"])
    run_concurrently(server, writers, timeout_s=90)

    # Readers, also all at once, each checking a different part.
    readers = [["qemu-io", "-f", "raw",
                *sum((["-c", c.replace("write", "read")] for c in cmds), []), uri_vm1_disk0]
               for cmds in same_export.values()]
    readers.append(["qemu-io", "-f", "raw",
                    *sum((["-c", c.replace("write", "read")] for c in other_export), []),
                    uri_vm1_disk1])
    readers.append(["nbdsh", "-u", uri_vm2_disk0, "-c",
                    "for i in range(32):\n"
                    "    assert h.pread(65536, i * 1048576 + 4095) == bytes([i + 1]) * 65536, i\n"
                    "    assert h.pread(4096, i * 1048576 + 524288) == bytes([0x80 + i]) * 4096, i\n"])
    run_concurrently(server, readers, timeout_s=90)

    expected_vm1_disk0 = build_expected_image(
        tmp_path / "expected-vm1-disk0.img", size_bytes,
        [c for cmds in same_export.values() for c in cmds], server)
    expected_vm1_disk1 = build_expected_image(
        tmp_path / "expected-vm1-disk1.img", size_bytes, other_export, server)
    expected_vm2_disk0 = make_image(tmp_path / "expected-vm2-disk0.img", size_bytes)
    with open(expected_vm2_disk0, "r+b") as handle:
        for i in range(32):
            handle.seek(i * MiB + 4095)
            handle.write(bytes([i + 1]) * 65536)
            handle.seek(i * MiB + 524288)
            handle.write(bytes([0x80 + i]) * 4096)
    qemu_img_compare(server, vm1_disk0, expected_vm1_disk0)
    qemu_img_compare(server, vm1_disk1, expected_vm1_disk1)
    qemu_img_compare(server, vm2_disk0, expected_vm2_disk0)


# ---------------------------------------------------------------------------
# (g): nbdinfo
# ---------------------------------------------------------------------------


def nbdinfo_json(server, *args: str) -> dict:
    return json.loads(server.run(["nbdinfo", "--json", *args], CLIENT_TIMEOUT_S).stdout)


def list_uris(server) -> list[str]:
    """Export-less URIs to list from: one socket for the agent, one per qemu-nbd."""
    if isinstance(server, AgentProcess):
        return [f"nbd+unix:///?socket={server.nbd_socket}"]
    return [f"nbd+unix:///?socket={process.nbd_socket}"
            for process in server.exports.values()]


def test_nbdinfo_lists_exports_and_describes_them(server, tmp_path):
    images = {
        "vm1/disk0": make_image(tmp_path / "vm1" / "disk0.img", 16 * MiB),
        "vm1/data": make_image(tmp_path / "vm1" / "data.raw", 24 * MiB + 512),
        "vm2/disk0": make_image(tmp_path / "vm2" / "disk0.img", 8 * MiB),
        "golden/base": make_image(tmp_path / "golden" / "base.img", 4 * MiB),
    }
    server.add_vm("vm1", [images["vm1/disk0"], images["vm1/data"]])
    server.add_vm("vm2", [images["vm2/disk0"]])
    server.add_vm("golden", [images["golden/base"]], read_only=True)

    listed = {}
    for uri in list_uris(server):
        for export in nbdinfo_json(server, "--list", uri)["exports"]:
            listed[export["export-name"]] = export
    assert set(listed) == set(images)
    for name, image in images.items():
        assert listed[name]["export-size"] == image.stat().st_size, listed[name]

    for name, image in images.items():
        vm, disk = name.split("/")
        assert disk == disk_stem(image)
        info = nbdinfo_json(server, server.nbd_uri(vm, disk))["exports"][0]
        read_only = vm == "golden"
        assert info["export-name"] == name
        assert info["export-size"] == image.stat().st_size
        assert info["is_read_only"] is read_only, info
        assert info["can_flush"] is True, info
        assert isinstance(info["can_multi_conn"], bool), info
        assert "base:allocation" in info["contexts"], info
        if not read_only:
            assert info["can_trim"] is True, info
            assert info["can_zero"] is True, info
            assert info["can_fua"] is True, info


def test_nbdinfo_over_tcp(agent, tmp_path):
    image = make_image(tmp_path / "disk0.img", 16 * MiB)
    agent.add_vm("vm1", [image])
    info = nbdinfo_json(agent, agent.nbd_tcp_uri("vm1", "disk0"))["exports"][0]
    assert info["export-name"] == "vm1/disk0"
    assert info["export-size"] == 16 * MiB
    listed = nbdinfo_json(agent, "--list", f"nbd://127.0.0.1:{agent.tcp_port}")["exports"]
    assert [export["export-name"] for export in listed] == ["vm1/disk0"]


def test_unknown_export_is_refused(server, tmp_path):
    image = make_image(tmp_path / "disk0.img", 4 * MiB)
    server.add_vm("vm1", [image])
    uri = server.nbd_uri("vm1", "disk0").replace("/vm1/disk0", "/vm1/nosuchdisk")
    result = server.run(["nbdinfo", uri], CLIENT_TIMEOUT_S, check=False)
    assert result.returncode != 0, result.stdout
    server.assert_alive()
    qemu_io(server, server.nbd_uri("vm1", "disk0"), "write -P 1 0 4k", "read -P 1 0 4k")


def test_read_only_export_refuses_qemu_io_writes(server, tmp_path):
    image = make_image(tmp_path / "disk0.img", 4 * MiB)
    with open(image, "r+b") as handle:
        handle.write(b"\x61" * 8192)
    server.add_vm("golden", [image], read_only=True)
    uri = server.nbd_uri("golden", "disk0")
    refused = qemu_io(server, uri, "write -P 0x62 0 4k", check=False)
    assert refused.returncode != 0, refused.stdout
    qemu_io(server, uri, "read -P 0x61 0 8k", "read -P 0 8k 4k", read_only=True)
    assert image.read_bytes()[:8192] == b"\x61" * 8192
