"""``hvrctl failover start|stop|complete``: planned, unplanned and test failover (Start/Stop/Complete-VMFailover).

The commands orchestrate the daemons of the host they run on:

* ``failover start NAME --prepare`` (on the primary): the local agent's prepare route.
* ``failover start NAME [--recovery-point ID] [--force]`` (on the replica server): the local listener
  fails over (``POST /v1/replicas/{name}/failover``), then the local agent serves the failover disks
  under NAME (``POST /v1/vms/{name}/failover/serve``).
* ``failover stop NAME``: a VM the local agent holds prepared is un-prepared; else the agent stops serving
  it (when it does) and the listener cancels the failover.
* ``failover complete NAME``: the listener completes, then the agent marks the served VM completed.
* ``--as-test``: test failover (the listener serves a point as 'NAME - Test').

Every step is safe to repeat: after a crash of either daemon, running the same command again finishes it.
"""

from __future__ import annotations

import argparse

from hvr_common.pure.errors import HvrError, UnavailableError, UsageError
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, kv, table

START_EPILOG = """examples:
  hvrctl failover start web01 --prepare                 # on the primary: planned failover, zero loss
  hvrctl failover start web01                           # on the replica server: fail over to the latest point
  hvrctl failover start web01 --recovery-point 12       # ... to an older point
  hvrctl failover start web01 --force                   # the primary's site is lost but it still answered lately
  hvrctl failover start web01 --as-test --recovery-point 12 -o json"""
STOP_EPILOG = """examples:
  hvrctl failover stop web01            # cancel: back to a replica with every recovery point (or un-prepare)
  hvrctl failover stop web01 --as-test  # end a test failover"""
COMPLETE_EPILOG = """examples:
  hvrctl failover complete web01 -o json"""


def register(sub, common) -> None:
    fo = sub.add_parser("failover", parents=[common], help="failover of a VM (Start/Stop/Complete-VMFailover)",
                        description="Planned failover (--prepare on the primary, then start on the replica "
                                    "server), unplanned failover to a recovery point on the replica server, its "
                                    "cancel (stop) and completion, and test failover (--as-test). docs/failover.md "
                                    "has the runbooks.", epilog=START_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = fo.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = fsub.add_parser("start", parents=[common], help="fail a VM over (or --prepare, or --as-test)",
                        description="On the replica server: the VM fails over to a recovery point (default: the "
                                    "latest). The replica's generation rises (the old primary is fenced), the "
                                    "point's disks are written as sparse files and the local agent serves them "
                                    "under NAME. Refused while the primary answered lately and said the VM runs, "
                                    "unless --force. On the primary, --prepare ships everything left and verifies "
                                    "the replica (a planned failover). --as-test serves the point as the test VM "
                                    "'NAME - Test' while replication goes on.",
                        epilog=START_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="the VM")
    p.add_argument("--recovery-point", type=int, metavar="ID", help="the point (hvrctl recovery-points list)")
    p.add_argument("--force", action="store_true", help="fail over although the primary answered lately")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="on the primary: prepare a planned failover")
    mode.add_argument("--as-test", action="store_true", help="a test failover")
    p.set_defaults(func=cmd_start)
    p = fsub.add_parser("stop", parents=[common], help="cancel a failover, a prepare, or a test failover",
                        description="Stop-VMFailover: a VM prepared here goes back to replicating; a failover "
                                    "waiting completion is cancelled (the agent stops serving it, its failover "
                                    "disks are deleted, the replica keeps every recovery point). --as-test "
                                    "deletes the test VM and what was written to it.",
                        epilog=STOP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="the VM")
    p.add_argument("--as-test", action="store_true", help="the test failover")
    p.set_defaults(func=cmd_stop)
    p = fsub.add_parser("complete", parents=[common], help="complete a failover (Complete-VMFailover)",
                        description="Commit the failover: the replica's other recovery points, images and history "
                                    "are removed, the failover disks are the VM's disks; the VM is FailedOver "
                                    "until reverse replication is set up (hvrctl vm set NAME --reverse ...).",
                        epilog=COMPLETE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="the VM")
    p.set_defaults(func=cmd_complete)


def _listener(args) -> AdminClient:
    return AdminClient(args.listener_socket, "hvr-listener")


def _agent(args) -> AdminClient:
    return AdminClient(args.agent_socket, "hvr-agent")


def _route_missing(exc: HvrError) -> bool:
    """The agent is absent, or older than the failover routes (no such route: ``http_error``)."""
    return isinstance(exc, UnavailableError) or exc.code == "http_error"


