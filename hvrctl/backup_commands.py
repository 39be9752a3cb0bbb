"""``hvrctl backup ...``: backups of replica VMs, on the replica server (through the listener's admin socket).

``begin`` holds a recovery point frozen (read-only NBD exports), ``export``
writes it as sparse raw files, ``end`` releases it.  A refusal of ``begin``
is transient (exit 75) with a code that names the condition
(``backup_initial_replication``, ``backup_health_critical``...): retry later.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from hvr_common.pure.errors import UsageError
from hvr_common.shell.files import fsync_dir
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, kv, table
from hvrctl.progress import progress_bar

CHUNK_BYTES = 4 * 1024 * 1024


def register(sub, common) -> None:
    bk = sub.add_parser("backup", parents=[common], help="back up a replica VM at a recovery point",
                        description="Backups of replica VMs on this replica server (run it there): a recovery "
                                    "point held frozen while cycles keep arriving and applying.",
                        epilog="example: hvrctl backup begin web && hvrctl backup export web /backup/web && "
                               "hvrctl backup end web")
    bsub = bk.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = bsub.add_parser("begin", parents=[common], help="hold a recovery point for a backup",
                        description="Hold the chosen recovery point (default: the latest) frozen: each disk a "
                                    "read-only nbd+unix:// export on the listener's NBD socket. An "
                                    "application-consistent point gives an application-consistent backup. "
                                    "Refused at once (exit 75, transient) where consistency cannot be "
                                    "guaranteed; the error code names the condition. A backup ends with the "
                                    "listener process.",
                        epilog="example: hvrctl backup begin web --recovery-point 42 -o json")
    p.add_argument("name", metavar="NAME", help="the replica VM")
    p.add_argument("--recovery-point", type=int, metavar="ID", help="the point (hvrctl recovery-points list)")
    p.set_defaults(func=cmd_begin)
    p = bsub.add_parser("get", parents=[common], help="show the backups held",
                        description="The backup held of NAME, or every backup held on this replica server.",
                        epilog="example: hvrctl backup get web")
    p.add_argument("name", metavar="NAME", nargs="?", help="the replica VM (default: all)")
    p.set_defaults(func=cmd_get)
    p = bsub.add_parser("export", parents=[common], help="write the backup's disks as sparse raw files",
                        description="Write each disk of the held backup to DIR/DISK.raw: holes stay holes, data "
                                    "is read from the frozen point (a file is complete once renamed from "
                                    ".part).",
                        epilog="example: hvrctl backup export web /backup/web-2026-12-05")
    p.add_argument("name", metavar="NAME", help="the replica VM")
    p.add_argument("dir", metavar="DIR", type=Path, help="the folder to write into (created if missing)")
    p.set_defaults(func=cmd_export)
    p = bsub.add_parser("end", parents=[common], help="release a backup",
                        description="Withdraw the backup's exports (their NBD connections are closed) and unpin "
                                    "its recovery point, which retention may then prune.",
                        epilog="example: hvrctl backup end web")
    p.add_argument("name", metavar="NAME", help="the replica VM")
    p.set_defaults(func=cmd_end)


def _client(args) -> AdminClient:
    return AdminClient(args.listener_socket, "hvr-listener")


def _route(name: str, tail: str = "") -> str:
    return f"/v1/replicas/{quote(name, safe='')}/backup{tail}"


def _show(view: dict) -> None:
    point = view["recovery_point"]
    print(kv([("VM", view["vm"]), ("began", view["began"]), ("recovery point", point["id"]),
              ("sequence", point["sequence"]), ("point time", point["time"]), ("consistency", point["consistency"])]))
    print()
    print(table(view["disks"], [("DISK", "disk"), ("SIZE", "size_bytes"), ("URI", "uri")]))


def cmd_begin(args) -> int:
    body = {"recovery_point": args.recovery_point} if args.recovery_point is not None else {}
    view = _client(args).request("POST", _route(args.name), body)
    if args.output == "json":
        emit_json(view)
        return 0
    _show(view)
    print(f"\nread the URIs (read-only) or: hvrctl backup export {args.name} DIR; release with: "
          f"hvrctl backup end {args.name}")
    return 0


def cmd_get(args) -> int:
    client = _client(args)
    views = [client.request("GET", _route(args.name))] if args.name else client.request("GET", "/v1/backups")
    if args.output == "json":
        emit_json(views[0] if args.name else views)
        return 0
    rows = [{"vm": v["vm"], "point": v["recovery_point"]["id"], "consistency": v["recovery_point"]["consistency"],
             "began": v["began"], "disks": len(v["disks"]), "read": human_bytes(v["read_bytes"])} for v in views]
    print(table(rows, [("VM", "vm"), ("POINT", "point"), ("CONSISTENCY", "consistency"), ("BEGAN", "began"),
                       ("DISKS", "disks"), ("READ", "read")]))
    return 0


def _disk_route(name: str, disk: str) -> str:
    return _route(name, f"/disks/{quote(disk, safe='')}")


def _export_disk(client: AdminClient, name: str, disk: dict, runs: list, folder: Path, bar) -> dict:
    """Write one disk: holes stay holes (the file is truncated to size first), data runs are copied."""
    base = _disk_route(name, disk["disk"])
    final = folder / f"{disk['disk']}.raw"
    part = final.with_name(final.name + ".part")
    data_bytes = 0
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, disk["size_bytes"])  # all hole; data runs are written below
        for offset, length, is_data in runs:
            if not is_data:
                continue
            end = offset + length
            while offset < end:
                n = min(CHUNK_BYTES, end - offset)
                chunk = client.request_bytes(f"{base}/data?offset={offset}&length={n}")
                if len(chunk) != n:
                    raise UsageError(f"short read of disk {disk['disk']} at {offset}: {len(chunk)} of {n} bytes")
                if chunk.count(0) != n:  # an all-zero chunk stays a hole
                    os.pwrite(fd, chunk, offset)
                    data_bytes += n
                offset += n
                bar.advance(n)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, final)
    return {"disk": disk["disk"], "path": str(final), "size_bytes": disk["size_bytes"], "data_bytes": data_bytes}


def cmd_export(args) -> int:
    folder = args.dir
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is not a folder: the export writes one DISK.raw file per disk into a folder",
                         hint="name a folder (it is created if missing)")
    client = _client(args)
    view = client.request("GET", _route(args.name))
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    plans = []
    for disk in view["disks"]:
        runs = client.request("GET", _disk_route(args.name, disk["disk"]) + "/extents")
        total += sum(n for _, n, data in runs if data)
        plans.append((disk, runs))
    files = []
    with progress_bar(f"backup {args.name}", total, output=args.output) as bar:
        for disk, runs in plans:
            files.append(_export_disk(client, args.name, disk, runs, folder, bar))
    fsync_dir(folder)
    result = {"vm": args.name, "recovery_point": view["recovery_point"], "dir": str(folder), "files": files}
    if args.output == "json":
        emit_json(result)
    else:
        print(table([{**f, "size": human_bytes(f["size_bytes"]), "data": human_bytes(f["data_bytes"])}
                     for f in files], [("DISK", "disk"), ("FILE", "path"), ("SIZE", "size"), ("DATA", "data")]))
    return 0


def cmd_end(args) -> int:
    result = _client(args).request("DELETE", _route(args.name))
    if args.output == "json":
        emit_json(result)
    else:
        print(f"ended the backup of {result['vm']} (recovery point {result['recovery_point']}, "
              f"{human_bytes(result['read_bytes'])} read)")
    return 0
