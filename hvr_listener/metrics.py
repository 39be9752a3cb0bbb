"""The listener's ``/metrics``: per replica VM, read from the store at scrape time."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.metrics_core import Metric

from hvr_common.pure.health import replica_health
from hvr_common.pure.measure import NS
from hvr_common.pure.metric_names import (HEALTH_LEVELS, REPLICA_HEALTH, REPLICA_METRICS, REPLICA_STATE)
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.shell.metric_families import gauges, one_of
from hvr_listener.store import ListenerStore, Replica


class ListenerMetrics:
    def __init__(self, store: ListenerStore):
        self.store = store

    async def sample(self) -> list[Metric]:
        samples = await asyncio.to_thread(self._samples, time.time_ns())
        return [*gauges(REPLICA_METRICS, samples), one_of(REPLICA_HEALTH, samples, HEALTH_LEVELS),
                one_of(REPLICA_STATE, samples, [s.value for s in ReplicationState])]

    def _samples(self, now_ns: int) -> list[dict]:
        """One sample per replica (worker thread: it reads the store)."""
        return [self._sample(rep, now_ns) for rep in self.store.replicas()]

    def _sample(self, rep: Replica, now_ns: int) -> dict:
        history = self.store.cycle_history(rep.vm_id)
        waiting = [c for c in history if c.applied_ns is None]
        return {
            "vm": rep.name,
            "rpo_s": _age_s(now_ns, rep.last_applied_log_ns),
            "last_received_s": rep.last_replication_ns / NS if rep.last_replication_ns is not None else None,
            "last_applied_s": rep.last_applied_ns / NS if rep.last_applied_ns is not None else None,
            "applied_bytes": sum(c.bytes for c in history if c.applied_ns is not None),
            "apply_lag_cycles": max(0, rep.last_received_sequence - rep.last_applied_sequence),
            "apply_lag_s": _age_s(now_ns, min((c.received_ns for c in waiting), default=None)) or 0.0,
            "resync_remaining_bytes": 0,  # the primary's metric says what is left; the replica is not told
            "health": replica_health(rep.state, name=rep.name, frequency_s=rep.frequency_s,
                                     last_received_ns=rep.last_replication_ns, last_applied_ns=rep.last_applied_ns,
                                     state_detail=rep.state_detail, now_ns=now_ns).health.value,
            "state": rep.state.value,
        }


def _age_s(now_ns: int, then_ns: int | None) -> float | None:
    return round(max(0, now_ns - then_ns) / NS, 3) if then_ns is not None else None
