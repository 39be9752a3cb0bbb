"""``hvrctl vm ...``: protected VMs on the agent."""

from __future__ import annotations

from hvr_common.pure.tracking_mode import DEFAULT_TRACKING, TrackingMode
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, kv, table


def register(sub, common):
    """Add ``hvrctl vm``; returns its subparsers so other modules add their verbs."""
    vm = sub.add_parser("vm", parents=[common], help="protected VMs and their disks",
                        description="Register, list and remove protected VMs on the agent.")
    vsub = vm.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = vsub.add_parser("add", parents=[common], help="export a VM's disks with change tracking",
                        description="Register a VM with the agent: each --disk image is served over NBD as "
                                    "export NAME/<image name without extension>, and every write to it is "
                                    "tracked: journaled into HRL logs next to the image (--tracking journal) "
                                    "or marked as changed blocks in memory (--tracking bitmap).")
    p.add_argument("name", metavar="NAME", help="VM name (letters, digits, '.', '_', '-')")
    p.add_argument("--disk", dest="disks", action="append", required=True, metavar="PATH",
                   help="raw image file or block device (repeat for each disk)")
    p.add_argument("--read-only", action="store_true", help="export read-only (no writes, no tracking)")
    p.add_argument("--tracking", choices=[m.value for m in TrackingMode], default=None,
                   help=f"how writes are tracked: journal (every write kept in order in HRL logs) or bitmap "
                        f"(dirty blocks, data written once; copy-before-write at cuts); "
                        f"default {DEFAULT_TRACKING.value}")
    p.epilog = ("example: hvrctl vm add web01 --disk /var/lib/vms/web01-sys.img --tracking bitmap")
    p.set_defaults(func=cmd_add)

    p = vsub.add_parser("list", parents=[common], help="list protected VMs",
                        description="List the VMs registered with the agent and their disks.")
    p.set_defaults(func=cmd_list)

    p = vsub.add_parser("remove", parents=[common], help="stop exporting a VM",
                        description="Close the VM's NBD connections, end its logs and forget it. "
                                    "Images and logs stay on disk.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_remove)

    p = vsub.add_parser("set-tracking", parents=[common], help="switch a VM's tracking mode at a cut made now",
                        description="Record the VM's new tracking mode and cut at once: the cycle the cut closes "
                                    "ships as it was tracked, writes from the cut on are tracked the new way.",
                        epilog="example: hvrctl vm set-tracking web01 bitmap")
    p.add_argument("name", metavar="NAME")
    p.add_argument("tracking", choices=[m.value for m in TrackingMode], metavar="MODE",
                   help="journal or bitmap")
    p.set_defaults(func=cmd_set_tracking)

    p = vsub.add_parser("cut", parents=[common], help="switch all of a VM's disks to new logs now",
                        description="Cut: close the active HRL log of every disk of the VM at one instant "
                                    "(crash-consistent across disks) and start the next ones. Prints the "
                                    "closed logs once they are durable.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_cut)
    return vsub


def _client(args) -> AdminClient:
    return AdminClient(args.agent_socket, "hvr-agent")


def _disk_rows(vm: dict) -> list[dict]:
    rows = []
    for d in vm["disks"]:
        rows.append({"vm": vm["name"], "disk": d["name"], "export": d["export"] or "UNAVAILABLE",
                     "size": human_bytes(d["size_bytes"]), "mode": "ro" if d["read_only"] else "rw",
                     "tracking": vm.get("tracking"), "seq": d.get("sequence"), "path": d["path"]})
    return rows


_DISK_COLUMNS = [("VM", "vm"), ("DISK", "disk"), ("EXPORT", "export"), ("SIZE", "size"), ("MODE", "mode"),
                 ("TRACKING", "tracking"), ("SEQ", "seq"), ("IMAGE", "path")]


def cmd_add(args) -> int:
    body = {"name": args.name, "disks": args.disks, "read_only": args.read_only}
    if args.tracking is not None:
        body["tracking"] = args.tracking
    vm = _client(args).request("POST", "/v1/vms", body)
    if args.output == "json":
        emit_json(vm)
    else:
        print(table(_disk_rows(vm), _DISK_COLUMNS))
    return 0


def cmd_list(args) -> int:
    vms = _client(args).request("GET", "/v1/vms")
    if args.output == "json":
        emit_json(vms)
    elif not vms:
        print("no VMs registered (add one with: hvrctl vm add NAME --disk PATH)")
    else:
        print(table([r for vm in vms for r in _disk_rows(vm)], _DISK_COLUMNS))
        for vm in vms:
            if vm.get("error"):
                print(f"\n{vm['name']} is unavailable: {vm['error']}\n  fix it and restart the agent, "
                      f"or unregister it: hvrctl vm remove {vm['name']}")
    return 0


def cmd_remove(args) -> int:
    result = _client(args).request("DELETE", f"/v1/vms/{args.name}")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"removed VM {args.name}")
    return 0


def cmd_set_tracking(args) -> int:
    vm = _client(args).request("PATCH", f"/v1/vms/{args.name}", {"tracking": args.tracking})
    if args.output == "json":
        emit_json(vm)
    else:
        print(f"VM {vm['name']} tracks by {vm['tracking']} from sequence {vm['sequence']} on")
    return 0


def cmd_cut(args) -> int:
    result = _client(args).request("POST", f"/v1/vms/{args.name}/cut")
    if args.output == "json":
        emit_json(result)
        return 0
    rows = [dict(c, bytes=human_bytes(c["write_bytes"])) for c in result["logs"]]
    print(table(rows, [("DISK", "disk"), ("SEQ", "sequence"), ("RECORDS", "record_count"),
                       ("WRITTEN", "bytes"), ("LOG", "path")]))
    print(kv([("next sequence", result["sequence"])]))
    return 0
