"""The JSON bodies of the replication API's requests (enable, initial complete): parsing and validation.

Each parser takes the decoded JSON object and returns plain values, or raises
:class:`UsageError` (400) naming the field at fault; nothing has changed then.
"""

from __future__ import annotations

import re
import uuid

from hvr_common.pure.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FREQUENCIES = (30, 300, 900)
MAX_DISK_BYTES = 64 * 1024 ** 4


def int_field(body: dict, key: str, minimum: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"field {key!r} must be an integer >= {minimum}")
    return value


def parse_initial_complete(body: dict) -> tuple[int, int]:
    """(generation, next_sequence) of ``POST .../initial/complete``."""
    return int_field(body, "generation", 1), int_field(body, "next_sequence", 1)


def parse_enable(body: dict) -> tuple[str, int, int, bool, list[tuple[uuid.UUID, str, int]]]:
    """(name, generation, frequency_s, compression, [(disk_id, name, size_bytes)]) of ``PUT /v1/replicas/{id}``."""
    unknown = set(body) - {"name", "generation", "frequency_s", "compression", "disks"}
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError("field 'name' must be a VM name (letters, digits, '.', '_', '-')")
    generation = int_field(body, "generation", 1)
    frequency_s = body.get("frequency_s")
    if frequency_s not in FREQUENCIES:
        raise UsageError(f"field 'frequency_s' must be one of {FREQUENCIES}")
    compression = body.get("compression", True)
    if not isinstance(compression, bool):
        raise UsageError("field 'compression' must be true or false")
    disks_raw = body.get("disks")
    if not isinstance(disks_raw, list) or not 1 <= len(disks_raw) <= 64:
        raise UsageError("field 'disks' must list 1 to 64 disks")
    disks = []
    for d in disks_raw:
        if not isinstance(d, dict) or set(d) != {"disk_id", "name", "size_bytes"}:
            raise UsageError("each disk needs exactly disk_id, name and size_bytes")
        try:
            disk_id = uuid.UUID(d["disk_id"])
        except (ValueError, TypeError, AttributeError):
            raise UsageError(f"disk_id {d.get('disk_id')!r} is not a UUID") from None
        if not isinstance(d["name"], str) or not NAME_RE.match(d["name"]):
            raise UsageError(f"disk name {d['name']!r} is not valid")
        size = d["size_bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_DISK_BYTES:
            raise UsageError(f"disk size {size!r} is not valid")
        disks.append((disk_id, d["name"], size))
    if len({d[0] for d in disks}) != len(disks) or len({d[1] for d in disks}) != len(disks):
        raise UsageError("disk ids and names must be unique")
    return name, generation, frequency_s, compression, disks
