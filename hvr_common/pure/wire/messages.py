"""The JSON bodies of the replication API, as frozen dataclasses.

Each one is built on one side and read on the other: ``to_json()`` gives the
object that travels, ``from_json(obj)`` checks a received object and refuses
bad input with a :class:`UsageError` whose message names the field (the
listener answers it as 400 ``bad_request`` and changes nothing).  The agent
builds requests from values it has already checked, so constructing a
message does not validate; reading one always does.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from hvr_common.pure.errors import UsageError
from hvr_common.pure.input_limits import MAX_INT64, is_int_in, quoted
from hvr_common.pure.names import is_name
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.schedule import FREQUENCIES_S

MAX_DISKS = 64
MAX_DISK_BYTES = 64 * 1024 ** 4


def _object(obj: Any, what: str) -> dict:
    if not isinstance(obj, dict):
        raise UsageError(f"{what} must be a JSON object")
    return obj


def _only(obj: dict, allowed: tuple[str, ...], what: str = "") -> None:
    unknown = set(obj) - set(allowed)
    if unknown:
        where = f" in {what}" if what else ""
        raise UsageError(f"unknown field(s){where}: {quoted(', '.join(sorted(map(str, unknown))))}")


def _int(obj: dict, key: str, minimum: int, field: str | None = None, *, optional: bool = False) -> int | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not is_int_in(value, minimum):
        raise UsageError(f"field {field or key!r} must be an integer from {minimum} to {MAX_INT64}"
                         + (" or null" if optional else ""))
    return value


def _name(obj: dict, key: str, field: str) -> str:
    value = obj.get(key)
    if not is_name(value):
        raise UsageError(f"field {field!r} must be a name (letters, digits, '.', '_', '-'; at most 64), "
                         f"not {quoted(value)}")
    return value


def _uuid(value: Any, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise UsageError(f"field {field!r} must be a UUID, not {quoted(value)}") from None


# --- PUT /v1/replicas/{vm_id} ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One disk of a VM being enabled: the replica creates a sparse image of this size."""

    disk_id: uuid.UUID
    name: str
    size_bytes: int

    def to_json(self) -> dict:
        return {"disk_id": str(self.disk_id), "name": self.name, "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, obj: Any, field: str = "disk") -> DiskSpec:
        d = _object(obj, f"field {field!r}")
        _only(d, ("disk_id", "name", "size_bytes"), field)
        missing = {"disk_id", "name", "size_bytes"} - set(d)
        if missing:
            raise UsageError(f"field {field!r} lacks {', '.join(sorted(missing))}")
        disk_id = _uuid(d["disk_id"], f"{field}.disk_id")
        name = _name(d, "name", f"{field}.name")
        size = d["size_bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_DISK_BYTES:
            raise UsageError(f"field '{field}.size_bytes' must be from 1 to {MAX_DISK_BYTES} bytes, not {quoted(size)}")
        return cls(disk_id, name, size)


@dataclass(frozen=True, slots=True)
class EnableRequest:
    """Enable-VMReplication: the VM's identity, settings and disks."""

    name: str
    generation: int
    frequency_s: int
    compression: bool
    disks: tuple[DiskSpec, ...]

    FIELDS = ("name", "generation", "frequency_s", "compression", "disks")

    def to_json(self) -> dict:
        return {"name": self.name, "generation": self.generation, "frequency_s": self.frequency_s,
                "compression": self.compression, "disks": [d.to_json() for d in self.disks]}

    @classmethod
    def from_json(cls, obj: Any) -> EnableRequest:
        body = _object(obj, "body")
        _only(body, cls.FIELDS)
        name = _name(body, "name", "name")
        generation = _int(body, "generation", 1)
        frequency_s = body.get("frequency_s")
        if frequency_s not in FREQUENCIES_S or isinstance(frequency_s, bool):
            raise UsageError(f"field 'frequency_s' must be one of {FREQUENCIES_S}, not {quoted(frequency_s)}")
        compression = body.get("compression", True)
        if not isinstance(compression, bool):
            raise UsageError("field 'compression' must be true or false")
        raw = body.get("disks")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_DISKS:
            raise UsageError(f"field 'disks' must list 1 to {MAX_DISKS} disks")
        disks = tuple(DiskSpec.from_json(d, f"disks[{i}]") for i, d in enumerate(raw))
        if len({d.disk_id for d in disks}) != len(disks) or len({d.name for d in disks}) != len(disks):
            raise UsageError("field 'disks': disk ids and names must be unique")
        return cls(name, generation, frequency_s, compression, disks)


# --- POST /v1/replicas/{vm_id}/initial/complete ---------------------------------------
@dataclass(frozen=True, slots=True)
class InitialCompleteRequest:
    """The end of initial replication: the replica expects cycle ``next_sequence`` next."""

    generation: int
    next_sequence: int

    def to_json(self) -> dict:
        return {"generation": self.generation, "next_sequence": self.next_sequence}

    @classmethod
    def from_json(cls, obj: Any) -> InitialCompleteRequest:
        body = _object(obj, "body")
        _only(body, ("generation", "next_sequence"))
        return cls(_int(body, "generation", 1), _int(body, "next_sequence", 1))


@dataclass(frozen=True, slots=True)
class HeartbeatRequest:
    """The primary is alive: whether its VM runs (NBD clients on its disks); the split-brain guard's input."""

    running: bool
    nbd_clients: int

    def to_json(self) -> dict:
        return {"running": self.running, "nbd_clients": self.nbd_clients}

    @classmethod
    def from_json(cls, obj: Any) -> HeartbeatRequest:
        body = _object(obj, "body")
        _only(body, ("running", "nbd_clients"))
        if not isinstance(body.get("running"), bool):
            raise UsageError("field 'running' must be true or false")
        return cls(body["running"], _int(body, "nbd_clients", 0))


# --- the answer of GET/PUT /v1/replicas/{vm_id} and of initial/complete ----------------
@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica VM as the primary sees it: a snapshot, read from the listener's record."""

    vm_id: uuid.UUID
    name: str
    state: ReplicationState
    generation: int
    next_sequence: int  # 0 until initial replication completes
    last_received_sequence: int
    last_applied_sequence: int
    initial: tuple[tuple[uuid.UUID, int], ...]  # (disk id, durable offset), in disk order
    last_replication_time_ns: int | None
    last_applied_log_time_ns: int | None

    FIELDS = ("vm_id", "name", "state", "generation", "next_sequence", "last_received_sequence",
              "last_applied_sequence", "initial", "last_replication_time_ns", "last_applied_log_time_ns")

    @classmethod
    def from_replica(cls, rep: Any) -> ReplicaView:
        """From the listener's replica record (``hvr_listener.store.Replica``)."""
        return cls(rep.vm_id, rep.name, rep.state, rep.generation, rep.next_sequence, rep.last_received_sequence,
                   rep.last_applied_sequence, tuple((d.disk_id, d.initial_offset) for d in rep.disks),
                   rep.last_replication_ns, rep.last_applied_log_ns)

    def to_json(self) -> dict:
        return {
            "vm_id": str(self.vm_id), "name": self.name, "state": self.state.value, "generation": self.generation,
            "next_sequence": self.next_sequence, "last_received_sequence": self.last_received_sequence,
            "last_applied_sequence": self.last_applied_sequence,
            "initial": {str(disk_id): offset for disk_id, offset in self.initial},
            "last_replication_time_ns": self.last_replication_time_ns,
            "last_applied_log_time_ns": self.last_applied_log_time_ns,
        }

    @classmethod
    def from_json(cls, obj: Any) -> ReplicaView:
        body = _object(obj, "answer")
        _only(body, cls.FIELDS)
        try:
            state = ReplicationState(body.get("state"))
        except ValueError:
            raise UsageError(f"field 'state' must be a replication state, not {quoted(body.get('state'))}") from None
        initial = body.get("initial")
        if not isinstance(initial, dict):
            raise UsageError("field 'initial' must be an object of disk id: offset")
        offsets = tuple((_uuid(k, f"initial.{k}"), _int(initial, k, 0, f"initial.{k}")) for k in initial)
        return cls(_uuid(body.get("vm_id"), "vm_id"), _name(body, "name", "name"), state,
                   _int(body, "generation", 1), _int(body, "next_sequence", 0),
                   _int(body, "last_received_sequence", 0), _int(body, "last_applied_sequence", 0), offsets,
                   _int(body, "last_replication_time_ns", 0, optional=True),
                   _int(body, "last_applied_log_time_ns", 0, optional=True))


# --- POST /v1/replicas/{vm_id}/digests/{disk_id} ---------------------------------------
MAX_DIGEST_QUERY_NODES = 8192  # hvr_common.pure.digest_tree.MAX_QUERY_NODES


@dataclass(frozen=True, slots=True)
class DigestQuery:
    """Nodes of one level of a disk's digest tree (``docs/resync.md``); ``size_bytes`` is the primary's
    disk size, so both sides cut the disk into the same tree."""

    size_bytes: int
    level: int
    indices: tuple[int, ...]
    purpose: str = "verify"  # "resync": the replica is not trusted meanwhile (no backup); "verify": read only

    def to_json(self) -> dict:
        return {"size_bytes": self.size_bytes, "level": self.level, "indices": list(self.indices),
                "purpose": self.purpose}

    @classmethod
    def from_json(cls, obj: Any) -> DigestQuery:
        body = _object(obj, "body")
        _only(body, ("size_bytes", "level", "indices", "purpose"))
        indices = body.get("indices")
        if (not isinstance(indices, list) or len(indices) > MAX_DIGEST_QUERY_NODES
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
            raise UsageError(f"field 'indices' must be a list of at most {MAX_DIGEST_QUERY_NODES} integers >= 0")
        purpose = body.get("purpose", "verify")
        if purpose not in ("resync", "verify"):
            raise UsageError("field 'purpose' must be 'resync' or 'verify'")
        return cls(_int(body, "size_bytes", 0), _int(body, "level", 0), tuple(indices), purpose)
