"""``replica adopt`` (Enable-VMReplication -AsReplica) on the replica server: an existing copy as a replica."""

from __future__ import annotations

import argparse
from pathlib import Path

from hvrctl.client import AdminClient
from hvrctl.output import emit_json


def register(replica_verbs, common) -> None:
    p = replica_verbs.add_parser(
        "adopt", parents=[common], help="register an existing copy as the replica of a primary's VM",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Register images already on this server (a restored backup, an exported VM, an old replica) "
                    "as the replica of the primary's VM ID, disks in the primary's order. When the primary "
                    "enables replication of that VM, the copy is used if the VM id, the disk count and every "
                    "disk's size match (else the enabling is refused), and 'hvrctl initial start NAME "
                    "--use-existing' on the primary compares instead of copying.",
        epilog="examples:\n  hvrctl replica adopt web01 --vm-id 3f0c5b1e-8d2a-4c61-9a7e-52d4e1f0a9e2 --disk /srv/restore/sys.img "
               "--disk /srv/restore/data.img")
    p.add_argument("name", metavar="NAME", help="the VM's name (as on the primary)")
    p.add_argument("--vm-id", required=True, help="the primary VM's id (hvrctl vm get NAME on the primary)")
    p.add_argument("--disk", dest="disks", action="append", type=Path, required=True, metavar="PATH",
                   help="an image of the copy (repeat, in the primary's disk order)")
    p.set_defaults(func=cmd_adopt)


def cmd_adopt(args) -> int:
    client = AdminClient(args.listener_socket, "hvr-listener")
    record = client.request("POST", "/v1/adoptions", {"name": args.name, "vm_id": args.vm_id,
                                                      "disks": [str(d) for d in args.disks]})
    if args.output == "json":
        emit_json(record)
    else:
        print(f"copy adopted as the replica of VM {record['name']} ({record['vm_id']}): "
              f"{len(record['disks'])} disk(s); enable replication on the primary, then "
              f"'hvrctl initial start {record['name']} --use-existing'")
    return 0
