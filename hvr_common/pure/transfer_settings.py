"""The primary's transfer settings: the bandwidth cap and its schedule, and parallel transfers (pure).

From agent.toml (``[bandwidth]`` with ``limit`` and ``schedule``, and
``max_active_transfers``), changed at run time by ``hvrctl server set``
through the agent's admin API (``PATCH /v1/settings``).  The JSON form::

    {"bandwidth_limit": "50MiB/s", "max_active_transfers": 3,
     "bandwidth_schedule": [{"start": "08:00", "end": "18:00", "limit": "10MiB/s"}]}

Changes are validated whole: every problem is reported, each with its key,
and nothing is half-applied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hvr_common.pure.bandwidth import BandwidthSchedule

DEFAULT_MAX_ACTIVE_TRANSFERS = 3  # Hyper-V's MaximumActiveTransfers
MAX_ACTIVE_TRANSFERS = 1024
FIELDS = ("bandwidth_limit", "bandwidth_schedule", "max_active_transfers")


def check_parallelism(value, key: str, problems: list[str], upper: int = MAX_ACTIVE_TRANSFERS) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
        problems.append(f"{key}: must be a whole number from 1 to {upper}, not {value!r}")
        return None
    return value


@dataclass(frozen=True)
class TransferSettings:
    bandwidth: BandwidthSchedule = BandwidthSchedule()
    max_active_transfers: int = DEFAULT_MAX_ACTIVE_TRANSFERS

    def to_json(self) -> dict:
        bw = self.bandwidth.to_json()
        return {"bandwidth_limit": bw["limit"], "bandwidth_schedule": bw["schedule"],
                "max_active_transfers": self.max_active_transfers}

    def changed(self, changes: dict) -> TransferSettings:
        """These settings with ``changes`` (a subset of :data:`FIELDS`); ``ValueError`` lists every problem."""
        problems = [f"{key}: unknown setting (settings are {', '.join(FIELDS)})"
                    for key in sorted(set(changes) - set(FIELDS))]
        current = self.to_json()
        bandwidth = self.bandwidth
        if "bandwidth_limit" in changes or "bandwidth_schedule" in changes:
            try:
                bandwidth = BandwidthSchedule.from_json(changes.get("bandwidth_limit", current["bandwidth_limit"]),
                                                        changes.get("bandwidth_schedule",
                                                                    current["bandwidth_schedule"]),
                                                        where="bandwidth")
            except ValueError as exc:
                problems.append(str(exc))
        active = self.max_active_transfers
        if "max_active_transfers" in changes:
            active = check_parallelism(changes["max_active_transfers"], "max_active_transfers", problems)
        if problems:
            raise ValueError("; ".join(problems))
        return replace(self, bandwidth=bandwidth, max_active_transfers=active)


def parse_transfer_config(table: dict, problems: list[str]) -> TransferSettings:
    """agent.toml's ``[bandwidth]`` table and ``max_active_transfers`` key (the caller marks both seen)."""
    settings = TransferSettings()
    bw = table.get("bandwidth")
    if bw is not None:
        if not isinstance(bw, dict):
            problems.append("bandwidth: must be a table with limit and schedule")
        else:
            for key in sorted(set(bw) - {"limit", "schedule"}):
                problems.append(f"bandwidth.{key}: unknown key")
            try:
                settings = replace(settings, bandwidth=BandwidthSchedule.from_json(bw.get("limit"), bw.get("schedule")))
            except ValueError as exc:
                problems.extend(str(exc).split("; "))
    if "max_active_transfers" in table:
        active = check_parallelism(table["max_active_transfers"], "max_active_transfers", problems)
        if active is not None:
            settings = replace(settings, max_active_transfers=active)
    return settings
