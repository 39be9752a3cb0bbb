"""``hvrctl recovery-points ...`` and ``hvrctl failover ...``: recovery history and test failover, on the
replica server (through the listener's admin socket)."""

from __future__ import annotations

from hvr_common.pure.errors import UsageError
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, kv, table


def register(sub, common) -> None:
    rp = sub.add_parser("recovery-points", parents=[common], help="recovery points of a replica VM",
                        description="Recovery points kept on this replica server (run it there).")
    rsub = rp.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = rsub.add_parser("list", parents=[common], help="list a replica VM's recovery points",
                        description="Each point: its id (for --recovery-point), the time its cycle was cut on the "
                                    "primary, its sequence, crash or application consistency, and the space its "
                                    "undo data takes. The last one is the latest point.")
    p.add_argument("name", metavar="NAME", help="the replica VM")
    p.set_defaults(func=cmd_points_list)
    p = rsub.add_parser("release", parents=[common], help="release a kept-aside recovery point",
                        description="A point labelled kept-aside (an adopted old primary's own state, kept before "
                                    "reverse replication overwrote it) is pinned: retention never drops it. Once "
                                    "its data is saved or not needed, release it: retention then drops it like "
                                    "any other point (at once when nothing keeps it).",
                        epilog="example: hvrctl recovery-points release web01 3")
    p.add_argument("name", metavar="NAME", help="the replica VM")
    p.add_argument("point", metavar="ID", type=int, help="the kept-aside point's id (hvrctl recovery-points list)")
    p.set_defaults(func=cmd_points_release)

    fo = sub.add_parser("failover", parents=[common], help="failover of a replica VM (Start/Stop-VMFailover)",
                        description="Failover operations on the replica server. Today: test failover (--as-test), "
                                    "which serves a recovery point as the VM 'NAME - Test' while replication goes "
                                    "on.")
    fsub = fo.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = fsub.add_parser("start", parents=[common], help="start a test failover (--as-test)",
                        description="Serve the chosen recovery point (default: the latest) as the test VM "
                                    "'NAME - Test': each disk an nbd+unix:// URI on the listener's NBD socket, "
                                    "writable through a throw-away overlay. Takes no copy of any disk; "
                                    "replication and apply go on.")
    p.add_argument("name", metavar="NAME", help="the replica VM")
    p.add_argument("--as-test", action="store_true", help="a test failover (required)")
    p.add_argument("--recovery-point", type=int, metavar="ID", help="the point to test (hvrctl recovery-points list)")
    p.set_defaults(func=cmd_failover_start)
    p = fsub.add_parser("stop", parents=[common], help="stop a test failover (--as-test)",
                        description="Delete the test VM 'NAME - Test' and everything written to it; its NBD "
                                    "connections are closed.")
    p.add_argument("name", metavar="NAME", help="the replica VM")
    p.add_argument("--as-test", action="store_true", help="the test failover (required)")
    p.set_defaults(func=cmd_failover_stop)


def _client(args) -> AdminClient:
    return AdminClient(args.listener_socket, "hvr-listener")


def _require_as_test(args) -> None:
    if not args.as_test:
        raise UsageError("only test failover (--as-test) is available on this replica server",
                         hint=f"hvrctl failover {args.verb} {args.name} --as-test")


def cmd_points_list(args) -> int:
    points = _client(args).request("GET", f"/v1/replicas/{args.name}/recovery-points")
    if args.output == "json":
        emit_json(points)
        return 0
    rows = [{"id": p["id"], "time": p["time"], "sequence": p["sequence"], "consistency": p["consistency"],
             "size": human_bytes(p["size_bytes"]),
             "note": ", ".join(n for n in ("latest" if p["latest"] else "",
                                            "test failover" if p["test_failover"] else "", p.get("label") or "")
                               if n)}
            for p in points]
    print(table(rows, [("ID", "id"), ("TIME", "time"), ("SEQUENCE", "sequence"), ("CONSISTENCY", "consistency"),
                       ("SIZE", "size"), ("", "note")]))
    return 0


def cmd_points_release(args) -> int:
    result = _client(args).request("POST", f"/v1/replicas/{args.name}/recovery-points/{args.point}/release")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"recovery point {result['released']} of {result['name']} released"
              + (" and dropped" if result["points_dropped"] else "; retention drops it when nothing keeps it"))
    return 0


def cmd_failover_start(args) -> int:
    _require_as_test(args)
    body = {"recovery_point": args.recovery_point} if args.recovery_point is not None else {}
    view = _client(args).request("POST", f"/v1/replicas/{args.name}/test-failover", body)
    if args.output == "json":
        emit_json(view)
        return 0
    point = view["recovery_point"]
    print(kv([("test VM", view["test_vm"]), ("recovery point", point["id"]), ("sequence", point["sequence"]),
              ("consistency", point["consistency"])]))
    print()
    print(table(view["disks"], [("DISK", "disk"), ("URI", "uri")]))
    print(f"\nattach these to a VM (e.g. qemu -drive file=URI,format=raw); stop with: "
          f"hvrctl failover stop {args.name} --as-test")
    return 0


def cmd_failover_stop(args) -> int:
    _require_as_test(args)
    result = _client(args).request("DELETE", f"/v1/replicas/{args.name}/test-failover")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"stopped test failover {result['test_vm']}: {human_bytes(result['deleted_bytes'])} written by it "
              f"deleted")
    return 0
