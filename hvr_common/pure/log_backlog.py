"""The journal's backlog budget: how many bytes of closed, unshipped logs a VM may keep.

A VM in journal mode keeps every write in its logs until the replica
acknowledged them; while the link is down the logs grow.  The budget is a
share of the VM's disks' size (``DEFAULT_BUDGET_PERCENT``, 50 %).  Past it,
the VM switches to bitmap tracking until the backlog is shipped
(:mod:`hvr_agent.tracking_switch`, ``docs/bitmap-tracking.md``).  The share is
``log_budget_percent`` in agent.toml.  This module is the rule that says when.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BUDGET_PERCENT = 50
MAX_BUDGET_PERCENT = 1000  # logs may hold ten times the disks' size at most before the switch


def check_budget_percent(percent: int) -> None:
    """agent.toml ``log_budget_percent``: from 1 to MAX_BUDGET_PERCENT."""
    if not 1 <= percent <= MAX_BUDGET_PERCENT:
        raise ValueError(f"must be from 1 to {MAX_BUDGET_PERCENT} (percent of the VM's disks' size), not {percent}")


@dataclass(frozen=True, slots=True)
class BacklogCheck:
    pending_bytes: int
    budget_bytes: int

    @property
    def over(self) -> bool:
        return self.pending_bytes > self.budget_bytes


def check_backlog(pending_bytes: int, disk_bytes: int, percent: int = DEFAULT_BUDGET_PERCENT) -> BacklogCheck:
    return BacklogCheck(pending_bytes, disk_bytes * percent // 100)
