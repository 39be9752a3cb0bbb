"""``hvrctl vm enable/get/measure/...`` and ``hvrctl initial ...``: replication on the primary.

The verbs mirror Enable-, Get-, Measure-, Suspend-, Resume-, Remove-VMReplication
and Start-VMInitialReplication; they talk to the agent's admin socket.
``vm set`` (Set-VMReplication) is in :mod:`hvrctl.replication_settings`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import time
from pathlib import Path

from hvr_common.pure.errors import HvrError, UsageError
from hvrctl import credential_flags, replication_settings
from hvr_common.pure.schedule import FREQUENCIES_S
from hvrctl import media_commands
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, kv, table
from hvrctl.progress import progress_bar

NS = 1_000_000_000
PROGRESS_POLL_S = 0.5


def register(sub, vm_verbs, common) -> None:
    p = vm_verbs.add_parser(
        "enable", parents=[common], help="enable replication of a VM to a replica server",
        description="Enable-VMReplication: record where the VM replicates to, create its replica on the replica "
                    "server (state WaitingForInitialReplication there) and show ReadyForInitialReplication here. "
                    "Start the initial copy with: hvrctl initial start NAME.",
        epilog=credential_flags.EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="a VM registered with the agent")
    p.add_argument("--replica-server", required=True, metavar="HOST", help="host name or address of hvr-listener")
    p.add_argument("--port", required=True, type=int, metavar="N", help="the listener's TCP port")
    credential_flags.add_flags(p)
    p.add_argument("--frequency", type=int, choices=FREQUENCIES_S, default=300,
                   metavar="|".join(map(str, FREQUENCIES_S)),
                   help="replication interval in seconds (default 300)")
    p.add_argument("--no-compression", dest="compression", action="store_false",
                   help="send logs uncompressed (default: zstd, frames that do not shrink stay raw)")
    replication_settings.add_flags(p, can_turn_off=False)
    p.set_defaults(func=cmd_enable)
    replication_settings.register(vm_verbs, common, _client, _print_detail)

    p = vm_verbs.add_parser(
        "get", parents=[common], help="show replication state and health",
        description="Get-VMReplication: state, health, mode, frequency, primary and replica server, last "
                    "replication time and initial-copy progress of one VM, or of every replicated VM.")
    p.add_argument("name", metavar="NAME", nargs="?", help="one VM (default: all replicated VMs)")
    p.set_defaults(func=cmd_get)

    p = vm_verbs.add_parser(
        "measure", parents=[common], help="show replication statistics",
        description="Measure-VMReplication: sizes and latencies of the cycles of the monitoring window "
                    "(12 hours from 00:00 UTC unless 'hvrctl server set' changed it), successful and missed "
                    "cycles, errors, what is pending and when the last cycle was acknowledged. With --reset "
                    "(Reset-VMReplicationStatistics) a new collection starts now.",
        epilog="examples:\n  hvrctl vm measure web01\n  hvrctl vm measure web01 --reset -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reset", action="store_true",
                   help="clear the statistics collected so far and start a new collection window")
    p.set_defaults(func=cmd_measure)

    p = vm_verbs.add_parser(
        "suspend", parents=[common], help="stop shipping cycles (changes are still tracked)",
        description="Suspend-VMReplication: no more cycles are sent; writes go on being logged, so resuming "
                    "ships everything that accumulated.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=lambda a: _simple(a, "suspend", "suspended"))

    p = vm_verbs.add_parser(
        "resume", parents=[common], help="resume a suspended VM, or retry one in Error",
        description="Resume-VMReplication: a suspended VM ships its accumulated logs and replicates again; "
                    "a VM in Error retries where it failed (the initial copy from its durable offsets).")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=lambda a: _simple(a, "resume", "resumed"))

    p = vm_verbs.add_parser(
        "sync-now", parents=[common], help="cut and ship a cycle now",
        description="Cut the VM's logs now and upload everything not yet acknowledged; waits for the "
                    "replica's acknowledgement unless --no-wait.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return once the cycle is requested")
    p.set_defaults(func=cmd_sync_now)

    remove = vm_verbs.choices["remove"]
    remove.add_argument("--replication-only", action="store_true",
                        help="Remove-VMReplication: forget the replication relationship but keep the VM "
                             "registered (its logs are kept; the replica is left as it is)")
    unregister = remove.get_default("func")
    remove.set_defaults(func=lambda a: cmd_remove_replication(a) if a.replication_only else unregister(a))

    initial = sub.add_parser("initial", parents=[common], help="initial replication",
                             description="Start-VMInitialReplication and related verbs.")
    isub = initial.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = isub.add_parser(
        "start", parents=[common], help="copy the VM's disks to the replica over the network",
        description="Start-VMInitialReplication (network method): send the allocated data of every disk in "
                    "windows; an interrupted copy resumes from the replica's durable offsets. Writes made "
                    "meanwhile are shipped as the first cycles right after.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--at", metavar="TIME", type=parse_time,
                   help="start later: ISO 8601 date and time (local unless it has a zone), HH:MM (next "
                        "occurrence) or +N[s|m|h] from now")
    p.add_argument("--wait", action="store_true",
                   help="wait until the copy completes, with a progress bar on stderr")
    p.add_argument("--use-existing", action="store_true",
                   help="the replica server adopted a copy of the VM (hvrctl replica adopt): compare it "
                        "instead of copying (Start-VMInitialReplication -UseBackup)")
    p.set_defaults(func=cmd_initial_start)
    media_commands.register(isub, common)


def _client(args) -> AdminClient:
    return AdminClient(args.agent_socket, "hvr-agent")


# --- time ------------------------------------------------------------------------------------
_RELATIVE = re.compile(r"^\+(\d+)([smh]?)$")


def parse_time(text: str, now: datetime.datetime | None = None) -> int:
    """``--at`` into nanoseconds since the epoch."""
    now = now or datetime.datetime.now().astimezone()
    m = _RELATIVE.match(text.strip())
    if m:
        seconds = int(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]
        return int((now.timestamp() + seconds) * NS)
    hm = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    try:
        if hm:
            when = now.replace(hour=int(hm[1]), minute=int(hm[2]), second=0, microsecond=0)
            if when <= now:
                when += datetime.timedelta(days=1)
        else:
            when = datetime.datetime.fromisoformat(text.strip())
            if when.tzinfo is None:
                when = when.astimezone()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time (use 2030-01-31T22:00, 22:00 or +30m)") from None
    return int(when.timestamp() * NS)


def _local(iso: str | None) -> str | None:
    if iso is None:
        return None
    when = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --- verbs -----------------------------------------------------------------------------------
def cmd_enable(args) -> int:
    result = _client(args).request("POST", f"/v1/vms/{args.name}/replication", {
        "replica_server": args.replica_server, "port": args.port, **credential_flags.credentials_of(args),
        "frequency_s": args.frequency, "compression": args.compression,
        **replication_settings.settings_of(args)})
    if args.output == "json":
        emit_json(result)
    else:
        _print_detail(result)
        print(f"\nnext: hvrctl initial start {args.name}")
    return 0


_COLUMNS = [("VM", "vm"), ("STATE", "state"), ("HEALTH", "health"), ("MODE", "mode"), ("FREQ", "freq"),
            ("PRIMARY", "primary_server"), ("REPLICA", "replica"), ("LAST REPLICATION", "last"),
            ("PROGRESS", "progress")]


def _progress_text(status: dict) -> str | None:
    ini = status.get("initial") or {}
    if status["state"] == "InitialReplicationInProgress" or (status["state"] == "Error" and "percent" in ini):
        return f"{ini.get('percent', 0):.1f}%"
    if ini.get("scheduled_at"):
        return f"starts {_local(ini['scheduled_at'])}"
    return None


def cmd_get(args) -> int:
    client = _client(args)
    if args.name:
        result = client.request("GET", f"/v1/replication/{args.name}")
        if args.output == "json":
            emit_json(result)
        else:
            _print_detail(result)
        return 0
    result = client.request("GET", "/v1/replication")
    if args.output == "json":
        emit_json(result)
    elif not result:
        print("no VM replicates (enable one with: hvrctl vm enable NAME --replica-server HOST --port N --key FILE)")
    else:
        rows = [dict(s, freq=f"{s['frequency_s']} s", replica=f"{s['replica_server']}:{s['replica_port']}",
                     last=_local(s["last_replication_time"]), progress=_progress_text(s)) for s in result]
        print(table(rows, _COLUMNS))
    return 0


def _print_detail(s: dict) -> None:
    pairs = [("VMName", s["vm"]), ("State", s["state"])]
    if s.get("state_detail"):
        pairs.append(("StateDetail", s["state_detail"]))
    pairs += [("Health", s["health"])]
    for i, d in enumerate(s.get("health_details") or []):
        pairs.append(("HealthDetail" if i == 0 else "", d))
    pairs += [("Mode", s["mode"]), ("Tracking", s.get("tracking"))]
    if s.get("tracking_switch"):
        pairs.append(("TrackingSwitch", s["tracking_switch"].get("detail")))
    pairs += [("FrequencySec", s["frequency_s"]),
              ("Compression", "zstd" if s["compression"] else "off"),
              ("PrimaryServer", s["primary_server"]), ("Principal", s["principal"]),
              ("ReplicaServer", f"{s['replica_server']}:{s['replica_port']}"),
              ("Generation", s["generation"]), ("NextSequence", s["next_sequence"]),
              ("PendingCycles", s["pending_cycles"]),
              ("LastReplicationTime", _local(s["last_replication_time"]))]
    pairs += [(k, _local(v) if k.endswith("Time") else v) for k, v in replication_settings.detail_rows(s)]
    if s.get("last_error"):
        pairs.append(("LastError", s["last_error"]))
    ini = s.get("initial") or {}
    if ini.get("scheduled_at"):
        pairs.append(("InitialScheduledFor", _local(ini["scheduled_at"])))
    if ini.get("started_at"):
        pairs.append(("InitialStarted", _local(ini["started_at"])))
    if ini.get("completed_at"):
        pairs.append(("InitialCompleted", _local(ini["completed_at"])))
    elif "percent" in ini and ini.get("started_at"):
        pairs += [("InitialProgress", f"{ini['percent']:.1f}% ({human_bytes(ini['bytes_done'])} of "
                                      f"{human_bytes(ini['bytes_total'])})"),
                  ("InitialRate", f"{human_bytes(ini['rate_bytes_per_s'])}/s" if ini.get("rate_bytes_per_s")
                   else None),
                  ("InitialETA", _duration(ini.get("eta_s")))]
    resync = s.get("resync") or {}
    if resync:
        pairs += [("Resync" if resync.get("running") else "LastResync",
                   f"{resync.get('percent', 0):.1f}%: {human_bytes(resync.get('compared_bytes'))} compared, "
                   f"{human_bytes(resync.get('differing_bytes'))} differing, {human_bytes(resync.get('sent_bytes'))} "
                   "sent"), ("ResyncETA", _duration(resync.get("eta_s")) if resync.get("running") else None)]
    verify = s.get("verify") or {}
    if verify and not verify.get("running"):
        pairs.append(("LastVerify", f"cycle {verify.get('sequence')}: {human_bytes(verify.get('differing_bytes'))} "
                                    f"differing of {human_bytes(verify.get('compared_bytes'))}"))
    print(kv(pairs))


_MEASURE_FIELDS = ("VMName", "State", "Health", "ReplicationMode", "FrequencySec", "AverageReplicationSize",
                   "MaximumReplicationSize", "AverageReplicationLatency", "MaximumReplicationLatency",
                   "SuccessfulReplicationCount", "MissedReplicationCount", "PendingReplicationSize",
                   "LastReplicationTime", "LastAppliedLogTime", "ReplicationErrors", "AppConsistentFailedCount",
                   "WindowStartTime", "MonitoringStartTime", "MonitoringEndTime")


def cmd_measure(args) -> int:
    if getattr(args, "reset", False):
        m = _client(args).request("POST", f"/v1/vms/{args.name}/replication/statistics/reset")
    else:
        m = _client(args).request("GET", f"/v1/vms/{args.name}/replication/measure")
    if args.output == "json":
        emit_json(m)
        return 0
    shown = []
    for name in _MEASURE_FIELDS:
        value = m.get(name)
        if name.endswith("Size") and value is not None:
            value = human_bytes(value) if value < 1024 else f"{human_bytes(value)} ({value} B)"
        elif name.endswith("Latency") and value is not None:
            value = f"{value:.3f} s"
        elif name.endswith("Time"):
            value = _local(value)
        shown.append((name, value))
    shown += [("HealthDetail", d) for d in m.get("ReplicationHealthDetails") or []]
    print(kv(shown))
    return 0


def _simple(args, verb: str, done: str) -> int:
    result = _client(args).request("POST", f"/v1/vms/{args.name}/replication/{verb}")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"replication of VM {args.name} {done}: {result['state']}")
    return 0


def cmd_sync_now(args) -> int:
    waiting = progress_bar(f"cycle of VM {args.name}: cutting, shipping, waiting for the replica", None,
                           output=args.output) if args.wait else contextlib.nullcontext()
    with waiting:
        result = _client(args).request("POST", f"/v1/vms/{args.name}/replication/sync-now", {"wait": args.wait})
    if args.output == "json":
        emit_json(result)
    elif args.wait:
        print(f"cycle {result['sequence']} of VM {args.name} acknowledged "
              f"({human_bytes(result['bytes'])} sent, {result['result']})")
    else:
        print(f"cycle of VM {args.name} requested")
    return 0


def cmd_remove_replication(args) -> int:
    result = _client(args).request("DELETE", f"/v1/vms/{args.name}/replication")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"replication of VM {args.name} removed (the VM stays registered)")
    return 0


def cmd_initial_start(args) -> int:
    client = _client(args)
    body = {"at_ns": args.at} if args.at is not None else {}
    if args.use_existing:
        body["use_existing"] = True
    result = client.request("POST", f"/v1/vms/{args.name}/replication/initial", body)
    if not args.wait:
        if args.output == "json":
            emit_json(result)
        else:
            ini = result.get("initial") or {}
            when = f" (scheduled for {_local(ini['scheduled_at'])})" if ini.get("scheduled_at") else ""
            print(f"initial replication of VM {args.name}: {result['state']}{when}")
        return 0
    with progress_bar(f"initial replication of {args.name}", None, output=args.output) as bar:
        while True:
            status = client.request("GET", f"/v1/replication/{args.name}")
            state = status["state"]
            if state == "Error":
                raise HvrError(f"initial replication of VM {args.name} failed: {status.get('state_detail')}",
                               hint=f"fix the cause, then: hvrctl vm resume {args.name}")
            ini = status.get("initial") or {}
            if state not in ("ReadyForInitialReplication", "InitialReplicationInProgress"):
                bar.update(bar.total or 1, total=bar.total or 1,
                           description=f"initial replication of {args.name}: done")
                break
            if state == "ReadyForInitialReplication":
                bar.update(0, description=f"waiting: initial replication of {args.name} scheduled for "
                                          f"{_local(ini.get('scheduled_at')) or 'now'}")
            else:
                bar.update(ini.get("bytes_done") or 0, total=ini.get("bytes_total") or None,
                           description=f"initial replication of {args.name}")
            time.sleep(PROGRESS_POLL_S)
    if args.output == "json":
        emit_json(status)
    else:
        print(f"initial replication of VM {args.name} complete: {status['state']}")
    return 0
