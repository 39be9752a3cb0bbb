"""A resync's checkpoint files (hvr_agent.compare_checkpoint): round trip, and anything doubtful is none."""

from __future__ import annotations

import json
import os

from hvr_agent import compare_checkpoint as cp
from hvr_common.pure import digest_tree as dt


def sample() -> cp.ResyncCheckpoint:
    counters = dict(total_bytes=1 << 20, scanned_bytes=1 << 20, compared_bytes=65536, differing_bytes=8192,
                    sent_bytes=8192, started_ns=123)
    return cp.ResyncCheckpoint("vm-id", 7, 5, counters, {
        "sys": cp.DiskCheckpoint("disk-id", 1 << 20, [(1, 2, 16), (0, 16, 32)], 65536, 2, True)})


def test_round_trip_and_tree(tmp_path):
    base = tmp_path / "sys.img"
    cp.save(base, sample())
    assert cp.load(base) == sample()
    geometry = dt.Geometry(1 << 20)
    tree = dt.tree_of_bytes(geometry, os.urandom(1 << 20))
    cp.save_tree(base, tree)
    assert cp.load_tree(base, geometry).root() == tree.root()
    assert cp.load_tree(base, dt.Geometry(2 << 20)) is None  # another size: no tree
    cp.remove(base, [base])
    assert cp.load(base) is None and cp.load_tree(base, geometry) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_damaged_or_foreign_checkpoints_are_none(tmp_path):
    base = tmp_path / "sys.img"
    path = cp.checkpoint_path(base)
    good = sample().to_json()
    for bad in (b"{", b"[]", json.dumps(dict(good, version=2)).encode(),
                json.dumps(dict(good, base=-1)).encode(), json.dumps(dict(good, counters={})).encode(),
                json.dumps(dict(good, disks={"sys": dict(good["disks"]["sys"], pending=[[1, 2]])})).encode()):
        path.write_bytes(bad)
        assert cp.load(base) is None, bad
    path.write_bytes(json.dumps(good).encode())
    assert cp.load(base) is not None
