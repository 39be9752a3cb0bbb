"""The transfer settings flags of ``hvrctl server get|set``: bandwidth, its schedule, parallel transfers.

``--bandwidth``, ``--bandwidth-schedule``, ``--max-transfers`` and
``--reset-transfers`` are the primary's (hvr-agent's admin API,
``/v1/settings``); ``--max-applies`` is the replica server's (hvr-listener,
``PATCH /v1/server``, with the other server settings).  The primary's and the
replica server's settings live on different hosts, so one command changes
one or the other, never both.
"""

from __future__ import annotations

import argparse

from hvr_common.pure.bandwidth import parse_schedule_text
from hvr_common.pure.errors import UsageError
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, kv

SET_EPILOG = """examples:
  on a primary (hvr-agent):
    hvrctl server set --bandwidth 50MiB/s --bandwidth-schedule 08:00-18:00=10MiB/s,22:00-06:00=unlimited
    hvrctl server set --max-transfers 5
    hvrctl server set --reset-transfers          # agent.toml's settings again
  on either (every daemon of this host that answers):
    hvrctl server set --monitoring-interval 12h --monitoring-start 09:00
    hvrctl server set --latency-limit 10m       # health Warning above 10 minutes on average
  on a replica server (hvr-listener):
    hvrctl server set --enabled true --max-applies 4
    hvrctl server set --enabled true --allow-any true
    hvrctl server set --auth token,certificate --cert /etc/hvr/tls/replica1.pem \\
        --cert-key /etc/hvr/tls/replica1-key.pem --ca /etc/hvr/tls/ca.pem
"""


def add_set_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = SET_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("primary (hvr-agent) transfer settings")
    g.add_argument("--bandwidth", metavar="RATE",
                   help="cap on the agent's uploads, all VMs together, e.g. 50MiB/s, 800KB/s, or unlimited")
    g.add_argument("--bandwidth-schedule", metavar="START-END=RATE[,...]",
                   help="caps for windows of the day (local time), e.g. 08:00-18:00=10MiB/s; "
                        "'none' removes every window")
    g.add_argument("--max-transfers", type=int, metavar="N",
                   help="VMs uploading at once (MaximumActiveTransfers, default 3)")
    g.add_argument("--reset-transfers", action="store_true",
                   help="forget the settings made with server set: agent.toml's apply again")
    r = p.add_argument_group("replica server (hvr-listener) parallelism")
    r.add_argument("--max-applies", type=int, metavar="N", help="replicas applying cycles at once")


def add_get_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", action="store_true",
                   help="show this primary's transfer settings (hvr-agent) instead of the replica server's")
    p.epilog = "examples:\n  hvrctl server get\n  hvrctl server get --agent -o json\n"
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def agent_changes(args) -> dict | None:
    """The primary's changes given on the command line; None when none was given."""
    changes: dict = {}
    if args.bandwidth is not None:
        changes["bandwidth_limit"] = args.bandwidth
    if args.bandwidth_schedule is not None:
        try:
            changes["bandwidth_schedule"] = parse_schedule_text(args.bandwidth_schedule)
        except ValueError as exc:
            raise UsageError(f"--bandwidth-schedule: {exc}") from None
    if args.max_transfers is not None:
        changes["max_active_transfers"] = args.max_transfers
    if not changes and not args.reset_transfers:
        return None
    if args.reset_transfers and changes:
        raise UsageError("--reset-transfers goes alone", hint="reset first, then set what should differ")
    return changes


def cmd_agent_set(args, changes: dict) -> int:
    client = AdminClient(args.agent_socket, "hvr-agent")
    view = client.request("DELETE", "/v1/settings") if not changes else client.request("PATCH", "/v1/settings",
                                                                                      changes)
    return show(args, view)


def cmd_agent_get(args) -> int:
    return show(args, AdminClient(args.agent_socket, "hvr-agent").request("GET", "/v1/settings"))


def show(args, view: dict) -> int:
    if args.output == "json":
        emit_json(view)
        return 0
    windows = ", ".join(f"{w['start']}-{w['end']}={w['limit']}" for w in view["bandwidth_schedule"]) or "none"
    print(kv([("bandwidth limit", view["bandwidth_limit"]), ("bandwidth schedule", windows),
              ("bandwidth now", view["bandwidth_now"]), ("max active transfers", view["max_active_transfers"]),
              ("active transfers", view["active_transfers"]), ("waiting transfers", view["waiting_transfers"]),
              ("set by operator", ", ".join(view["set_by_operator"]) or "none (agent.toml)")]))
    return 0
