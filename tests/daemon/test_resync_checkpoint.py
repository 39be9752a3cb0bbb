"""A resync continues after the agent is SIGKILLed mid-compare (its checkpoint, docs/resync.md).

A 1 GiB image with data in every chunk; the replica is damaged in every
chunk of its second half, so the compare proves the first half equal early
(a checkpoint records it) and then works through the second half block by
block.  The agent is SIGKILLed as soon as a checkpoint shows bytes compared
and nodes still pending; after the restart the resync must continue from
that checkpoint (``resumed_bytes`` in ``vm get`` is what the checkpoint held,
nothing already compared is compared again) and converge: ``qemu-img
compare`` finds the images identical.  The replica image must be unchanged by
the kill.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from daemons import wait_for
from replication_pair import MiB, Pair

SIZE = 1024 * MiB
CHUNK = 64 * 1024


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint(image) -> dict | None:
    try:
        return json.loads((image.parent / (image.name + ".resync")).read_bytes())
    except (FileNotFoundError, ValueError):
        return None  # not yet, or caught between the temp file and its rename


@pytest.mark.parametrize("tracking", ["journal", "bitmap"])
def test_a_resync_killed_mid_compare_continues_from_its_checkpoint(tmp_path, tracking):
    pair = Pair(tmp_path, agent_config={"initial_window_bytes": 16 * MiB}, tracking=tracking).start()
    try:
        image = tmp_path / "sys.img"
        with open(image, "wb") as fh:  # every chunk holds data, each its own pattern
            for chunk in range(SIZE // CHUNK):
                fh.write(chunk.to_bytes(8, "little") * (CHUNK // 8))
        pair.protect("web", [image], frequency=300)
        pair.initial("web", timeout_s=600)
        pair.sync("web")
        pair.wait_replica_applied("web")
        replica = pair.replica_image("web", "sys")
        fd = os.open(replica, os.O_WRONLY)
        try:
            for chunk in range(SIZE // CHUNK // 2, SIZE // CHUNK):
                os.pwrite(fd, b"\xa5", chunk * CHUNK + 4096 * (chunk % 16) + 7)
            os.fsync(fd)
        finally:
            os.close(fd)
        damaged = SIZE // 2 // CHUNK * 4096
        baseline = _sha(replica)

        pair.agent.hvrctl("vm", "resync", "web")

        def midway() -> bool:
            cp = _checkpoint(image)
            return bool(cp and cp["counters"]["compared_bytes"] > 0 and cp["disks"]["sys"]["pending"])
        wait_for(midway, 300, "a checkpoint with bytes compared and nodes pending", interval_s=0.01,
                 context=pair.agent.log_tail)
        pair.agent.kill()
        cp = _checkpoint(image)  # what the killed agent left: the restart continues from it
        assert cp["counters"]["compared_bytes"] > 0 and cp["disks"]["sys"]["pending"], cp
        assert _sha(replica) == baseline  # the replica is still at its last applied point

        pair.agent.start().wait_ready()

        def finished() -> bool:
            st = pair.status("web")
            return st["state"] == "Replicating" and not (st.get("resync") or {}).get("running")
        wait_for(finished, 600, "the resync to continue and finish", context=pair.agent.log_tail)
        resync = pair.status("web")["resync"]
        assert resync["resumed_bytes"] == cp["counters"]["compared_bytes"] > 0, (resync, cp)
        assert resync["compared_bytes"] == SIZE
        assert resync["differing_bytes"] == damaged  # each damaged block found once, none twice
        assert "resync_resumed" in pair.agent.log_tail(400)
        pair.sync("web")
        pair.wait_replica_applied("web", timeout_s=300)
        pair.assert_identical("web", [image])
        assert _checkpoint(image) is None  # removed once the resync completed
    finally:
        pair.close()
