"""What ``vm get`` and ``vm measure`` show of a VM's replication: JSON-serialisable snapshots.

Health and the Measure statistics are pure rules over the recorded cycle
rows (:mod:`hvr_common.pure.health`, :mod:`hvr_common.pure.measure`); this
module gathers their inputs (the record, the rows, the logs on disk, the
initial copy's progress in memory) and shapes the answers.
"""

from __future__ import annotations

import asyncio
import time

from hvr_common.pure.errors import HvrError, NotFoundError
from hvr_common.pure.health import replication_health
from hvr_common.pure.measure import NS, measure, pending_log_bytes
from hvr_common.pure.monitoring import monitoring_settings, window
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire.status_views import PrimaryStatus, iso_time
from hvr_agent.driver import VmReplication
from hvr_agent.housekeeping import closed_log_bytes
from hvr_agent.relationship import Relationship

S = ReplicationState
MEASURE_REPLICA_TIMEOUT_S = 3.0


def monitoring_window(rel: Relationship, now_ns: int) -> tuple[int, int]:
    """The VM's monitoring window: the server's settings, started later by a statistics reset."""
    settings = monitoring_settings(rel.store.monitoring())
    return window(now_ns, settings, rel.store.statistics_reset_ns(rel.name))


async def health_of(rel: Relationship, now_ns: int):
    rec = rel.rec
    settings = monitoring_settings(await asyncio.to_thread(rel.store.monitoring))
    start, _ = await asyncio.to_thread(monitoring_window, rel, now_ns)
    rows = await asyncio.to_thread(rel.store.cycle_stats, rel.name, min(start, now_ns - 3600 * NS))
    return replication_health(rec.state, frequency_s=rec.frequency_s, rows=rows, now_ns=now_ns,
                              last_ack_ns=rec.last_replication_ns, replicating_since_ns=rec.initial_completed_ns,
                              state_detail=rec.state_detail, vm=rel.name, window_start_ns=start,
                              latency_limit_s=settings.latency_limit_s)


async def status_of(rep: VmReplication, primary_server: str) -> dict:
    """Get-VMReplication: state, health, where it replicates to, what is pending, the initial copy."""
    rel = rep.rel
    rec = rel.rec
    health = await health_of(rel, time.time_ns())
    vm = rel.registry.vms.get(rel.name)
    try:
        pending = len(rel.pending_sequences())
    except NotFoundError:
        pending = 0
    return PrimaryStatus(
        vm=rel.name, vm_id=vm.record.vm_id if vm else None, state=rec.state, state_detail=rec.state_detail,
        health=health.health.value, health_details=tuple(health.details), frequency_s=rec.frequency_s,
        compression=rec.compression, primary_server=primary_server, principal=rec.principal,
        replica_server=rec.replica_host, replica_port=rec.replica_port, generation=rec.generation,
        next_sequence=rec.next_sequence, pending_cycles=pending,
        last_replication_time=iso_time(rec.last_replication_ns), last_error=rel.last_error,
        enabled_at=iso_time(rec.enabled_ns), initial=initial_status(rep), recovery_history=rec.recovery_history,
        fine_window_min=rec.fine_window_min, app_consistent_hours=rec.app_consistent_hours,
        settings_pending=rec.settings_pending, last_app_consistent_time=iso_time(rec.last_app_consistent_ns),
        tracking=vm.record.tracking.value if vm else None,
        resync=rep.resync.status(), verify=verify_status(rep), prepared_sequence=rec.prepared_sequence,
        tracking_switch=rep.cycles.switch.status()).to_json()


def verify_status(rep: VmReplication) -> dict | None:
    if rep.verify.progress is not None:
        return dict(rep.verify.progress.to_json(), running=True)
    if rep.verify.last is not None:
        last = rep.verify.last
        return {"running": False, "sequence": last["sequence"], "differing_bytes": last["differing_bytes"],
                "compared_bytes": last["compared_bytes"], "elapsed_s": last["elapsed_s"]}
    return None


