"""The journal's backlog budget: how many bytes of closed, unshipped logs a VM may keep.

A VM in journal mode keeps every write in its logs until the replica
acknowledged them; while the link is down the logs grow.  The budget is a
share of the VM's disks' size (``DEFAULT_BUDGET_PERCENT``, 50 %).  Past it,
the VM is to switch to bitmap tracking until the backlog is shipped (the
change-tracking issue builds that mode); until then the agent only reports
the crossing (event ``log_budget_exceeded``), and a resync would replace the
backlog by a compare (``docs/resync.md``).  This module is the seam: the rule
that says when.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BUDGET_PERCENT = 50


@dataclass(frozen=True, slots=True)
class BacklogCheck:
    pending_bytes: int
    budget_bytes: int

    @property
    def over(self) -> bool:
        return self.pending_bytes > self.budget_bytes


def check_backlog(pending_bytes: int, disk_bytes: int, percent: int = DEFAULT_BUDGET_PERCENT) -> BacklogCheck:
    return BacklogCheck(pending_bytes, disk_bytes * percent // 100)
