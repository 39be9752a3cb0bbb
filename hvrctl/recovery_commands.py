"""``hvrctl recovery-points ...``: the recovery history on the replica server (through the listener's admin
socket).  ``hvrctl failover ...`` is :mod:`hvrctl.failover_commands`."""

from __future__ import annotations

from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, table


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


def _client(args) -> AdminClient:
    return AdminClient(args.listener_socket, "hvr-listener")


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
