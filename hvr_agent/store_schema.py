"""The agent store's schema: version 1 and the migration ladder (:mod:`hvr_agent.store`).

Version 2: recovery history settings and application-consistent cuts; 3: certificate
authentication and TLS; 4: each VM's tracking mode; 5: failover (a failed-over VM served
here and whether its failover was completed; a prepared primary's final sequence).
"""

from __future__ import annotations

from hvr_common.shell.state_db import Migration

# Version 1 is SCHEMA; each later version is one step of MIGRATIONS, (version, SQL or function),
# numbered 2, 3, ...  (hvr_common/shell/state_db.py runs them; never edit a released step, add one).
SCHEMA_VERSION = 5
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL UNIQUE,
    generation INTEGER NOT NULL,
    next_sequence INTEGER NOT NULL,
    read_only INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    disk_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    position INTEGER NOT NULL,
    PRIMARY KEY (vm, name)
);
CREATE TABLE IF NOT EXISTS replication (
    vm TEXT PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE,
    replica_host TEXT NOT NULL,
    replica_port INTEGER NOT NULL,
    key_file TEXT NOT NULL,
    principal TEXT NOT NULL,
    frequency_s INTEGER NOT NULL,
    compression INTEGER NOT NULL,
    state TEXT NOT NULL,
    state_detail TEXT,
    generation INTEGER NOT NULL,
    base_sequence INTEGER,          -- cut at the start of the initial copy: logs up to it are in the images
    next_sequence INTEGER,          -- the next cycle to ship
    initial_at_ns INTEGER,          -- scheduled start of the initial copy
    initial_started_ns INTEGER,
    initial_completed_ns INTEGER,
    last_replication_ns INTEGER,    -- last acknowledgement of a cycle
    enabled_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replication_initial (
    vm TEXT NOT NULL REFERENCES replication(vm) ON DELETE CASCADE,
    disk_id TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    durable_offset INTEGER NOT NULL,  -- the replica holds [0, durable_offset) of the disk
    allocated_bytes INTEGER NOT NULL, -- data bytes of the image when the copy started
    done_bytes INTEGER NOT NULL,      -- data bytes below durable_offset
    PRIMARY KEY (vm, disk_id)
);
CREATE TABLE IF NOT EXISTS replication_cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL REFERENCES replication(vm) ON DELETE CASCADE,
    sequence INTEGER,
    started_ns INTEGER NOT NULL,
    finished_ns INTEGER,
    wire_bytes INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,
    result TEXT NOT NULL,           -- ok | missed | error
    error TEXT
);
CREATE INDEX IF NOT EXISTS replication_cycles_by_time ON replication_cycles (vm, started_ns);
"""
SCHEMA_V2 = """
ALTER TABLE replication ADD COLUMN recovery_history INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replication ADD COLUMN fine_window_min INTEGER NOT NULL DEFAULT 60;
ALTER TABLE replication ADD COLUMN app_consistent_hours INTEGER;        -- NULL: off
ALTER TABLE replication ADD COLUMN settings_pending INTEGER NOT NULL DEFAULT 0;  -- the replica has not got them yet
ALTER TABLE replication ADD COLUMN last_app_consistent_ns INTEGER;      -- the last cut frozen successfully
ALTER TABLE replication ADD COLUMN app_consistent_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replication ADD COLUMN app_consistent_sequences TEXT NOT NULL DEFAULT '';  -- unacknowledged, comma-separated
"""
SCHEMA_V3 = """
ALTER TABLE replication ADD COLUMN auth TEXT NOT NULL DEFAULT 'token';  -- token | certificate
ALTER TABLE replication ADD COLUMN ca_file TEXT NOT NULL DEFAULT '';    -- '': plain HTTP
ALTER TABLE replication ADD COLUMN cert_file TEXT NOT NULL DEFAULT '';
ALTER TABLE replication ADD COLUMN cert_key_file TEXT NOT NULL DEFAULT '';
"""
SCHEMA_V4 = """
ALTER TABLE vms ADD COLUMN tracking TEXT NOT NULL DEFAULT 'journal';
"""
SCHEMA_V5 = """
ALTER TABLE vms ADD COLUMN failover TEXT;                   -- NULL | waiting_completion | completed
ALTER TABLE replication ADD COLUMN prepared_sequence INTEGER;  -- PreparedForFailover: the last cycle shipped
"""
MIGRATIONS: tuple[Migration, ...] = (
    (2, SCHEMA_V2),  # recovery history settings, application-consistent cuts
    (3, SCHEMA_V3),  # certificate authentication and TLS (ReplicaCredentials)
    (4, SCHEMA_V4),  # tracking mode per VM
    (5, SCHEMA_V5),  # failover: a served failed-over VM's status, a prepared primary's final sequence
)
