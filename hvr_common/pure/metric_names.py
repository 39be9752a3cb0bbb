"""The Prometheus metrics both daemons expose on ``/metrics``: names, help, labels (pure).

One table per daemon; the collectors (``hvr_agent/metrics.py``,
``hvr_listener/metrics.py``) fill a value per VM from the daemon's state at
scrape time.  Every metric is a gauge labelled with ``vm``; ``health`` and
``state`` are one series per possible value, 1 for the current one (the
labelled-gauge pattern), so an alert can say ``hvr_replication_health{health="Critical"} == 1``.
The "window" metrics cover the monitoring window (:mod:`hvr_common.pure.monitoring`).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "hvr_"
HEALTH_LEVELS = ("Normal", "Warning", "Critical")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # without PREFIX
    help: str
    field: str  # the key of the per-VM sample that holds its value

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


PRIMARY_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("replication_rpo_seconds", "Age of the newest recovery point applied on the replica, as the "
               "primary knows it (seconds)", "rpo_s"),
    MetricSpec("replication_last_success_timestamp_seconds", "When the replica last acknowledged a cycle "
               "(Unix time)", "last_success_s"),
    MetricSpec("replication_pending_bytes", "PendingReplicationSize: bytes tracked and not yet acknowledged, "
               "with what the initial copy has still to send", "pending_bytes"),
    MetricSpec("replication_cycles_successful", "Cycles acknowledged within their interval in the monitoring "
               "window", "successful"),
    MetricSpec("replication_cycles_missed", "Cycles missed in the monitoring window", "missed"),
    MetricSpec("replication_errors", "Failed upload attempts in the monitoring window", "errors"),
    MetricSpec("replication_sent_bytes", "Bytes sent to the replica (on the wire) in the monitoring window",
               "sent_bytes"),
    MetricSpec("replication_compression_ratio", "Raw log bytes per byte on the wire in the monitoring window "
               "(1 when nothing was sent)", "compression_ratio"),
    MetricSpec("replication_average_latency_seconds", "Average time from cut to acknowledgement in the "
               "monitoring window", "average_latency_s"),
    MetricSpec("replication_resync_remaining_bytes", "Bytes a running resynchronization has still to compare "
               "(0 when none runs)", "resync_remaining_bytes"),
    MetricSpec("replication_frequency_seconds", "The replication interval", "frequency_s"),
)

REPLICA_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("replica_rpo_seconds", "Age of the newest recovery point applied on this replica (seconds since "
               "its cycle was cut on the primary)", "rpo_s"),
    MetricSpec("replica_last_received_timestamp_seconds", "When the newest cycle was received (Unix time)",
               "last_received_s"),
    MetricSpec("replica_last_applied_timestamp_seconds", "When the newest cycle was applied (Unix time)",
               "last_applied_s"),
    MetricSpec("replica_applied_bytes", "Bytes of the cycles applied, among the last ones kept in the history",
               "applied_bytes"),
    MetricSpec("replica_apply_lag_cycles", "Cycles received and not yet applied", "apply_lag_cycles"),
    MetricSpec("replica_apply_lag_seconds", "How long the oldest received, unapplied cycle has waited (0 when "
               "none waits)", "apply_lag_s"),
    MetricSpec("replica_resync_remaining_bytes", "Always 0: the primary runs a resynchronization and knows "
               "what is left (hvr_replication_resync_remaining_bytes); kept for dashboards", "resync_remaining_bytes"),
)

PRIMARY_HEALTH = MetricSpec("replication_health", "Replication health on the primary: 1 for the current level",
                            "health")
PRIMARY_STATE = MetricSpec("replication_state", "Replication state on the primary: 1 for the current state",
                           "state")
REPLICA_HEALTH = MetricSpec("replica_health", "Replication health on the replica: 1 for the current level",
                            "health")
REPLICA_STATE = MetricSpec("replica_state", "Replication state on the replica: 1 for the current state", "state")
READY = MetricSpec("ready", "1 when /readyz answers ready", "ready")
UNAVAILABLE_VMS = MetricSpec("vms_unavailable", "Registered VMs whose disks could not be opened", "unavailable")


def compression_ratio(raw_bytes: int, wire_bytes: int) -> float:
    return round(raw_bytes / wire_bytes, 3) if wire_bytes else 1.0
