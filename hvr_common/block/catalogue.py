"""The export catalogue: which block devices the NBD server serves, and under which names.

A daemon hands the server one :class:`ExportCatalogue`.  The server asks it
for an export when a client names one (``NBD_OPT_INFO``, ``NBD_OPT_GO``,
``NBD_OPT_EXPORT_NAME``), for the list of exports (``NBD_OPT_LIST``), and
registers with it once to hear of exports withdrawn, whose connections it
then drops.  The agent's catalogue is its VM registry (one group per VM,
``hvr_agent/exports.py``); any other set of devices, such as read-only views
on a replica host, is served by writing another catalogue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hvr_common.block.blockdev import BlockDevice
from hvr_common.pure.nbd_events import ExportInfo

# Called by a catalogue with (group, reason) once the group's exports are withdrawn.
Withdrawn = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Export:
    """One export: what the protocol says about it, the device behind it, and its group.

    ``group`` names the exports that are withdrawn together (the agent: the
    VM); an export withdrawn on its own is its own group.
    """

    info: ExportInfo
    device: BlockDevice
    group: str

    @property
    def name(self) -> str:
        return self.info.name


class ExportCatalogue(Protocol):
    def lookup(self, name: str) -> Export | None:
        """The export of that name, or None if there is none (now)."""

    def exports(self) -> list[ExportInfo]:
        """Every export, in name order (for ``NBD_OPT_LIST``)."""

    def on_withdrawn(self, callback: Withdrawn) -> None:
        """Call ``callback(group, reason)`` after the group's exports were withdrawn.

        By then :meth:`lookup` no longer finds them; the callback must not block.
        """


class Catalogues:
    """Several catalogues served by one NBD server, as one (the replica host: test failovers and backups).

    Export names must not collide between them (each kind has its own name
    form); a lookup asks each in turn.  Withdrawals of every part reach the
    server.
    """

    def __init__(self, *parts: ExportCatalogue):
        self.parts = parts

    def lookup(self, name: str) -> Export | None:
        for part in self.parts:
            found = part.lookup(name)
            if found is not None:
                return found
        return None

    def exports(self) -> list[ExportInfo]:
        return sorted((info for part in self.parts for info in part.exports()), key=lambda i: i.name)

    def on_withdrawn(self, callback: Withdrawn) -> None:
        for part in self.parts:
            part.on_withdrawn(callback)
