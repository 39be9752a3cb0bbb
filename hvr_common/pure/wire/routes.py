"""Paths, headers and content types of the replication API (``/v1``).

Each route has a template (the form the listener's router takes, with
``{placeholders}``) and a builder that fills it in (what the agent requests
and signs: the signature covers the path with its query, exactly as built
here).
"""

from __future__ import annotations

import uuid

PREFIX = "/v1"

# --- route templates (the listener's router) ------------------------------------------
SERVER = f"{PREFIX}/server"
REPLICA = f"{PREFIX}/replicas/{{vm_id}}"
INITIAL_WINDOW = f"{PREFIX}/replicas/{{vm_id}}/initial/{{disk_id}}"  # query: offset=A&end=B
INITIAL_COMPLETE = f"{PREFIX}/replicas/{{vm_id}}/initial/complete"
CYCLE = f"{PREFIX}/replicas/{{vm_id}}/cycles/{{sequence}}"  # query: consistency=application (else crash)
CYCLE_STREAM = f"{PREFIX}/replicas/{{vm_id}}/cycles/{{sequence}}/stream"  # streamed form: the chunked body
CYCLE_COMMIT = f"{PREFIX}/replicas/{{vm_id}}/cycles/{{sequence}}/commit"  # its digest; query: consistency
REPLICA_SETTINGS = f"{PREFIX}/replicas/{{vm_id}}/settings"
DIGESTS = f"{PREFIX}/replicas/{{vm_id}}/digests/{{disk_id}}"  # POST {"level": L, "indices": [...]}
RESYNC_COMPLETE = f"{PREFIX}/replicas/{{vm_id}}/resync/complete"  # POST {"generation", "next_sequence"}
HEARTBEAT = "/v1/replicas/{vm_id}/heartbeat"

# --- headers --------------------------------------------------------------------------
AUTHORIZATION_HEADER = "Authorization"
CONTENT_DIGEST_HEADER = "X-Hvr-Content-SHA256"  # lowercase hex SHA-256 of the body
STREAMED_DIGEST = "0" * 64  # the digest header of a streamed body: its digest comes with the commit request
GENERATION_HEADER = "X-Hvr-Generation"  # decimal generation of initial windows and cycles
APPLIED_SEQUENCE_HEADER = "X-Hvr-Applied-Sequence"  # the replica's last applied cycle when digests were read

# --- content types --------------------------------------------------------------------
JSON_CONTENT_TYPE = "application/json"
BUNDLE_CONTENT_TYPE = "application/x-hvr-bundle"
DIGESTS_CONTENT_TYPE = "application/x-hvr-digests"  # 32-byte blake3 digests, concatenated


# --- builders (the agent's side) ------------------------------------------------------
def server_path() -> str:
    return SERVER


def replica_path(vm_id: uuid.UUID) -> str:
    return REPLICA.format(vm_id=vm_id)


def initial_window_path(vm_id: uuid.UUID, disk_id: uuid.UUID, offset: int, end: int) -> str:
    return INITIAL_WINDOW.format(vm_id=vm_id, disk_id=disk_id) + f"?offset={offset}&end={end}"


def initial_complete_path(vm_id: uuid.UUID) -> str:
    return INITIAL_COMPLETE.format(vm_id=vm_id)


def cycle_path(vm_id: uuid.UUID, sequence: int, consistency: str = "crash") -> str:
    """A cycle's upload; an application-consistent one says so in the query (crash is the default)."""
    path = CYCLE.format(vm_id=vm_id, sequence=sequence)
    return path if consistency == "crash" else f"{path}?consistency={consistency}"


def cycle_stream_path(vm_id: uuid.UUID, sequence: int) -> str:
    return CYCLE_STREAM.format(vm_id=vm_id, sequence=sequence)


def cycle_commit_path(vm_id: uuid.UUID, sequence: int, consistency: str = "crash") -> str:
    path = CYCLE_COMMIT.format(vm_id=vm_id, sequence=sequence)
    return path if consistency == "crash" else f"{path}?consistency={consistency}"


def replica_settings_path(vm_id: uuid.UUID) -> str:
    return REPLICA_SETTINGS.format(vm_id=vm_id)


def digests_path(vm_id: uuid.UUID, disk_id: uuid.UUID) -> str:
    return DIGESTS.format(vm_id=vm_id, disk_id=disk_id)


def resync_complete_path(vm_id: uuid.UUID) -> str:
    return RESYNC_COMPLETE.format(vm_id=vm_id)


def heartbeat_path(vm_id: uuid.UUID) -> str:
    return HEARTBEAT.format(vm_id=vm_id)
