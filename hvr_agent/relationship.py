"""A VM's replication relationship in memory, and the one writer of its record.

Every change of the ``replication`` table goes through :class:`Relationship`
(``tests/unit/test_layering.py`` checks it): creating the record
(:meth:`Relationship.add`), saving it whole (R4: the newest version last,
under one lock, so the database never goes back to an older state), state
changes through the transition table (:meth:`Relationship.set_state`, with the
``replication_state_changed`` event), the recovery history settings and their
delivery to the replica (:meth:`Relationship.set_history`,
:meth:`Relationship.settings_acknowledged`), the application-consistent cuts
(:meth:`Relationship.app_consistent_cut`), and removing it.
"""

from __future__ import annotations

import asyncio
import logging

from hvr_common.pure.errors import NotFoundError
from hvr_common.pure.recovery_points import Consistency, HistorySettings
from hvr_common.pure.replication_state import TRANSITIONS, Action, ReplicationState, Step, step_for, transition
from hvr_common.shell.logs import event
from hvr_agent import shipper
from hvr_agent.store import AgentStore, ReplicationRecord
from hvr_agent.vms import ProtectedVm, VmRegistry

log = logging.getLogger("hvr.agent.replication")

ROLE = "primary"


class Stopped(Exception):
    """The relationship changed state under a running step (suspend, remove): stop the step."""


class Relationship:
    """One VM's relationship: its record (saved whole), its wake-up event, its last error."""

    def __init__(self, rec: ReplicationRecord, store: AgentStore, registry: VmRegistry):
        self.rec = rec
        self.store = store
        self.registry = registry
        self.wake = asyncio.Event()  # set on every state change and verb: the task looks again
        self._save_lock = asyncio.Lock()
        self.last_error: str | None = None

    @classmethod
    async def add(cls, rec: ReplicationRecord, store: AgentStore, registry: VmRegistry) -> Relationship:
        """Record a new relationship (``vm enable``)."""
        await asyncio.to_thread(store.add_replication, rec)
        return cls(rec, store, registry)

    def fresh(self) -> Relationship:
        """The same record for a new task (resuming from ``Error``): no error, no waiters."""
        return Relationship(self.rec, self.store, self.registry)

    async def remove(self) -> None:
        """Delete the record, its initial progress and its cycle rows."""
        await asyncio.to_thread(self.store.remove_replication, self.name)

    # --- the record --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.rec.vm

    async def _save(self) -> None:
        async with self._save_lock:  # R4: whoever saves last writes the newest record
            await asyncio.to_thread(self.store.save_replication, self.rec)

    async def update(self, **changes) -> None:
        self.rec = self.rec.replace(**changes)
        await self._save()

    async def set_state(self, action: Action, detail: str | None = None, **changes) -> None:
        old = self.rec.state
        new = transition(ROLE, old, action)
        await self.update(state=new, state_detail=detail, **changes)
        if new is not old:
            event(log, "replication_state_changed", vm=self.name, old=old.value, new=new.value, action=action.value,
                  detail=detail)
        self.wake.set()

    async def fail(self, detail: str) -> None:
        """A permanent error: ``Error`` where the table allows it, else only the detail is recorded."""
        if (ROLE, self.rec.state, Action.FAIL) in TRANSITIONS:
            await self.set_state(Action.FAIL, detail)
        else:
            await self.update(state_detail=detail)

    async def acknowledged(self, sequence: int, at_ns: int) -> None:
        """The replica holds cycle ``sequence`` durably: the commit point of a cycle (R1, P2)."""
        await self.update(next_sequence=sequence + 1, last_replication_ns=at_ns,
                          app_consistent_sequences=tuple(s for s in self.rec.app_consistent_sequences
                                                         if s > sequence))

    # --- recovery history settings -----------------------------------------------------------
    async def set_history(self, settings: HistorySettings) -> None:
        """New settings (``vm set``): kept, and marked for the replica (sent before the next step)."""
        self.rec = self.rec.with_history(settings).replace(settings_pending=True)
        await self._save()
        self.wake.set()

    async def settings_acknowledged(self, sent: HistorySettings) -> None:
        """The replica acknowledged ``sent``; still pending if the settings changed meanwhile."""
        if self.rec.settings_pending and self.rec.history == sent:
            await self.update(settings_pending=False)

    async def app_consistent_cut(self, sequence: int, consistency: Consistency, cut_ns: int) -> None:
        """Record how a cut that was due frozen came out: its sequence and time, or one more failure."""
        rec = self.rec
        if consistency is Consistency.APPLICATION:
            await self.update(last_app_consistent_ns=cut_ns,
                              app_consistent_sequences=rec.app_consistent_sequences + (sequence,))
        else:
            await self.update(app_consistent_failures=rec.app_consistent_failures + 1)

    # --- what the state asks for -------------------------------------------------------------
    def step(self) -> Step:
        return step_for(ROLE, self.rec.state)

    def check_state(self, expected: ReplicationState) -> None:
        if self.rec.state is not expected:
            raise Stopped()

    # --- the VM ------------------------------------------------------------------------------
    def vm(self) -> ProtectedVm:
        vm = self.registry.vms.get(self.name)
        if vm is None:
            raise NotFoundError(f"VM {self.name!r} is no longer registered")
        return vm

    def disks(self) -> list[shipper.DiskSource]:
        vm = self.vm()
        return [shipper.DiskSource(n, d.identity.disk_id, d.image_path, d.size, d.log_base)
                for n, d in vm.disks.items()]

    def pending_sequences(self) -> list[int]:
        """Closed cycles not yet acknowledged, oldest first."""
        nxt = self.rec.next_sequence
        if nxt is None:
            return []
        return list(range(nxt, self.vm().sequence))
