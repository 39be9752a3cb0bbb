"""The automatic resync window (hvr_common.pure.resync_window) and its agent.toml section."""

from __future__ import annotations

import datetime

import pytest

from hvr_common.pure.config import parse_agent_config
from hvr_common.pure.errors import ConfigError
from hvr_common.pure.resync_window import ResyncWindow, parse_window

TZ = datetime.timezone(datetime.timedelta(hours=2))


def at(hour: int, minute: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 12, 5, hour, minute, 30, tzinfo=TZ)


@pytest.mark.parametrize("text,now,expected", [
    ("22:00-06:00", at(23, 10), at(23, 10)),  # inside, before midnight
    ("22:00-06:00", at(3), at(3)),  # inside, after midnight
    ("22:00-06:00", at(6), at(22).replace(second=0)),  # the end is outside: today's start
    ("22:00-06:00", at(12), at(22).replace(second=0)),
    ("01:00-02:00", at(3), (at(1) + datetime.timedelta(days=1)).replace(second=0)),  # tomorrow
    ("01:00-02:00", at(1, 59), at(1, 59)),
])
def test_next_opening(text, now, expected):
    assert parse_window(text).next_open(now) == expected


def test_parse_and_config():
    assert parse_window("") is None
    assert str(parse_window("7:05-8:00")) == "07:05-08:00"
    for bad in ("24:00-01:00", "10:00-10:00", "10-11", "10:60-11:00"):
        with pytest.raises(ValueError):
            parse_window(bad)
    base = {"state_dir": "/s", "admin_socket": "/s/a", "nbd_socket": "/s/n"}
    cfg = parse_agent_config(dict(base, resync={"window": "22:00-06:00", "vm": {"db": {"window": ""}}}))
    assert cfg.resync.window_for("web") == ResyncWindow(22 * 60, 6 * 60)
    assert cfg.resync.window_for("db") is None
    assert parse_agent_config(base).resync.window_for("web") is None
    with pytest.raises(ConfigError) as err:
        parse_agent_config(dict(base, resync={"window": "late", "vm": {"db": {"windows": "x"}}, "when": 1}))
    text = str(err.value) + repr(getattr(err.value, "detail", ""))
    assert "resync.window" in text and "resync.vm.db.windows" in text and "resync.when" in text


def test_the_log_backlog_budget_is_half_the_disks_by_default():
    from hvr_common.pure.log_backlog import check_backlog
    assert not check_backlog(50, 100).over and check_backlog(51, 100).over
    assert check_backlog(10, 100, percent=5).over and check_backlog(10, 100).budget_bytes == 50
