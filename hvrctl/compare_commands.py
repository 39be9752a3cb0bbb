"""``vm resync`` (Resume-VMReplication -Resynchronize) and ``vm verify``: the compare engine's verbs."""

from __future__ import annotations

import argparse
import threading
import time

from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes
from hvrctl.progress import progress_bar
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
                    "Exit code 1 when differences were found. A progress bar on stderr follows the compare "
                    "(none with -o json).",
        epilog="examples:\n  hvrctl vm verify web01\n  hvrctl vm verify web01 --repair -o json")
    p.add_argument("name")
    p.add_argument("--repair", action="store_true", help="send the differing ranges with the next cycle")
    p.set_defaults(func=cmd_verify)


def cmd_resync(args) -> int:
    client = AdminClient(args.agent_socket, "hvr-agent")
    body = {"cancel": True} if args.cancel else ({"at_ns": args.at} if args.at is not None else {})
    status = client.request("POST", f"/v1/vms/{args.name}/replication/resync", body)
    if args.wait and not args.cancel:
        status = _wait(client, args.name, args.output)
    if args.output == "json":
        emit_json(status)
    else:
        print(f"replication of VM {args.name}: {status['state']}")
        _print_resync(status.get("resync"))
    return 0


def _wait(client: AdminClient, name: str, output: str) -> dict:
    with progress_bar(f"resync {name}", None, output=output) as bar:
        while True:
            status = client.request("GET", f"/v1/replication/{name}")
            state = status["state"]
            resync = status.get("resync") or {}
            if resync.get("running"):
                total = resync.get("total_bytes") or 1
                bar.update(total * (resync.get("percent") or 0) / 100, total=total,
                           description=f"resync {name} ({state}, {human_bytes(resync.get('sent_bytes'))} sent)")
            else:
                bar.update(bar.completed, description=f"resync {name} ({state})")
            if state == "Replicating" and not resync.get("running"):
                bar.update(bar.total or 1, total=bar.total or 1)
                return status
            if state in ("Error", "ResynchronizeSuspended") or (state == "WaitingForStartResynchronize"
                                                                 and status.get("state_detail", "").startswith(
                                                                     "resynchronization cancelled")):
                return status
            time.sleep(POLL_S)  # polling the agent's status: the wait has no event to block on


def _verify_following(client: AdminClient, poller: AdminClient, args, bar) -> dict:
    """The verify request (it answers when the compare is done) in a thread; meanwhile the bar follows the
    progress the agent's status reports."""
    answer: dict = {}

    def run() -> None:
        try:
            answer["result"] = client.request("POST", f"/v1/vms/{args.name}/replication/verify",
                                              {"repair": args.repair})
        except BaseException as exc:  # handed to the main thread, raised there
            answer["error"] = exc

    worker = threading.Thread(target=run, name="verify", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_S)
        if worker.is_alive() and args.output != "json":
            running = (poller.request("GET", f"/v1/replication/{args.name}").get("verify") or {})
            if running.get("running") and running.get("total_bytes"):
                total = running["total_bytes"]
                bar.update(total * (running.get("percent") or 0) / 100, total=total)
    if "error" in answer:
        raise answer["error"]
    return answer["result"]


def _print_resync(resync: dict | None) -> None:
    if not resync:
        return
    print(f"  compared {human_bytes(resync.get('compared_bytes'))} of {human_bytes(resync.get('total_bytes'))}, "
          f"{human_bytes(resync.get('differing_bytes'))} differing, {human_bytes(resync.get('sent_bytes'))} sent"
          + (f", ETA {resync['eta_s']} s" if resync.get("running") and resync.get("eta_s") is not None else ""))


def cmd_verify(args) -> int:
    client = AdminClient(args.agent_socket, "hvr-agent", timeout_s=VERIFY_TIMEOUT_S)
    with progress_bar(f"verify {args.name}", None, output=args.output) as bar:
        result = _verify_following(client, AdminClient(args.agent_socket, "hvr-agent"), args, bar)
        bar.update(result["compared_bytes"], total=result["compared_bytes"])  # done
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
