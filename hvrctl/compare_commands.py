"""``vm resync`` (Resume-VMReplication -Resynchronize) and ``vm verify``: the compare engine's verbs."""

from __future__ import annotations

import argparse
import sys
import time

from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes
from hvrctl.replication_commands import parse_time

POLL_S = 0.5
VERIFY_TIMEOUT_S = 24 * 3600.0  # a verify answers when it is done: hours for big disks


def register(vm_verbs, common) -> None:
    p = vm_verbs.add_parser(
        "resync", parents=[common], help="resynchronize a VM by comparing its disks with the replica",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare the VM's disks with the replica by digest tree and send only the blocks that "
                    "differ (never a full copy). The replica keeps its last applied point and its recovery "
                    "points until the cycle carrying the differences is applied. "
                    "'hvrctl vm suspend' / 'vm resume' pause and continue a running resync.",
        epilog="examples:\n  hvrctl vm resync web01 --wait\n  hvrctl vm resync web01 --at 23:00\n"
               "  hvrctl vm resync web01 --cancel")
    p.add_argument("name")
    p.add_argument("--at", metavar="TIME", type=parse_time,
                   help="start later: ISO 8601 date and time, HH:MM (next occurrence) or +N[s|m|h]")
    p.add_argument("--cancel", action="store_true", help="stop a waiting or running resync")
    p.add_argument("--wait", action="store_true", help="wait until it completes, with a progress bar on stderr")
    p.set_defaults(func=cmd_resync)

    p = vm_verbs.add_parser(
        "verify", parents=[common], help="verify the replica against the primary (changes nothing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare the replica at its latest point with the primary while both run; report the "
                    "byte ranges that differ (none expected). Ranges written since that point are skipped. "
                    "Exit code 1 when differences were found.",
        epilog="examples:\n  hvrctl vm verify web01\n  hvrctl vm verify web01 --repair -o json")
    p.add_argument("name")
    p.add_argument("--repair", action="store_true", help="send the differing ranges with the next cycle")
    p.set_defaults(func=cmd_verify)


def cmd_resync(args) -> int:
    client = AdminClient(args.agent_socket, "hvr-agent")
    body = {"cancel": True} if args.cancel else ({"at_ns": args.at} if args.at is not None else {})
    status = client.request("POST", f"/v1/vms/{args.name}/replication/resync", body)
    if args.wait and not args.cancel:
        status = _wait(client, args.name)
    if args.output == "json":
        emit_json(status)
    else:
        print(f"replication of VM {args.name}: {status['state']}")
        _print_resync(status.get("resync"))
    return 0


def _wait(client: AdminClient, name: str) -> dict:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=None if sys.stderr.isatty() else _plain_console(), transient=False) as bar:
        task = bar.add_task("resync", total=None)
        while True:
            status = client.request("GET", f"/v1/replication/{name}")
            state = status["state"]
            resync = status.get("resync") or {}
            if resync.get("running"):
                total = resync.get("total_bytes") or 1
                bar.update(task, total=total, completed=int(total * (resync.get("percent") or 0) / 100),
                           description=f"{state}: {human_bytes(resync.get('sent_bytes'))} sent")
            else:
                bar.update(task, description=state)
            if state == "Replicating" and not resync.get("running"):
                bar.update(task, completed=bar.tasks[0].total or 1, total=bar.tasks[0].total or 1)
                return status
            if state in ("Error", "ResynchronizeSuspended") or (state == "WaitingForStartResynchronize"
                                                                 and status.get("state_detail", "").startswith(
                                                                     "resynchronization cancelled")):
                return status
            time.sleep(POLL_S)  # polling the agent's status: the wait has no event to block on


def _plain_console():
    from rich.console import Console
    return Console(file=sys.stderr, force_terminal=False)


def _print_resync(resync: dict | None) -> None:
    if not resync:
        return
    print(f"  compared {human_bytes(resync.get('compared_bytes'))} of {human_bytes(resync.get('total_bytes'))}, "
          f"{human_bytes(resync.get('differing_bytes'))} differing, {human_bytes(resync.get('sent_bytes'))} sent"
          + (f", ETA {resync['eta_s']} s" if resync.get("running") and resync.get("eta_s") is not None else ""))


def cmd_verify(args) -> int:
    client = AdminClient(args.agent_socket, "hvr-agent", timeout_s=VERIFY_TIMEOUT_S)
    result = client.request("POST", f"/v1/vms/{args.name}/replication/verify", {"repair": args.repair})
    if args.output == "json":
        emit_json(result)
    else:
        print(f"VM {args.name} verified at cycle {result['sequence']}: compared "
              f"{human_bytes(result['compared_bytes'])}, {human_bytes(result['differing_bytes'])} differing "
              f"({human_bytes(result['skipped_bytes'])} written since, skipped) in {result['elapsed_s']} s")
        for disk, ranges in result["disks"].items():
            for r in ranges:
                print(f"  {disk}: offset {r['offset']} length {r['length']}")
        if result["repair"] and result["repaired_bytes"]:
            print(f"  {human_bytes(result['repaired_bytes'])} re-sent with the next cycle")
    return 1 if result["differing_bytes"] and not result["repair"] else 0
