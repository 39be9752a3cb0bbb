"""Several export catalogues served as one (the replica host: test failovers and backups)."""

from __future__ import annotations

from hvr_common.block.catalogue import Catalogues, Export
from hvr_common.pure.nbd_events import ExportInfo


class Part:
    def __init__(self, *names: str):
        self.found = {n: Export(ExportInfo(name=n, size=512, read_only=True, description=""), object(), n)
                      for n in names}
        self.callbacks = []

    def lookup(self, name):
        return self.found.get(name)

    def exports(self):
        return [e.info for e in self.found.values()]

    def on_withdrawn(self, callback):
        self.callbacks.append(callback)


def test_lookup_list_and_withdrawals_reach_every_part():
    tests, backups = Part("web-test/sys"), Part("web-backup/sys", "db-backup/data")
    both = Catalogues(tests, backups)
    assert both.lookup("web-test/sys") is tests.found["web-test/sys"]
    assert both.lookup("db-backup/data") is backups.found["db-backup/data"]
    assert both.lookup("nope/sys") is None
    assert [i.name for i in both.exports()] == ["db-backup/data", "web-backup/sys", "web-test/sys"]
    heard = []
    both.on_withdrawn(lambda group, reason: heard.append((group, reason)))
    backups.callbacks[0]("web-backup", "backup_ended")
    tests.callbacks[0]("web", "test_failover_stopped")
    assert heard == [("web-backup", "backup_ended"), ("web", "test_failover_stopped")]
