"""``hvrctl hrl ...``: inspecting and replaying HRL log files (operators, forensics)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from hvr_common.pure.errors import UsageError
from hvr_common.pure.extents import coalesce, total_bytes
from hvr_common.pure.hrl import HrlHeader, LogSummary, RecordKind
from hvrctl.output import emit_json, human_bytes, kv, table


def register(sub, common) -> None:
    hrl = sub.add_parser("hrl", parents=[common], help="inspect and replay HRL log files",
                         description="Work on HRL (replica log) files directly, without a daemon.")
    hsub = hrl.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = hsub.add_parser("inspect", parents=[common], help="show a log's identity, state and contents",
                        description="Validate an HRL file and show its header, whether it was cleanly "
                                    "closed, its record counts and what coalescing would ship. Exits 65 "
                                    "if the file is not an HRL log or its header is corrupt.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--records", action="store_true", help="also list every record")
    p.set_defaults(func=cmd_inspect)

    p = hsub.add_parser("apply", parents=[common], help="replay a log onto a raw image",
                        description="Apply a log's records in order onto IMAGE (which must be the same size "
                                    "as the disk the log describes). The whole log is validated first: a "
                                    "log that is not cleanly closed is refused unless --allow-torn, and a "
                                    "refused log changes nothing.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--allow-torn", action="store_true",
                   help="apply the valid prefix of a log that was left open by a crash")
    p.set_defaults(func=cmd_apply)


def _header_dict(h: HrlHeader) -> dict:
    return {"vm_id": str(h.vm_id), "disk_id": str(h.disk_id), "generation": h.generation,
            "sequence": h.sequence, "disk_size": h.disk_size, "created_ns": h.created_ns}


def _summary_dict(s: LogSummary) -> dict:
    return {"clean": s.clean, "record_count": s.record_count, "write_bytes": s.write_bytes,
            "valid_length": s.valid_length, "torn_bytes": s.torn_bytes, "closed_ns": s.closed_ns,
            "reason": s.reason}


def _time(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat(timespec="milliseconds")


def _check_log_file(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not an HRL log", hint=f"name a log file, e.g. {path}/DISK.img.0000000001.hrl")
    if not path.exists():
        raise UsageError(f"{path} does not exist")


def cmd_inspect(args) -> int:
    from hvr_common.shell.hrl_file import scan_hrl_file

    _check_log_file(args.file)
    header, recs, summary = scan_hrl_file(args.file)
    counts = {k.name: sum(1 for r in recs if r.kind == k) for k in (RecordKind.WRITE, RecordKind.TRIM, RecordKind.ZERO)}
    records = [{"kind": r.kind.name, "offset": r.offset, "length": r.length, "flags": r.flags,
                "position": r.position} for r in recs] if args.records else []
    extents = coalesce(recs)
    shipped = total_bytes(extents)
    result = {"path": str(args.file), "header": _header_dict(header), "summary": _summary_dict(summary),
              "records_by_kind": counts, "coalesced_extents": len(extents), "coalesced_write_bytes": shipped}
    if args.records:
        result["records"] = records
    if args.output == "json":
        emit_json(result)
        return 0
    state = "cleanly closed" if summary.clean else f"OPEN or torn ({summary.reason or 'no END record'})"
    print(kv([
        ("file", args.file), ("state", state), ("vm id", header.vm_id), ("disk id", header.disk_id),
        ("generation", header.generation), ("sequence", header.sequence),
        ("disk size", f"{header.disk_size} ({human_bytes(header.disk_size)})"),
        ("created", _time(header.created_ns)), ("closed", _time(summary.closed_ns)),
        ("records", f"{summary.record_count} (write {counts['WRITE']}, trim {counts['TRIM']}, "
                    f"zero {counts['ZERO']})"),
        ("written bytes", f"{summary.write_bytes} ({human_bytes(summary.write_bytes)})"),
        ("after coalescing", f"{len(extents)} extents, {shipped} bytes of data ({human_bytes(shipped)})"),
        ("valid length", summary.valid_length), ("torn tail bytes", summary.torn_bytes),
    ]))
    if args.records:
        print()
        print(table(records, [("POSITION", "position"), ("KIND", "kind"), ("OFFSET", "offset"),
                              ("LENGTH", "length"), ("FLAGS", "flags")]))
    return 0


def cmd_apply(args) -> int:
    from hvr_common.shell.hrl_file import replay

    _check_log_file(args.file)
    summary = replay(args.file, args.image, require_clean=not args.allow_torn)
    if args.output == "json":
        emit_json({"path": str(args.file), "image": str(args.image), "summary": _summary_dict(summary)})
    else:
        print(f"applied {summary.record_count} records ({human_bytes(summary.write_bytes)} written) "
              f"from {args.file} to {args.image}")
        if not summary.clean:
            print(f"note: the log was not cleanly closed ({summary.reason}); its valid prefix was applied")
    return 0
