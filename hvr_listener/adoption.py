"""Adopting an existing copy as a replica (Enable-VMReplication -AsReplica): ``hvrctl replica adopt``.

The operator of the replica server names a copy already there (a restored
backup, an exported VM, an old replica) as the images of the primary's VM
``vm_id``: ``<storage>/<name>/adopted.json`` is written durably (the
replica itself, once enabled, lives in ``<storage>/<vm_id>/`` like any other), holding the
VM id and each disk's path and size (and its disk id when known), in the primary's disk order,
and ``keep_aside``: whether the copy's own state is kept as a recovery point
before the first difference overwrites it (an old primary's images,
``hvrctl replica adopt --from-agent``; :mod:`hvr_listener.kept_aside`).  Nothing
else changes.  When that primary enables replication of the VM
(``PUT /v1/replicas/{vm_id}``), :mod:`hvr_listener.enablement` takes the
adopted images instead of creating empty ones, if the VM id, the disk count
and every disk's size match; otherwise the enabling is refused
(409 ``adopt_mismatch``) and nothing changes.  The adopted replica holds every
disk to its end (no initial window is needed); the primary then compares
(``docs/resync.md``) instead of copying.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

from hvr_common.pure.errors import ConflictError, UsageError
from hvr_common.pure.names import check_name
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.files import fsync_dir, write_file_durably

MARKER = "adopted.json"


def _size(path: Path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"disk image {path} does not exist") from None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as fh:
            return fh.seek(0, os.SEEK_END)
    raise UsageError(f"{path} is neither a file nor a block device")


def adopt(storage: Path, taken: set[str], name: str, vm_id: uuid.UUID, disks: list[Path], *,
          keep_aside: bool = False, disk_ids: list[uuid.UUID] | None = None) -> dict:
    """Record the adoption (blocking).  ``taken``: names and VM ids of the replicas that exist.
    Adopting the same name again before it is enabled replaces the record (a repeated command)."""
    check_name("VM", name)
    if not disks:
        raise UsageError("name at least one disk image (--disk PATH)")
    if name in taken or str(vm_id) in taken:
        raise ConflictError(f"a replica of VM {name!r} ({vm_id}) exists on this server already",
                            hint="hvrctl replica remove NAME first, if the copy should replace it")
    paths = [p.resolve() for p in disks]
    if len(set(paths)) != len(paths):
        raise UsageError("a disk image is named twice")
    if disk_ids is not None and len(disk_ids) != len(paths):
        raise UsageError(f"{len(disk_ids)} disk id(s) for {len(paths)} disk(s)")
    entries = [{"path": str(p), "size_bytes": _size(p)} for p in paths]
    for entry, disk_id in zip(entries, disk_ids or [], strict=False):
        entry["disk_id"] = str(disk_id)
    vm_dir = storage / name
    if vm_dir.exists() and any(p.name != MARKER for p in vm_dir.iterdir()):
        raise ConflictError(f"replica storage {vm_dir} is already in use",
                            hint="move the old files away or adopt under another VM name")
    vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"vm_id": str(vm_id), "name": name, "disks": entries, "keep_aside": keep_aside}
    write_file_durably(vm_dir / MARKER, json.dumps(record, indent=1).encode())
    fsync_dir(storage)
    return record


def adoption_record(storage: Path, name: str) -> dict | None:
    """The adoption recorded under ``name`` and not yet taken by an enabling, or None (blocking)."""
    check_name("VM", name)
    try:
        return json.loads((storage / name / MARKER).read_bytes())
    except FileNotFoundError:
        return None


def keeps_aside(vm_dir: Path) -> bool:
    """Whether the copy adopted under ``vm_dir`` keeps its own state as a recovery point (blocking)."""
    try:
        return bool(json.loads((vm_dir / MARKER).read_bytes()).get("keep_aside"))
    except FileNotFoundError:
        return False


def adopted_images(vm_dir: Path, vm_id: uuid.UUID, disks: list[tuple[uuid.UUID, str, int]]) -> list[Path] | None:
    """The adopted images for an enabling of ``vm_id`` with ``disks`` (id, name, size), in order; None if
    nothing was adopted under this name; 409 ``adopt_mismatch`` if the adopted copy does not fit (blocking)."""
    try:
        record = json.loads((vm_dir / MARKER).read_bytes())
    except FileNotFoundError:
        return None
    adopted = record.get("disks") or []
    if record.get("vm_id") != str(vm_id):
        raise error("adopt_mismatch", f"the copy adopted as {vm_dir.name} belongs to VM {record.get('vm_id')}, "
                    f"not to {vm_id}", hint="on the replica server: hvrctl replica adopt again with the "
                                            "primary's VM id (hvrctl vm get NAME on the primary)")
    if len(adopted) != len(disks):
        raise error("adopt_mismatch", f"the copy adopted as {vm_dir.name} has {len(adopted)} disk(s); the "
                    f"primary's VM has {len(disks)}")
    paths = []
    for (disk_id, dname, size), entry in zip(disks, adopted, strict=True):
        path = Path(entry["path"])
        if entry.get("disk_id", str(disk_id)) != str(disk_id):
            raise error("adopt_mismatch", f"adopted image {path} is disk {entry['disk_id']}; the primary's disk "
                        f"{dname} is {disk_id}", hint="adopt a copy of the same VM (disks in the primary's order)")
        actual = _size(path)
        if actual != size or entry.get("size_bytes") != size:
            raise error("adopt_mismatch", f"adopted image {path} is {actual} bytes; the primary's disk {dname} "
                        f"is {size}", hint="adopt a copy of the same VM (disks in the primary's order)")
        paths.append(path)
    return paths
