"""``hvrctl vm set NAME --reverse ...`` (Set-VMReplication -Reverse): replicate a failed-over VM back.

On the new primary (the host whose agent serves the VM after a completed
failover): replication is enabled towards the old primary's listener with
the VM's generation, and the adopted copy there is brought in sync by the
compare engine (only the differing blocks travel, never a whole disk).  The
old primary's listener must hold that copy first: ``hvrctl replica adopt``
there.  A failover still waiting completion (the planned runbook: prepare,
fail over, reverse) is completed first, as Set-VMReplication -Reverse does:
the local listener's ``failover complete``, then the agent's.  Safe to repeat.
"""

from __future__ import annotations

import argparse

from hvr_common.pure.schedule import FREQUENCIES_S
from hvrctl import credential_flags, replication_settings
from hvrctl.client import AdminClient
from hvrctl.output import emit_json

EXAMPLE = """examples:
  hvrctl vm set web1 --recovery-history 4 --fine-window 30
  reverse replication, on the new primary after the failover (completed first if it waits completion;
  the old primary's listener adopted its copy first: hvrctl replica adopt NAME --from-agent there):
  hvrctl vm set web1 --reverse --replica-server oldprimary.example.com --port 8443 --key /etc/hvr/keys/b.key
  hvrctl vm set web1 --reverse --replica-server oldprimary.example.com --port 8443 --auth certificate \\
      --cert /etc/hvr/tls/b.pem --cert-key /etc/hvr/tls/b-key.pem --ca /etc/hvr/tls/ca.pem -o json
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reverse replication (Set-VMReplication -Reverse)")
    g.add_argument("--reverse", action="store_true",
                   help="replicate this failed-over VM back to the old primary (needs --replica-server, --port "
                        "and the credentials of vm enable)")
    g.add_argument("--replica-server", metavar="HOST", help="--reverse: the old primary's hvr-listener host")
    g.add_argument("--port", type=int, metavar="N", help="--reverse: its TCP port")
    g.add_argument("--frequency", type=int, choices=FREQUENCIES_S, default=300,
                   metavar="|".join(map(str, FREQUENCIES_S)), help="--reverse: replication interval (default 300)")
    credential_flags.add_flags(g)


def run(p: argparse.ArgumentParser, args: argparse.Namespace, client, print_detail) -> int:
    if not args.replica_server or not args.port:
        p.error("--reverse needs --replica-server HOST and --port N")
    body = {"replica_server": args.replica_server, "port": args.port, "frequency_s": args.frequency,
            "compression": True, **credential_flags.credentials_of(args),
            **replication_settings.settings_of(args)}
    agent = client
    completed = None
    if agent.request("GET", f"/v1/vms/{args.name}").get("failover") == "waiting_completion":
        completed = AdminClient(args.listener_socket, "hvr-listener").request(
            "POST", f"/v1/replicas/{args.name}/failover/complete")
        agent.request("POST", f"/v1/vms/{args.name}/failover/serve/complete", {})
    result = agent.request("POST", f"/v1/vms/{args.name}/failover/reverse", body)
    if completed is not None:
        result = dict(result, failover_completed=completed)
    if args.output == "json":
        emit_json(result)
    else:
        print_detail(result)
        if completed is not None:
            print(f"\nthe failover of {args.name} was completed first (its other recovery points removed)")
        print(f"\nthe copy on {args.replica_server} is compared; hvrctl vm get {args.name} shows the progress")
    return 0
