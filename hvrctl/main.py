"""``hvrctl``: the operator's command line for hvr.

Verbs mirror the Hyper-V Replica PowerShell cmdlets where one exists.
Tables by default; ``-o json`` for programs.  Exit codes: 0 success,
2 bad usage, 3 not found, 4 conflict, 65 corrupt data, 69 daemon unreachable,
75 temporary failure, 77 not permitted, 78 bad configuration, 130 interrupted, 1 anything else
(docs/hvrctl.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hvr_common.pure.errors import HvrError
from hvr_common.pure.names import check_name
from hvrctl import (authz_commands, backup_commands, cert_commands, compare_commands, examples, failover_commands,
                    hrl_commands, recovery_commands, replication_commands, server_commands, vm_commands)

DEFAULT_AGENT_SOCKET = "/run/hvr/agent.sock"
DEFAULT_LISTENER_SOCKET = "/run/hvr/listener.sock"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS,
                        help="output format (default: table)")
    common.add_argument("--agent-socket", type=Path, default=argparse.SUPPRESS,
                        help="the agent's admin socket (default: $HVR_AGENT_SOCKET or "
                             f"{DEFAULT_AGENT_SOCKET})")
    common.add_argument("--listener-socket", type=Path, default=argparse.SUPPRESS,
                        help="the listener's admin socket (default: $HVR_LISTENER_SOCKET or "
                             f"{DEFAULT_LISTENER_SOCKET})")

    parser = argparse.ArgumentParser(
        prog="hvrctl", parents=[common],
        description="Operate hvr: protected VMs on the agent, HRL logs, replication.",
        epilog="Run 'hvrctl COMMAND --help' for the options of each command. Exit codes: 0 success, 1 other "
               "failure, 2 bad usage, 3 not found, 4 conflict, 65 corrupt data, 69 daemon unreachable, 75 "
               "temporary failure (retry), 77 not permitted, 78 bad configuration, 130 interrupted "
               "(docs/hvrctl.md). example: hvrctl vm get web01 -o json")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    vm_verbs = vm_commands.register(sub, common)
    replication_commands.register(sub, vm_verbs, common)
    compare_commands.register(vm_verbs, common)
    server_commands.register(sub, common)
    authz_commands.register(sub, common)
    recovery_commands.register(sub, common)
    failover_commands.register(sub, common)
    hrl_commands.register(sub, common)
    backup_commands.register(sub, common)
    cert_commands.register(sub, common)
    examples.attach(parser)
    return parser


# sysexits for local files: EX_NOINPUT, EX_NOPERM
_OS_EXIT_CODES = {FileNotFoundError: 66, IsADirectoryError: 66, NotADirectoryError: 66, PermissionError: 77}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "output"):
        args.output = "table"
    if not hasattr(args, "agent_socket"):
        args.agent_socket = Path(os.environ.get("HVR_AGENT_SOCKET") or DEFAULT_AGENT_SOCKET)
    if not hasattr(args, "listener_socket"):
        args.listener_socket = Path(os.environ.get("HVR_LISTENER_SOCKET") or DEFAULT_LISTENER_SOCKET)
    try:
        if getattr(args, "name", None) is not None:  # every NAME argument is a VM's: it goes into a route
            check_name("VM", args.name)  # ('web#x' would reach VM web; 'web\n' no route at all)
        return args.func(args) or 0
    except HvrError as exc:
        if args.output == "json":
            import json
            print(json.dumps({"error": exc.to_dict()}), file=sys.stderr)
        else:
            print(f"hvrctl: error: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"hvrctl: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a local file the command was given (a folder, a missing one, unreadable)
        if isinstance(exc, BrokenPipeError):
            return 0
        where = f": {exc.filename}" if exc.filename else ""
        print(f"hvrctl: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return _OS_EXIT_CODES.get(type(exc), 74)  # EX_IOERR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
