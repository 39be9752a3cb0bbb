"""``Transfers``: the agent's transfer settings in force, and the two things they govern.

* the :class:`~hvr_agent.throttle.Throttle` every upload passes through (the
  bandwidth cap and its schedule);
* the :class:`~hvr_common.shell.concurrency_limit.ConcurrencyLimit` of VMs
  uploading at once (``max_active_transfers``, Hyper-V's
  MaximumActiveTransfers): a VM holds one place while any upload of its own is
  in flight (:meth:`ReplicaClient` takes it), so an initial copy's windows in
  flight together count once.

agent.toml gives the settings at start; ``hvrctl server set`` (admin
``PATCH /v1/settings``) changes them at once and stores the changed ones in
agent.db (``meta`` row ``transfer_settings``), where they win over agent.toml
at the next start until ``DELETE /v1/settings`` forgets them.
"""

from __future__ import annotations

import asyncio
import json
import logging

from hvr_common.pure.bandwidth import format_rate
from hvr_common.pure.errors import UsageError
from hvr_common.pure.transfer_settings import TransferSettings
from hvr_common.shell.concurrency_limit import ConcurrencyLimit
from hvr_common.shell.logs import event
from hvr_agent.store import AgentStore
from hvr_agent.throttle import Throttle

log = logging.getLogger("hvr.agent.transfers")

META_KEY = "transfer_settings"


class Transfers:
    def __init__(self, configured: TransferSettings, store: AgentStore | None = None):
        self.configured = configured
        self.store = store
        self.overrides: dict = self._load_overrides()
        self.settings = configured.changed(self.overrides) if self.overrides else configured
        self.throttle = Throttle(self.settings.bandwidth)
        self.slots = ConcurrencyLimit(self.settings.max_active_transfers)

    def _load_overrides(self) -> dict:
        if self.store is None:
            return {}
        raw = self.store.get_meta(META_KEY)
        if raw is None:
            return {}
        overrides = json.loads(raw)
        try:
            self.configured.changed(overrides)
        except ValueError as exc:  # stored by an older version with other rules: agent.toml applies
            event(log, "transfer_settings_ignored", logging.WARNING, error=str(exc))
            return {}
        return overrides

    def view(self) -> dict:
        return {**self.settings.to_json(), "bandwidth_now": format_rate(self.throttle.rate_now()), "set_by_operator": sorted(self.overrides),
                "active_transfers": self.slots.active, "waiting_transfers": self.slots.statistics()["waiting"],
                "sent_bytes": self.throttle.sent_bytes}


    async def change(self, changes: dict) -> dict:
        """Validate ``changes`` whole, store them, and apply them now."""
        if not isinstance(changes, dict) or not changes:
            raise UsageError("give at least one setting: bandwidth_limit, bandwidth_schedule, max_active_transfers")
        overrides = {**self.overrides, **changes}
        try:
            settings = self.configured.changed(overrides)
        except ValueError as exc:
            raise UsageError(f"invalid transfer settings: {exc}", hint="see hvrctl server set --help") from None
        await asyncio.to_thread(self._store, overrides)
        self._apply(settings, overrides)
        return self.view()

    async def reset(self) -> dict:
        """Forget the operator's changes: agent.toml's settings apply again."""
        await asyncio.to_thread(self._store, None)
        self._apply(self.configured, {})
        return self.view()

    def _store(self, overrides: dict | None) -> None:
        if self.store is not None:
            self.store.set_meta(META_KEY, None if overrides is None else json.dumps(overrides, sort_keys=True))

    def _apply(self, settings: TransferSettings, overrides: dict) -> None:
        self.settings = settings
        self.overrides = overrides
        self.throttle.set_schedule(settings.bandwidth)
        self.slots.set_limit(settings.max_active_transfers)
        event(log, "transfer_settings_changed", **settings.to_json())
