"""The agent's ``/metrics``: per replicated VM, read from the agent's state at scrape time.

The RPO is the age of the newest recovery point applied on the replica, as
the primary knows it: at each scrape the agent asks each replica briefly for
its newest applied cycle (``last_applied_log_time_ns``, when that cycle was
cut here) and remembers the answer, so while the replica cannot be reached
the RPO goes on growing from the last known point.  Before any answer it is
counted from the newest acknowledged cycle's cut.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from hvr_common.pure.errors import HvrError
from hvr_common.pure.health import Health
from hvr_common.pure.measure import NS, measure
from hvr_common.pure.metric_names import (HEALTH_LEVELS, PRIMARY_HEALTH, PRIMARY_METRICS, PRIMARY_STATE,
                                          UNAVAILABLE_VMS, compression_ratio)
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.metric_families import gauges, one_of
from hvr_agent.driver import VmReplication
from hvr_agent.replication import ReplicationManager
from hvr_agent.replication_report import health_of, initial_remaining_bytes, monitoring_window, pending_bytes
from hvr_agent.vms import VmRegistry

REPLICA_QUERY_TIMEOUT_S = 2.0


class AgentMetrics:
    def __init__(self, replication: ReplicationManager, registry: VmRegistry):
        self.replication = replication
        self.registry = registry
        self._applied_log_ns: dict[str, int] = {}  # VM -> the newest applied point the replica told of

    async def sample(self) -> list[Metric]:
        reps = list(self.replication.vms.values())
        samples = await asyncio.gather(*(self._sample(rep) for rep in reps))
        families: list[Metric] = gauges(PRIMARY_METRICS, samples)
        families.append(one_of(PRIMARY_HEALTH, samples, HEALTH_LEVELS))
        families.append(one_of(PRIMARY_STATE, samples, [s.value for s in ReplicationState]))
        unavailable = GaugeMetricFamily(UNAVAILABLE_VMS.full_name, UNAVAILABLE_VMS.help)
        unavailable.add_metric([], float(len(self.registry.unavailable)))
        families.append(unavailable)
        return families

    async def _sample(self, rep: VmReplication) -> dict:
        rel = rep.rel
        rec = rel.rec
        now = time.time_ns()
        start, _ = await asyncio.to_thread(monitoring_window, rel, now)
        rows = await asyncio.to_thread(rel.store.cycle_stats, rel.name, start)
        m = measure(rows, now_ns=now, pending_bytes=0, window_start_ns=start)
        shipped = [r for r in rows if r.shipped]
        wire = sum(r.wire_bytes for r in shipped)
        health = await health_of(rel, now)
        applied = await self._applied_log_ns_of(rep)
        if applied is None and rec.last_replication_ns is not None:
            applied = max((r.started_ns for r in shipped), default=None)
        return {
            "vm": rel.name,
            "rpo_s": round((now - applied) / NS, 3) if applied is not None else None,
            "last_success_s": rec.last_replication_ns / NS if rec.last_replication_ns is not None else None,
            "pending_bytes": await pending_bytes(rel) + initial_remaining_bytes(rep),
            "successful": m.SuccessfulReplicationCount,
            "missed": m.MissedReplicationCount,
            "errors": m.ReplicationErrors,
            "sent_bytes": wire,
            "compression_ratio": compression_ratio(sum(r.raw_bytes for r in shipped), wire),
            "average_latency_s": m.AverageReplicationLatency,
            "resync_remaining_bytes": _resync_remaining(rep),
            "frequency_s": rec.frequency_s,
            "health": Health(health.health).value,
            "state": rec.state.value,
        }

    async def _applied_log_ns_of(self, rep: VmReplication) -> int | None:
        """Ask the replica (briefly) for its newest applied point; the last answer when it cannot say."""
        vm = self.registry.vms.get(rep.name)
        if rep.client is not None and vm is not None:
            try:
                async with asyncio.timeout(REPLICA_QUERY_TIMEOUT_S):
                    state = await rep.client.replica_state(vm.record.vm_id)
            except (HvrError, TimeoutError, OSError):
                pass
            else:
                if state.get("last_applied_log_time_ns") is not None:
                    self._applied_log_ns[rep.name] = state["last_applied_log_time_ns"]
        return self._applied_log_ns.get(rep.name)


def _resync_remaining(rep) -> int:
    """Bytes the running resynchronization has still to compare (0 when none runs)."""
    progress = rep.resync.progress
    return max(progress.total_bytes - progress.compared_bytes, 0) if progress is not None else 0
