"""The primary's recovery history settings and application-consistent cuts, without daemons.

The relationship record (with a real agent database), the CLI's flags, and
the rule that says when a cut is due frozen.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hvr_agent.relationship import Relationship
from hvr_agent.store import AgentStore, ReplicationRecord
from hvr_common.pure.errors import UsageError
from hvr_common.pure.recovery_points import HOUR_NS, Consistency, HistorySettings, app_consistent_due
from hvr_common.pure.replication_state import ReplicationState
from hvrctl.main import build_parser
from hvrctl.replication_settings import detail_rows, settings_of


@pytest.fixture
def store(tmp_path):
    s = AgentStore(tmp_path / "agent.db")
    s.add_vm("web", [("root", tmp_path / "web.img")], False)
    yield s
    s.close()


def record(**changes) -> ReplicationRecord:
    rec = ReplicationRecord(
        vm="web", replica_host="r", replica_port=1, key_file=Path("/k"), principal="p", frequency_s=30,
        compression=True, state=ReplicationState.REPLICATING, state_detail=None, generation=1, base_sequence=1,
        next_sequence=5, initial_at_ns=None, initial_started_ns=None, initial_completed_ns=None,
        last_replication_ns=None, enabled_ns=1)
    return rec.replace(**changes)


async def test_new_settings_are_pending_until_the_replica_acknowledges_them(store):
    rel = await Relationship.add(record(), store, None)
    assert rel.rec.history == HistorySettings() and not rel.rec.settings_pending
    first = HistorySettings(4, 15, 2)
    await rel.set_history(first)
    assert rel.wake.is_set()
    (saved,) = store.list_replications()
    assert saved.history == first and saved.settings_pending
    second = HistorySettings(4, 15, None)
    await rel.set_history(second)  # changed while the first was on its way
    await rel.settings_acknowledged(first)
    assert store.list_replications()[0].settings_pending  # the replica still has to hear the second
    await rel.settings_acknowledged(second)
    (saved,) = store.list_replications()
    assert not saved.settings_pending and saved.history == second


async def test_frozen_cuts_are_kept_until_acknowledged_and_failures_counted(store):
    rel = await Relationship.add(record(), store, None)
    await rel.app_consistent_cut(5, Consistency.APPLICATION, 1000)
    await rel.app_consistent_cut(6, Consistency.CRASH, 2000)
    await rel.app_consistent_cut(7, Consistency.APPLICATION, 3000)
    (saved,) = store.list_replications()
    assert (saved.last_app_consistent_ns, saved.app_consistent_failures) == (3000, 1)
    assert [saved.consistency_of(s) for s in (5, 6, 7)] == ["application", "crash", "application"]
    await rel.acknowledged(5, 4000)
    (saved,) = store.list_replications()
    assert (saved.next_sequence, saved.last_replication_ns, saved.app_consistent_sequences) == (6, 4000, (7,))
    await rel.acknowledged(7, 5000)
    assert store.list_replications()[0].app_consistent_sequences == ()


def test_a_frozen_cut_is_due_first_then_every_so_many_hours_after_the_last_success():
    now = time.time_ns()
    assert not app_consistent_due(HistorySettings(), None, now)
    hourly = HistorySettings(app_consistent_hours=2)
    assert app_consistent_due(hourly, None, now)
    assert not app_consistent_due(hourly, now - HOUR_NS, now)
    assert app_consistent_due(hourly, now - 2 * HOUR_NS, now)


def test_the_cli_sends_only_the_settings_given_and_off_as_null():
    parser = build_parser()
    args = parser.parse_args(["vm", "set", "web", "--fine-window", "0", "--app-consistent-hours", "off"])
    assert settings_of(args) == {"fine_window_min": 0, "app_consistent_hours": None}
    args = parser.parse_args(["vm", "set", "web", "--recovery-history", "3"])
    assert settings_of(args) == {"recovery_history": 3}
    args = parser.parse_args(["vm", "enable", "web", "--replica-server", "r", "--port", "1", "--key", "/k",
                              "--app-consistent-hours", "4"])
    assert settings_of(args) == {"app_consistent_hours": 4}
    with pytest.raises(SystemExit):  # "off" only turns it off; enabling leaves it out instead
        parser.parse_args(["vm", "enable", "web", "--replica-server", "r", "--port", "1", "--key", "/k",
                           "--app-consistent-hours", "off"])
    with pytest.raises(SystemExit):
        parser.parse_args(["vm", "set", "web", "--app-consistent-hours", "often"])


def test_vm_get_shows_the_settings():
    rows = dict(detail_rows({"recovery_history": 2, "fine_window_min": 60, "app_consistent_hours": None,
                             "settings_pending": True, "last_app_consistent_time": None}))
    assert rows["RecoveryHistory"] == 2 and rows["AppConsistentHours"] == "off" and "SettingsPending" in rows


@pytest.mark.parametrize("changes, field", [
    ({"recovery_history": 25}, "recovery_history"), ({"fine_window_min": True}, "fine_window_min"),
    ({"app_consistent_hours": 0}, "app_consistent_hours"), ({"frequency": 30}, "frequency"),
])
def test_a_bad_setting_names_its_field(changes, field):
    with pytest.raises(UsageError, match=field):
        HistorySettings.from_json({**HistorySettings().to_json(), **changes})
