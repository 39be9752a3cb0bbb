"""The journal's backlog and its logs, end to end: a real agent and listener on loopback.

* A journal-mode VM whose replica stays unreachable until its logs pass the
  budget (``log_budget_percent`` in agent.toml, small here) switches to bitmap
  tracking (no resynchronization on the way), keeps it across an agent
  restart, stops growing its logs, ships the backlog once the replica is back,
  returns to journal mode, and the images compare equal.
* A pending log deleted, or two swapped, while the agent is stopped leads to
  ``WaitingForStartResynchronize`` and a compare at once (no window); an
  unfinished cut (a crash between two disks' log creations) does not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from daemons import wait_for
from hvr_common.pure.hrl import HEADER_SIZE, decode_header, encode_header
from replication_pair import MiB, Pair, make_disk, qemu_io

BLOCK = 4096
SIZE = 64 * MiB  # a budget of 2 %: about 1.3 MiB of logs


def _events(pair: Pair, name: str) -> list[dict]:
    found = []
    for path in (pair.agent.stdout_path, pair.agent.stderr_path):
        for line in Path(path).read_text(errors="replace").splitlines():
            if f'"event":"{name}"' in line:
                found.append(json.loads(line[line.index("{"):]))
    return found


def _writes(uri: str, rng: random.Random, count: int, length: int) -> None:
    qemu_io(uri, *[f"write -P {rng.randrange(1, 256)} {rng.randrange(0, (SIZE - length) // BLOCK) * BLOCK} {length}"
                   for _ in range(count)])


def _log_bytes(image: Path) -> int:
    return sum(p.stat().st_size for p in image.parent.glob(image.name + ".*.hrl"))


def _replicating(pair: Pair, disks: list[Path]) -> None:
    pair.agent.add_vm("web", disks)
    pair.agent.hvrctl("vm", "enable", "web", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path), "--frequency", "300")
    pair.initial("web")
    pair.sync("web")
    pair.wait_replica_applied("web")


def test_a_journal_vm_whose_link_stays_down_switches_to_bitmap_at_its_budget_and_back(tmp_path):
    pair = Pair(tmp_path, agent_config={"log_budget_percent": 2, "initial_window_bytes": 4 * MiB},
                tracking="journal").start()
    try:
        disk = make_disk(tmp_path / "sys.img", SIZE)
        _replicating(pair, [disk])
        uri = pair.agent.nbd_uri("web", "sys")
        rng = random.Random(13)
        pair.listener.terminate()  # the link stays down
        _writes(uri, rng, 8, 64 * 1024)
        pair.agent.cut("web")  # a closed cycle waits for the replica; the active log grows with every write
        _writes(uri, rng, 40, 64 * 1024)  # 2.5 MiB more: past the budget

        def switched() -> bool:
            st = pair.status("web")
            return st["tracking"] == "bitmap" and st["tracking_switch"] is not None
        wait_for(switched, 90, "the VM to switch to bitmap tracking", context=pair.agent.log_tail)
        st = pair.status("web")
        assert st["state"] == "Replicating" and st["tracking_switch"]["reason"] == "log_budget_exceeded"
        assert "budget" in pair.agent.hvrctl("vm", "get", "web").stdout  # shown to the operator as well
        exceeded, = _events(pair, "log_budget_exceeded")[:1]
        assert exceeded["bytes"] > exceeded["budget_bytes"] == SIZE * 2 // 100
        assert len(_events(pair, "tracking_switched")) == 1

        # While switched the agent keeps the logs it had and one bit per block: 16 MiB more writes,
        # rewritten over and over, add nothing to the logs and copy nothing aside.
        held = _log_bytes(disk)
        for _ in range(4):
            _writes(uri, rng, 64, 64 * 1024)
        assert _log_bytes(disk) - held < 64 * 1024, "the logs grew while the VM was tracked by bitmap"
        assert not list(disk.parent.glob("sys.img.*.cbw"))

        # An agent restart in the middle keeps the switch.
        pair.agent.terminate()
        pair.agent.start().wait_ready()
        st = pair.status("web")
        assert st["tracking"] == "bitmap" and st["tracking_switch"]["reason"] == "log_budget_exceeded"
        _writes(uri, rng, 16, 64 * 1024)

        pair.listener.start().wait_ready()  # the link is back: the backlog ships, then journal mode returns

        def back() -> bool:
            pair.agent.hvrctl("vm", "sync-now", "web", check=False, timeout_s=120)
            st = pair.status("web")
            return st["tracking"] == "journal" and st["tracking_switch"] is None
        wait_for(back, 180, "the VM to return to journal mode", context=pair.agent.log_tail)
        assert _events(pair, "tracking_switched_back")
        _writes(uri, rng, 8, 8192)  # journaled again
        pair.sync("web")
        pair.wait_replica_applied("web")
        pair.assert_identical("web", [disk])
        log_text = pair.agent.log_tail(100000)
        assert "WaitingForStartResynchronize" not in log_text and '"event":"resync_started"' not in log_text
        assert pair.status("web")["state"] == "Replicating"
        assert not (pair.agent.state_dir / "outbox" / "web" / "tracking-switch.json").exists()
    finally:
        pair.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}, tracking="journal").start()
    yield p
    p.close()


def _pending_logs(pair: Pair, disk: Path, rng: random.Random, cycles: int) -> list[int]:
    """With the replica down, ``cycles`` closed cycles with writes wait; answers their sequences."""
    uri = pair.agent.nbd_uri("web", disk.stem)
    pair.listener.terminate()
    for _ in range(cycles):
        _writes(uri, rng, 6, 16 * 1024)
        pair.agent.cut("web")
    first = pair.status("web")["next_sequence"]
    return list(range(first, first + cycles))


def _wait_resynced(pair: Pair) -> None:
    def resynced() -> bool:
        st = pair.status("web")
        return st["state"] == "Replicating" and (st.get("resync") or {}).get("running") is False
    wait_for(resynced, 180, "the automatic resync to finish", context=pair.agent.log_tail)


@pytest.mark.parametrize("damage", ["deleted", "swapped"])
def test_a_pending_log_lost_while_the_agent_was_stopped_leads_to_a_compare_not_a_copy(pair, tmp_path, damage):
    disk = make_disk(tmp_path / "sys.img", SIZE)
    _replicating(pair, [disk])
    rng = random.Random(3)
    seqs = _pending_logs(pair, disk, rng, 3)
    pair.agent.terminate()
    middle = disk.with_name(f"sys.img.{seqs[1]:010d}.hrl")
    last = disk.with_name(f"sys.img.{seqs[2]:010d}.hrl")
    if damage == "deleted":
        middle.unlink()
    else:
        swap = middle.with_name("swap")
        middle.rename(swap)
        last.rename(middle)
        swap.rename(last)
    pair.listener.start().wait_ready()
    pair.agent.start().wait_ready()
    _wait_resynced(pair)
    broken, = _events(pair, "log_sequence_broken")
    assert broken["seq"] == seqs[1] and broken["disk"] == "sys"
    assert broken["reason"] == ("is missing" if damage == "deleted" else f"is out of sequence: the file holds "
                                                                        f"log {seqs[2]}")
    required, = _events(pair, "resync_required")
    assert required["starts"] == "at once" and f"log {seqs[1]} of disk sys" in required["reason"]
    assert '"new":"WaitingForStartResynchronize"' in pair.agent.log_tail(100000)
    _writes(pair.agent.nbd_uri("web", "sys"), rng, 4, 8192)
    pair.sync("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", [disk])


def test_an_unfinished_cut_between_two_disks_is_no_lost_log(pair, tmp_path):
    disks = [make_disk(tmp_path / "sys.img", SIZE), make_disk(tmp_path / "data.img", SIZE)]
    _replicating(pair, disks)
    rng = random.Random(8)
    _pending_logs(pair, disks[0], rng, 1)
    pair.agent.kill()
    # What a crash between the two disks' log creations leaves: sys has the next log (a header), data has not.
    active = max(disks[0].parent.glob("sys.img.*.hrl"))
    header = decode_header(active.read_bytes()[:HEADER_SIZE])
    nxt = header.sequence + 1
    cut_header = type(header)(header.vm_id, header.disk_id, header.generation, nxt, header.disk_size, 1)
    active.with_name(f"sys.img.{nxt:010d}.hrl").write_bytes(encode_header(cut_header))
    pair.listener.start().wait_ready()
    pair.agent.start().wait_ready()
    filled, = _events(pair, "unfinished_cut_filled")
    assert filled["disk"] == "data" and filled["sequences"] == [nxt]
    _writes(pair.agent.nbd_uri("web", "data"), rng, 4, 8192)
    pair.sync("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", disks)
    assert not _events(pair, "log_sequence_broken") and not _events(pair, "resync_required")


def test_a_switch_marker_left_by_a_crash_after_the_switch_back_is_dropped(pair, tmp_path):
    """A crash after the store said journal again, before the marker went: the marker is dropped at the start."""
    disk = make_disk(tmp_path / "sys.img", SIZE)
    _replicating(pair, [disk])
    pair.agent.terminate()
    marker = pair.agent.state_dir / "outbox" / "web" / "tracking-switch.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"tracking": "bitmap", "reason": "log_budget_exceeded", "since_ns": 1}))
    pair.agent.start().wait_ready()
    wait_for(lambda: _events(pair, "tracking_switch_dropped"), 60, "the stale marker to be dropped",
             context=pair.agent.log_tail)
    st = pair.status("web")
    assert st["tracking"] == "journal" and st["tracking_switch"] is None and not marker.exists()
    _writes(pair.agent.nbd_uri("web", "sys"), random.Random(4), 4, 8192)
    pair.sync("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", [disk])
