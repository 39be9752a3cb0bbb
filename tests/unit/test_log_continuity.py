"""Log continuity: an unfinished cut's holes are told apart from a lost or renamed log; the log budget setting.

Also real files: a crash between two disks' log creations is simulated on disk
(one disk has the next log, the other not), recovery fills the hole, and the
pending range is then complete; a deleted or renamed log is found as a gap.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, strategies as st

from hvr_common.pure.config import parse_agent_config
from hvr_common.pure.errors import ConfigError
from hvr_common.pure.hrl import HrlEncoder, HrlHeader, encode_header
from hvr_common.pure.log_backlog import check_backlog
from hvr_common.pure.log_continuity import first_gap, unfinished_cut_holes
from hvr_common.shell.files import write_file_durably
from hvr_agent.housekeeping import pending_log_gap
from hvr_agent.journal import list_logs, log_path
from hvr_agent.recovery import close_open_logs, fill_unfinished_cut
from hvr_agent.shipper import DiskSource

VM_ID = uuid.UUID(int=7)
SIZE = 1 << 20


def test_an_unfinished_cut_leaves_holes_only_past_the_settled_sequence_and_without_records():
    records = {"a": {5: 3, 6: 0, 7: 0}, "b": {5: 1}}
    assert unfinished_cut_holes(6, records) == {"b": [6, 7]}
    assert unfinished_cut_holes(8, records) == {}  # below the settled sequence: every disk made them
    assert unfinished_cut_holes(6, {"a": {6: 2}, "b": {}}) == {}  # a record: the cut switched every disk


def test_a_missing_or_renamed_log_is_the_first_gap():
    assert first_gap([4, 5], {"a": {4: 4, 5: 5}, "b": {4: 4, 5: 5}}) is None
    gap = first_gap([4, 5], {"a": {4: 4, 5: 5}, "b": {4: 4}})
    assert (gap.disk, gap.sequence, gap.reason) == ("b", 5, "is missing")
    assert "holds log 9" in first_gap([4], {"a": {4: 9}}).describe()
    assert first_gap([4], {"a": {4: None}}).reason == "has no readable header"
    assert first_gap([], {"a": {}}) is None


@given(st.dictionaries(st.sampled_from("abc"), st.dictionaries(st.integers(1, 12), st.integers(0, 3), max_size=8),
                       min_size=1), st.integers(1, 12))
def test_filling_the_holes_leaves_no_gap_past_the_settled_sequence_unless_a_log_with_records_was_lost(records, settled):
    holes = unfinished_cut_holes(settled, records)
    filled = {d: {**logs, **{s: 0 for s in holes.get(d, [])}} for d, logs in records.items()}
    for seq in {s for logs in records.values() for s in logs if s >= settled}:
        with_records = any(logs.get(seq, 0) for logs in records.values())
        everywhere = all(seq in logs for logs in filled.values())
        assert everywhere or with_records
        for d, seqs in holes.items():  # never a hole below the settled sequence, never one a disk holds
            assert all(s >= settled and s not in records[d] for s in seqs)


def _log(image, disk_id: uuid.UUID, seq: int, writes: int = 0, end: bool = True):
    header = HrlHeader(VM_ID, disk_id, 1, seq, SIZE, 1)
    enc = HrlEncoder(header)
    body = encode_header(header) + b"".join(enc.write(i * 4096, b"x" * 4096) + b"x" * 4096 for i in range(writes))
    write_file_durably(log_path(image, seq), body + (enc.end(2) if end else b""))


def test_recovery_fills_an_unfinished_cut_so_the_pending_range_is_whole_and_a_deleted_log_is_found(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    ids = {"a": uuid.uuid4(), "b": uuid.uuid4()}
    for name, image in (("a", a), ("b", b)):
        _log(image, ids[name], 5, writes=2)
    _log(a, ids["a"], 6, end=False)  # the crash: a's next log was created, b's not
    scans = {n: close_open_logs(img, HrlHeader(VM_ID, ids[n], 1, 0, SIZE, 0)) for n, img in (("a", a), ("b", b))}
    holes = unfinished_cut_holes(6, {n: s.records for n, s in scans.items()})
    assert holes == {"b": [6]}
    fill_unfinished_cut(b, HrlHeader(VM_ID, ids["b"], 1, 0, SIZE, 0), holes["b"])
    disks = [DiskSource(n, ids[n], img, SIZE) for n, img in (("a", a), ("b", b))]
    assert pending_log_gap(disks, [5, 6]) is None
    log_path(b, 5).unlink()  # lost while the agent was stopped
    gap = pending_log_gap(disks, [5, 6])
    assert (gap.disk, gap.sequence, gap.reason) == ("b", 5, "is missing")
    log_path(a, 6).rename(log_path(a, 5).with_name(log_path(a, 5).name))  # a's log 5 replaced by log 6
    log_path(a, 6).touch(exist_ok=True)
    assert [s for s, _ in list_logs(a)] == [5, 6]
    gap = pending_log_gap(disks[:1], [5, 6])
    assert gap.sequence == 5 and "holds log 6" in gap.reason


def test_the_log_budget_is_a_setting_of_agent_toml():
    base = {"state_dir": "/var/lib/hvr", "admin_socket": "/run/hvr/a.sock", "nbd_socket": "/run/hvr/n.sock"}
    assert parse_agent_config(base).log_budget_percent == 50
    assert parse_agent_config(dict(base, log_budget_percent=2)).log_budget_percent == 2
    for bad in (0, 1001, "half"):
        with pytest.raises(ConfigError, match="log_budget_percent"):
            parse_agent_config(dict(base, log_budget_percent=bad))
    assert check_backlog(21, 1000, percent=2).over and not check_backlog(20, 1000, percent=2).over