def _agent_vm(args) -> dict | None:
    """The local agent's VM NAME, or None (no such VM, or no agent here)."""
    try:
        return _agent(args).request("GET", f"/v1/vms/{args.name}")
    except HvrError as exc:
        if isinstance(exc, UnavailableError) or exc.code in ("not_found", "unknown_vm", "http_error"):
            return None
        raise


def _on_agent(args, method: str, route: str, body: dict | None, result: dict, what: str, paths: str,
              not_served_ok: bool = False) -> None:
    """Ask the local agent; when it is absent or older (or, with ``not_served_ok``, does not serve NAME as a
    failed-over VM: this host's agent is not where the VM runs), say so in ``result``: no agent step to do."""
    try:
        result["agent"] = _agent(args).request(method, route, body)
    except HvrError as exc:
        if not (_route_missing(exc) or (not_served_ok and exc.code == "not_failed_over_vm")):
            raise
        result["agent"] = None
        result["note"] = (f"the local hvr-agent is absent, older than failover, or does not serve {args.name} as "
                          f"a failed-over VM ({exc}): it did not {what}; the disks are at {paths}")


def cmd_start(args) -> int:
    if args.as_test:
        return _test_start(args)
    if args.prepare:
        if args.recovery_point is not None or args.force:
            raise UsageError("--prepare takes no --recovery-point nor --force (it runs on the primary)")
        result = _agent(args).request("POST", f"/v1/vms/{args.name}/failover/prepare", {})
        return _print(args, result, f"VM {args.name} is prepared for failover; on the replica server run: "
                                    f"hvrctl failover start {args.name}")
    body = {"recovery_point": args.recovery_point, "force": args.force}
    result = _listener(args).request("POST", f"/v1/replicas/{args.name}/failover", body)
    serve = {k: result[k] for k in ("vm_id", "generation", "disks", "recovery_point")}
    _on_agent(args, "POST", f"/v1/vms/{args.name}/failover/serve", serve, result, "serve them",
              ", ".join(d["path"] for d in result["disks"]))
    return _print(args, result, f"complete with: hvrctl failover complete {args.name}; cancel with: "
                                f"hvrctl failover stop {args.name}")


def cmd_stop(args) -> int:
    if args.as_test:
        return _test_stop(args)
    vm = _agent_vm(args)
    if vm is not None and vm.get("state") == "PreparedForFailover":
        result = _agent(args).request("DELETE", f"/v1/vms/{args.name}/failover/prepare")
        return _print(args, result, f"VM {args.name} is no longer prepared for failover")
    result: dict = {}
    if vm is not None and vm.get("failover"):
        result["agent"] = _agent(args).request("DELETE", f"/v1/vms/{args.name}/failover/serve")
    result.update(_listener(args).request("DELETE", f"/v1/replicas/{args.name}/failover"))
    return _print(args, result, f"failover of {args.name} cancelled: it is a replica again, with every "
                                "recovery point")


def cmd_complete(args) -> int:
    result = _listener(args).request("POST", f"/v1/replicas/{args.name}/failover/complete")
    _on_agent(args, "POST", f"/v1/vms/{args.name}/failover/serve/complete", {}, result, "mark the VM completed",
              ", ".join(d["path"] for d in result["disks"]), not_served_ok=True)
    return _print(args, result, f"set up reverse replication: hvrctl vm set {args.name} --reverse "
                                "--replica-server OLD-PRIMARY --port N --key FILE")


def _print(args, result: dict, next_step: str) -> int:
    if args.output == "json":
        emit_json(result)
        return 0
    shown = [(k, result[k]) for k in ("name", "state", "generation", "recovery_point", "step") if k in result]
    if shown:
        print(kv(shown))
    if result.get("disks"):
        print()
        print(table(result["disks"], [("DISK", "name"), ("PATH", "path"), ("SIZE", "size_bytes")]))
    if result.get("note"):
        print(f"\nnote: {result['note']}")
    print(f"\n{next_step}")
    return 0


def _test_start(args) -> int:
    if args.force:
        raise UsageError("--force is not for a test failover")
    body = {"recovery_point": args.recovery_point} if args.recovery_point is not None else {}
    view = _listener(args).request("POST", f"/v1/replicas/{args.name}/test-failover", body)
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


def _test_stop(args) -> int:
    result = _listener(args).request("DELETE", f"/v1/replicas/{args.name}/test-failover")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"stopped test failover {result['test_vm']}: {human_bytes(result['deleted_bytes'])} written by it "
              f"deleted")
    return 0
