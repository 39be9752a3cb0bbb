"""A replicated VM's recovery history settings on the command line: ``vm enable`` flags and ``hvrctl vm set``.

``vm set`` mirrors Set-VMReplication: it changes the settings given and
leaves the others as they are.  The agent validates them (one message per
bad value, naming the field; nothing changes) and tells the replica server
before its next step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from hvrctl import reverse_commands
from hvrctl.client import AdminClient
from hvrctl.output import emit_json

FIELDS = {"recovery_history": "recovery_history", "fine_window": "fine_window_min",
          "app_consistent_hours": "app_consistent_hours"}
OFF = "off"


def _hours(text: str) -> int | str:
    if text == OFF:
        return OFF
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of hours (1 to 12) or 'off'") from None


def add_flags(p: argparse.ArgumentParser, *, can_turn_off: bool) -> None:
    """The settings' flags; a flag not given is not sent (the agent keeps or defaults the value)."""
    p.add_argument("--recovery-history", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="hourly recovery points kept on the replica besides the latest, 0 to 24 (default 0)")
    p.add_argument("--fine-window", type=int, metavar="MINUTES", default=argparse.SUPPRESS,
                   help="every cycle is a recovery point for this many minutes, 0 for off (default 60)")
    p.add_argument("--app-consistent-hours", type=_hours if can_turn_off else int,
                   metavar="N|off" if can_turn_off else "N", default=argparse.SUPPRESS,
                   help="an application-consistent cut (agent.toml [app_consistency] freeze and thaw commands) "
                        "every N hours, 1 to 12" + ("; off to stop them" if can_turn_off else " (default: off)"))


def settings_of(args: argparse.Namespace) -> dict:
    """The admin API's fields for the flags that were given."""
    out = {}
    for attr, field in FIELDS.items():
        if hasattr(args, attr):
            value = getattr(args, attr)
            out[field] = None if value == OFF else value
    return out


def register(vm_verbs, common, client: Callable[[argparse.Namespace], AdminClient],
             print_detail: Callable[[dict], None]) -> None:
    p = vm_verbs.add_parser(
        "set", parents=[common], help="change a replicated VM's recovery history settings",
        description="Set-VMReplication: change the recovery points the replica server keeps and how often a cut "
                    "is application-consistent. Settings not given stay as they are; the replica server gets "
                    "the new ones before the next cycle. With --reverse (Set-VMReplication -Reverse), a VM "
                    "failed over to this host replicates back to the old primary.",
        epilog=reverse_commands.EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME")
    add_flags(p, can_turn_off=True)
    reverse_commands.add_flags(p)

    def cmd_set(args) -> int:
        if args.reverse:
            return reverse_commands.run(p, args, client(args), print_detail)
        changes = settings_of(args)
        if not changes:
            p.error("give at least one of --recovery-history, --fine-window, --app-consistent-hours")
        result = client(args).request("PATCH", f"/v1/vms/{args.name}/replication", changes)
        if args.output == "json":
            emit_json(result)
        else:
            print_detail(result)
        return 0
    p.set_defaults(func=cmd_set)


def detail_rows(status: dict) -> list[tuple[str, object]]:
    """The settings' lines of ``vm get``."""
    hours = status.get("app_consistent_hours")
    rows = [("RecoveryHistory", status.get("recovery_history")),
            ("FineWindowMin", status.get("fine_window_min")),
            ("AppConsistentHours", hours if hours is not None else OFF)]
    if status.get("last_app_consistent_time"):
        rows.append(("LastAppConsistentTime", status["last_app_consistent_time"]))
    if status.get("settings_pending"):
        rows.append(("SettingsPending", "not yet acknowledged by the replica server"))
    return rows
