"""The agent's digest cache, end to end: a resync hashes only what was written since the last pass.

A 128 MiB image with data in every chunk (32 write-intent regions of 4 MiB).
The initial copy hashes what it sends, so the first resync reads nothing on
the primary (``cached_bytes`` in ``vm get``); after guest writes through NBD
to a few regions, the next resync reads those regions only (and, in bitmap
mode, those the previous resync marked changed).  A clean restart keeps the
cache (``<image>.digests``), a SIGKILL drops it, an image changed while the
agent was down drops it; every resync still ends with ``qemu-img compare``
equal.
"""

from __future__ import annotations

import os
import random

import pytest

from daemons import wait_for
from replication_pair import MiB, Pair, qemu_io

SIZE = 128 * MiB
REGION = 4 * MiB
BLOCK = 4096


@pytest.fixture(params=["journal", "bitmap"])
def pair(tmp_path, request):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 8 * MiB}, tracking=request.param).start()
    yield p
    p.close()


def _image(path) -> list:
    rng = random.Random(7)
    with open(path, "wb") as fh:
        for _ in range(SIZE // MiB):
            fh.write(rng.randbytes(MiB))
    return [path]


def _damage(path, regions: list[int], seed: int) -> None:
    """One byte changed in the middle of each of ``regions`` of the replica image."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for region in regions:
            os.pwrite(fd, bytes([rng.randrange(256)]) * 3, region * REGION + REGION // 2 + rng.randrange(1000))
        os.fsync(fd)
    finally:
        os.close(fd)


def _resync(pair: Pair, disks: list) -> dict:
    pair.agent.hvrctl("vm", "resync", "web", "--wait", timeout_s=300)
    resync = pair.status("web")["resync"]
    assert resync["running"] is False and pair.status("web")["state"] == "Replicating"
    pair.sync("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", disks)
    return resync


def _start(pair: Pair, tmp_path) -> list:
    disks = _image(tmp_path / "sys.img")
    pair.protect("web", disks, frequency=300)
    pair.initial("web")
    pair.wait_replica_applied("web")
    return disks


def test_a_resync_reads_only_the_regions_written_since_the_last_pass(pair, tmp_path):
    disks = _start(pair, tmp_path)
    _damage(pair.replica_image("web", "sys"), [3, 20], seed=1)
    first = _resync(pair, disks)
    # the initial copy hashed every chunk it sent: nothing is read again
    assert first["cached_bytes"] == SIZE and first["scanned_bytes"] == 0, first
    assert first["differing_bytes"] == 2 * BLOCK

    written = [6, 13, 27]
    uri = pair.agent.nbd_uri("web", "sys")
    qemu_io(uri, *[f"write -P {0x40 + r} {r * REGION + 12 * BLOCK} {8 * BLOCK}" for r in written])
    pair.sync("web")
    pair.wait_replica_applied("web")
    _damage(pair.replica_image("web", "sys"), [1, 13, 30], seed=2)
    second = _resync(pair, disks)
    # bitmap mode marks the regions a resync sends as changed: the first resync's are read again too
    stale = set(written) | ({3, 20} if pair.tracking == "bitmap" else set())
    assert second["scanned_bytes"] <= len(stale) * REGION, second
    assert second["scanned_bytes"] >= len(written) * REGION, second
    assert second["cached_bytes"] == SIZE - second["scanned_bytes"]
    assert second["differing_bytes"] == 3 * BLOCK


def test_a_clean_restart_keeps_the_cache_a_kill_or_an_offline_change_drops_it(pair, tmp_path):
    disks = _start(pair, tmp_path)
    image = disks[0]
    cache_file = image.with_name(image.name + ".digests")

    pair.agent.terminate()  # a clean stop: the cache is saved beside the image
    assert cache_file.exists()
    pair.agent.start().wait_ready()
    assert not cache_file.exists()  # read and deleted at open
    assert '"event":"digest_cache_loaded"' in pair.agent.log_tail(400)
    _damage(pair.replica_image("web", "sys"), [5], seed=3)
    kept = _resync(pair, disks)
    assert kept["scanned_bytes"] == 0 and kept["cached_bytes"] == SIZE, kept

    pair.agent.kill()  # a crash: nothing cached survives it
    assert not cache_file.exists()
    pair.agent.start().wait_ready()
    _damage(pair.replica_image("web", "sys"), [9], seed=4)
    killed = _resync(pair, disks)
    assert killed["scanned_bytes"] == SIZE and killed["cached_bytes"] == 0, killed

    pair.agent.terminate()
    assert cache_file.exists()
    fd = os.open(image, os.O_WRONLY)  # changed while the agent does not serve it
    try:
        os.pwrite(fd, b"offline", 17 * REGION + 333)
        os.fsync(fd)
    finally:
        os.close(fd)
    pair.agent.start().wait_ready()

    def resynced() -> bool:
        st = pair.status("web")
        return st["state"] == "Replicating" and (st.get("resync") or {}).get("running") is False \
            and '"event":"resync_completed"' in pair.agent.log_tail(400)
    wait_for(resynced, 300, "the automatic resync after the offline change", context=pair.agent.log_tail)
    log_text = pair.agent.log_tail(600)
    assert '"event":"digest_cache_ignored"' in log_text
    offline = pair.status("web")["resync"]
    assert offline["scanned_bytes"] == SIZE and offline["cached_bytes"] == 0, offline
    pair.sync("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", disks)


def test_a_removed_vm_leaves_no_cache_and_a_new_vm_of_the_same_image_does_not_take_one(pair, tmp_path):
    disks = _start(pair, tmp_path)
    image = disks[0]
    cache_file = image.with_name(image.name + ".digests")
    pair.agent.terminate()
    saved = cache_file.read_bytes()
    pair.agent.start().wait_ready()
    pair.agent.hvrctl("vm", "remove", "web")
    assert not cache_file.exists()
    cache_file.write_bytes(saved)  # another VM's cache left beside the image
    pair.agent.add_vm("other", disks)
    assert not cache_file.exists()
    assert '"event":"digest_cache_ignored"' in pair.agent.log_tail(400)