def initial_status(rep: VmReplication) -> dict | None:
    """The initial copy: when it was scheduled, started, completed; while it runs, bytes, rate and ETA."""
    rec = rep.rel.rec
    copy = rep.initial
    if rec.state not in (S.INITIAL_REPLICATION_IN_PROGRESS, S.READY_FOR_INITIAL_REPLICATION) and \
            rec.initial_completed_ns is not None:
        return {"scheduled_at": None, "started_at": iso_time(rec.initial_started_ns),
                "completed_at": iso_time(rec.initial_completed_ns)}
    disks = list(copy.progress.values())
    done = sum(p.done_bytes for p in disks)
    total = sum(p.allocated_bytes for p in disks)
    if total:
        percent = round(100.0 * done / total, 1)
    else:
        size = sum(p.size_bytes for p in disks)
        percent = round(100.0 * sum(p.durable_offset for p in disks) / size, 1) if size else 0.0
    rate = None
    eta_s = None
    if rec.state is S.INITIAL_REPLICATION_IN_PROGRESS and copy.run_started_ns is not None:
        elapsed_s = (time.time_ns() - copy.run_started_ns) / NS
        if elapsed_s > 0 and copy.run_bytes:
            rate = round(copy.run_bytes / elapsed_s)
            eta_s = round(max(0, total - done) / rate, 1)
    return {"scheduled_at": iso_time(rec.initial_at_ns), "started_at": iso_time(rec.initial_started_ns),
            "completed_at": iso_time(rec.initial_completed_ns), "bytes_done": done, "bytes_total": total,
            "percent": percent, "rate_bytes_per_s": rate, "eta_s": eta_s,
            "disks": [p.to_dict() for p in disks]}


async def measure_of(rep: VmReplication, primary_server: str) -> dict:
    """Measure-VMReplication over the monitoring window, with the VM's name, state and health."""
    rel = rep.rel
    now = time.time_ns()
    start, end = await asyncio.to_thread(monitoring_window, rel, now)
    rows = await asyncio.to_thread(rel.store.cycle_stats, rel.name, start)
    pending = await pending_bytes(rel) + initial_remaining_bytes(rep)
    m = measure(rows, now_ns=now, pending_bytes=pending, last_replication_ns=rel.rec.last_replication_ns,
                window_start_ns=start)
    health = await health_of(rel, now)
    out = m.to_dict()
    out["LastReplicationTime"] = iso_time(m.LastReplicationTime)
    out["WindowStartTime"] = iso_time(m.WindowStartTime)
    out.update({"VMName": rel.name, "State": rel.rec.state.value, "MonitoringStartTime": iso_time(start),
                "MonitoringEndTime": iso_time(end), "Health": health.health.value,
                "ReplicationHealthDetails": list(health.details), "ReplicationMode": "Primary",
                "FrequencySec": rel.rec.frequency_s,
                # since enabling: cuts due application-consistent that were crash-consistent
                "AppConsistentFailedCount": rel.rec.app_consistent_failures})
    out["LastAppliedLogTime"] = await _last_applied_log_time(rep)
    return out


def initial_remaining_bytes(rep: VmReplication) -> int:
    """What the initial copy still has to send (Hyper-V counts it in PendingReplicationSize); 0 after it.

    While it runs: the data bytes not yet sent; before it started: the disks' sizes (Hyper-V's "disk
    file sizes times the part not yet done", nothing being done yet)."""
    rec = rep.rel.rec
    if rec.initial_completed_ns is not None or rec.state not in (S.READY_FOR_INITIAL_REPLICATION,
                                                                  S.INITIAL_REPLICATION_IN_PROGRESS, S.ERROR):
        return 0
    if rep.initial.progress:
        return sum(max(0, p.allocated_bytes - p.done_bytes) for p in rep.initial.progress.values())
    vm = rep.rel.registry.vms.get(rep.name)
    return sum(disk.size for disk in vm.disks.values()) if vm is not None else 0


async def pending_bytes(rel: Relationship) -> int:
    """Bytes of logs not yet acknowledged, the closed ones on disk and the active ones: their records
    only, so 0 when nothing is pending.  In bitmap mode (whose logs hold no writes) the dirty blocks
    of the cycles not yet acknowledged, which are what those cycles ship."""
    try:
        vm = rel.vm()
    except NotFoundError:
        return 0
    nxt = rel.rec.next_sequence
    active = {disk.log_base: disk.log for disk in vm.disks.values() if disk.log is not None}
    total = sum(pending_log_bytes(lg.written + len(lg.buf), closed=False) for lg in active.values())
    total += sum(disk.dirty.pending_bytes() for disk in vm.disks.values() if disk.dirty is not None)
    skip = {(path, lg.sequence) for path, lg in active.items()}
    images = [d.log_base for d in vm.disks.values()]
    return total + await asyncio.to_thread(closed_log_bytes, images, nxt, skip)


async def _last_applied_log_time(rep: VmReplication) -> str | None:
    """LastAppliedLogTime lives on the replica: ask it (briefly); None when it cannot say."""
    client = rep.client
    vm = rep.rel.registry.vms.get(rep.name)
    if client is None or vm is None:
        return None
    try:
        async with asyncio.timeout(MEASURE_REPLICA_TIMEOUT_S):
            state = await client.replica_state(vm.record.vm_id)
    except (HvrError, TimeoutError):
        return None
    return iso_time(state.get("last_applied_log_time_ns"))
