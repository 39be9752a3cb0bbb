"""``replica adopt`` (Enable-VMReplication -AsReplica) on the replica server: an existing copy as a replica.

``--from-agent`` adopts the images of a VM the local agent serves (an old primary's, before reverse
replication): read from the agent, refused while the VM has NBD clients, recorded in the listener with
``keep_aside`` (its own state becomes a pinned recovery point before the first difference overwrites it),
then removed from the agent, its image files left in place.  The record is written before the removal, so
repeating the command after a crash between the two finishes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.wire.error_catalogue import error
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
                    "--use-existing' on the primary compares instead of copying.\n\n"
                    "--from-agent: the copy is the local agent's VM NAME (this host was its primary; the VM "
                    "failed over to the other site). Its VM id, disk ids and images are taken from the agent; "
                    "refused (adopt_busy) while the VM has NBD clients; the VM is then removed from the agent, "
                    "its image files left in place. Its own state, with any writes that never reached the new "
                    "primary, is kept as a recovery point labelled kept-aside before reverse replication "
                    "overwrites anything ('hvrctl recovery-points list NAME'; release it with "
                    "'hvrctl recovery-points release NAME ID'). Safe to repeat.",
        epilog="examples:\n  hvrctl replica adopt web01 --vm-id 3f0c5b1e-8d2a-4c61-9a7e-52d4e1f0a9e2 --disk /srv/restore/sys.img "
               "--disk /srv/restore/data.img\n"
               "  hvrctl replica adopt web01 --from-agent          # on the old primary, before 'vm set --reverse'")
    p.add_argument("name", metavar="NAME", help="the VM's name (as on the primary)")
    p.add_argument("--vm-id", help="the primary VM's id (hvrctl vm get NAME on the primary)")
    p.add_argument("--disk", dest="disks", action="append", type=Path, metavar="PATH",
                   help="an image of the copy (repeat, in the primary's disk order)")
    p.add_argument("--from-agent", action="store_true",
                   help="adopt the local agent's VM NAME (an old primary's images), keeping its state aside")
    p.add_argument("--keep-aside", action="store_true",
                   help="keep the copy's own state as a pinned recovery point before the first difference")
    p.set_defaults(func=cmd_adopt)


def cmd_adopt(args) -> int:
    listener = AdminClient(args.listener_socket, "hvr-listener")
    if args.from_agent:
        if args.vm_id or args.disks:
            raise UsageError("--from-agent takes the VM id and the disks from the local agent",
                             hint=f"hvrctl replica adopt {args.name} --from-agent")
        record = _adopt_from_agent(listener, AdminClient(args.agent_socket, "hvr-agent"), args.name)
    else:
        if not args.vm_id or not args.disks:
            raise UsageError("name the primary's VM id (--vm-id) and the copy's images (--disk PATH ...), "
                             "or adopt the local agent's VM with --from-agent")
        record = listener.request("POST", "/v1/adoptions", {"name": args.name, "vm_id": args.vm_id,
                                                            "disks": [str(d) for d in args.disks],
                                                            "keep_aside": args.keep_aside})
    if args.output == "json":
        emit_json(record)
    else:
        print(f"copy adopted as the replica of VM {record['name']} ({record['vm_id']}): "
              f"{len(record['disks'])} disk(s){', its state kept aside' if record.get('keep_aside') else ''}; "
              f"enable replication on the primary, then 'hvrctl initial start {record['name']} --use-existing' "
              f"(after a failover: 'hvrctl vm set {record['name']} --reverse ...' there)")
    return 0


def _adopt_from_agent(listener: AdminClient, agent: AdminClient, name: str) -> dict:
    """Record first, then remove from the agent: a repeat after a crash between the two finishes it."""
    try:
        vm = agent.request("GET", f"/v1/vms/{name}")
    except NotFoundError:
        vm = None
    if vm is None:
        try:
            record = listener.request("GET", f"/v1/adoptions/{name}")
        except NotFoundError:
            record = None
        if record is not None and record.get("keep_aside"):
            return dict(record, removed_from_agent=True)  # done already
        raise NotFoundError(f"the local agent has no VM named {name!r} and no copy is adopted under that name",
                            hint="hvrctl vm list shows the agent's VMs")
    clients = vm.get("nbd_clients", 0)
    if clients:
        raise error("adopt_busy", f"VM {name} has {clients} NBD client(s) on this host: it still runs here",
                    hint=f"stop the VM here (its disks detached), then hvrctl replica adopt {name} --from-agent")
    _forget_own_failover(listener, name, vm["vm_id"])
    disks = vm["disks"]
    record = listener.request("POST", "/v1/adoptions", {
        "name": name, "vm_id": vm["vm_id"], "disks": [d["path"] for d in disks],
        "disk_ids": [d["disk_id"] for d in disks], "keep_aside": True})
    agent.request("DELETE", f"/v1/vms/{name}")  # unregistered; the image files stay
    return dict(record, removed_from_agent=True)


def _forget_own_failover(listener: AdminClient, name: str, vm_id: str) -> None:
    """Failing back: this host's listener still holds the replica record of the VM it took over earlier
    (FailedOver), whose disks the agent served since.  That record is forgotten (its files stay: the
    images being adopted may be among them), so the copy can be adopted under the VM's name."""
    try:
        rep = listener.request("GET", f"/v1/replicas/{name}")
    except NotFoundError:
        return
    if rep.get("vm_id") == vm_id and rep.get("state") == "FailedOver":
        listener.request("DELETE", f"/v1/replicas/{name}")
