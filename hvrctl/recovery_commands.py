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


def _client(args) -> AdminClient:
    return AdminClient(args.listener_socket, "hvr-listener")


def cmd_points_list(args) -> int:
    points = _client(args).request("GET", f"/v1/replicas/{args.name}/recovery-points")
    if args.output == "json":
        emit_json(points)
        return 0
    rows = [{"id": p["id"], "time": p["time"], "sequence": p["sequence"], "consistency": p["consistency"],
             "size": human_bytes(p["size_bytes"]),
             "note": "latest" if p["latest"] else ("test failover" if p["test_failover"] else "")}
            for p in points]
    print(table(rows, [("ID", "id"), ("TIME", "time"), ("SEQUENCE", "sequence"), ("CONSISTENCY", "consistency"),
                       ("SIZE", "size"), ("", "note")]))
    return 0
