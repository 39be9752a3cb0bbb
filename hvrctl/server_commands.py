"""``hvrctl server ...``, ``hvrctl key ...`` and ``hvrctl replica ...``: the replica server side."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import re
import urllib.parse
from pathlib import Path

from hvr_common.pure.errors import HvrError, UnavailableError, UsageError
from hvr_common.shell.key_file import read_key, write_key
from hvr_common.pure.token_auth import Key
from hvrctl import adopt_commands, transfer_commands
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, kv, table


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise UsageError(f"{text!r} is not true or false")


def register(sub, common) -> None:
    srv = sub.add_parser("server", parents=[common], help="the replica server (Get/Set-VMReplicationServer)",
                         description="Settings and keys of the replica server (hvr-listener on this host).")
    ssub = srv.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = ssub.add_parser("get", parents=[common], help="show the replica server settings",
                        description="Show whether the server accepts replication, how it authenticates, "
                                    "where it listens and where new replicas are stored.")
    transfer_commands.add_get_arguments(p)
    p.set_defaults(func=cmd_server_get)
    p = ssub.add_parser("set", parents=[common], help="change replica server settings",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Change settings; all given changes are validated first and applied together. "
                                    "A change of address or TLS rebinds the replication API now. "
                                    "The monitoring settings (Set-VMReplicationServer -MonitoringInterval "
                                    "-MonitoringStartTime) go to every daemon of this host that answers, the "
                                    "agent and the listener; the transfer settings to the agent; the others to "
                                    "the listener.")
    p.add_argument("--enabled", metavar="true|false", help="accept replication at all")
    p.add_argument("--auth", metavar="MODES",
                   help="accepted authentication modes, comma-separated: token, certificate (certificate needs "
                        "--cert, --cert-key and --ca, here or in listener.toml)")
    p.add_argument("--cert", metavar="FILE", help="the server's PEM certificate (serverAuth): TLS 1.3 from now on")
    p.add_argument("--cert-key", metavar="FILE", help="the certificate's PEM key (mode 0600)")
    p.add_argument("--ca", metavar="FILE", help="PEM CA bundle primaries' certificates must chain to")
    p.add_argument("--listen", metavar="HOST:PORT", help="address and port of the replication API (rebinds now)")
    p.add_argument("--storage", metavar="PATH", help="default storage location for new replicas")
    p.add_argument("--allow-any", metavar="true|false",
                   help="accept replication from any authenticated primary")
    transfer_commands.add_set_arguments(p)
    p.add_argument("--monitoring-interval", metavar="DURATION",
                   help="the window of statistics and health: whole hours from 1h to 7d, as 12h or 1d "
                        "(default 12h)")
    p.add_argument("--monitoring-start", metavar="HH:MM",
                   help="time of day (UTC) a monitoring window starts (default 00:00)")
    p.add_argument("--latency-limit", metavar="DURATION",
                   help="health is Warning when the average replication latency of the monitoring window is "
                        "over it: 90s, 5m, 1h or seconds (default 5m)")
    p.set_defaults(func=cmd_server_set)

    key = ssub.add_parser("key", parents=[common], help="keys of primaries allowed to authenticate",
                          description="Install, list and remove primaries' token keys on this server.")
    ksub = key.add_subparsers(dest="key_verb", metavar="VERB", required=True)
    p = ksub.add_parser("add", parents=[common], help="install a primary's key file",
                        description="Install the key made by 'hvrctl key new' so that primary can authenticate. "
                                    "A second key of the same principal is added beside the first (both are "
                                    "valid: a rotation without downtime); --replace replaces all its keys.",
                        epilog="example: hvrctl server key add /tmp/primary.example.com.key\n"
                               "rotation: hvrctl server key add new.key; switch the primary to new.key; "
                               "hvrctl server key remove host1.example.com --key-id OLD_ID",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--replace", action="store_true", help="replace every installed key of the same principal")
    p.set_defaults(func=cmd_key_add)
    p = ksub.add_parser("remove", parents=[common], help="remove a primary's key",
                        description="Remove a principal's keys (or one, with --key-id): requests signed with them "
                                    "are refused from now on; when the principal has no key left, its open "
                                    "connections are closed.",
                        epilog="example: hvrctl server key remove host1.example.com --key-id 3f2a9c0d1e4b5a67")
    p.add_argument("principal", metavar="PRINCIPAL")
    p.add_argument("--key-id", metavar="ID", help="remove only this key (see hvrctl server key list)")
    p.set_defaults(func=cmd_key_remove)
    p = ksub.add_parser("list", parents=[common], help="list installed keys (principals and key ids only)")
    p.set_defaults(func=cmd_key_list)

    k = sub.add_parser("key", parents=[common], help="token keys",
                       description="Create token-authentication keys for primaries.")
    kk = k.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = kk.add_parser("new", parents=[common], help="create a key file for a primary",
                      description="Create a new random key for PRINCIPAL (usually the primary's host name) in "
                                  "FILE, mode 0600. Give a copy to the replica server's operator "
                                  "(hvrctl server key add FILE) and keep FILE on the primary "
                                  "(hvrctl vm enable --key FILE).")
    p.add_argument("principal", metavar="PRINCIPAL")
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=cmd_key_new)

    rep = sub.add_parser("replica", parents=[common], help="replica VMs on this replica server",
                         description="Replica-side view of replicated VMs (Get-VMReplication on the replica).")
    rsub = rep.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = rsub.add_parser("get", parents=[common], help="show replica VMs",
                        description="Show one replica VM (with its recent cycles) or all of them.")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.set_defaults(func=cmd_replica_get)
    p = rsub.add_parser("remove", parents=[common], help="forget a replica VM (Remove-VMReplication)",
                        description="Forget a replica VM on this server: its primary's requests are refused from "
                                    "now on. The replica disks stay unless --delete-storage.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--delete-storage", action="store_true", help="also delete the replica's disks and cycles")
    p.set_defaults(func=cmd_replica_remove)
    p = rsub.add_parser("suspend", parents=[common], help="pause replication on the replica",
                        description="Suspend-VMReplication on the replica: cycles from the primary are still "
                                    "received and stored, none is applied until 'hvrctl replica resume'; the "
                                    "replica's health is Critical meanwhile (paused on the replica).")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_replica_resume, verb_route="suspend")
    p = rsub.add_parser("resume", parents=[common], help="apply stored cycles again (after Error or a pause)",
                        description="After the cause of an Error was fixed, or after 'hvrctl replica suspend', "
                                    "apply the stored cycles (again).")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_replica_resume, verb_route="resume")
    adopt_commands.register(rsub, common)


def _client(args) -> AdminClient:
    return AdminClient(args.listener_socket, "hvr-listener")


def _server_view(args, view: dict) -> int:
    if args.output == "json":
        emit_json(view)
    else:
        print(kv([("server", view["server_name"]), ("replication enabled", view["enabled"]),
                  ("authentication", ", ".join(view["auth_modes"])), ("listen (setting)", view["listen"]),
                  ("listening on", view.get("listening_on")), ("default storage", view["default_storage"]),
                  ("allow any authenticated", view["allow_any_authenticated"]), ("installed keys", view["keys"]),
                  ("authorization entries", view.get("authorization_entries")),
                  ("TLS", _tls_text(view.get("tls"))),
                  ("max active applies", view.get("max_active_applies")),

                  ("monitoring interval", f"{view['monitoring_interval_s'] // 3600} h"),
                  ("monitoring start (UTC)", view["monitoring_start"]),
                  ("latency limit", f"{view.get('latency_limit_s')} s")]))
    return 0


def _tls_text(tls: dict | None) -> str:
    if not tls:
        return "off (plain HTTP)"
    return f"TLS 1.3, client certificate {tls['client_certificate']}; cert {tls['cert']}, CA {tls['ca']}"


def cmd_server_get(args) -> int:
    if args.agent:
        return transfer_commands.cmd_agent_get(args)
    return _server_view(args, _client(args).request("GET", "/v1/server"))


def monitoring_interval_s(text: str) -> int:
    """``12h``, ``1d`` or a number of seconds."""
    unit = {"h": 3600, "d": 86400}.get(text[-1:].lower(), 1) if text else 1
    digits = text[:-1] if unit != 1 else text
    if re.fullmatch("[0-9]{1,9}", digits) is None:  # ASCII digits: str.isdigit() takes '²', which int() refuses
        raise UsageError(f"monitoring interval {text!r:.80} is not a duration", hint="for example 12h or 1d")
    return int(digits) * unit


def latency_limit_s(text: str) -> int:
    """``90s``, ``5m``, ``1h`` or a number of seconds."""
    unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower()) if text else None
    digits = text[:-1] if unit is not None else text
    if re.fullmatch("[0-9]{1,9}", digits) is None:  # ASCII digits, bounded: int() refuses '²'
        raise UsageError(f"latency limit {text!r:.80} is not a duration", hint="for example 90s, 5m or 1h")
    return int(digits) * (unit or 1)


def _monitoring_changes(args) -> dict:
    changes: dict = {}
    if args.monitoring_interval is not None:
        changes["monitoring_interval_s"] = monitoring_interval_s(args.monitoring_interval)
    if args.monitoring_start is not None:
        changes["monitoring_start"] = args.monitoring_start
    if args.latency_limit is not None:
        changes["latency_limit_s"] = latency_limit_s(args.latency_limit)
    return changes


def cmd_server_set(args) -> int:
    monitoring = _monitoring_changes(args)
    changes: dict = dict(monitoring)
    agent_changes = transfer_commands.agent_changes(args)
    if args.max_applies is not None:
        changes["max_active_applies"] = args.max_applies
    if args.enabled is not None:
        changes["enabled"] = _bool(args.enabled)
    if args.allow_any is not None:
        changes["allow_any_authenticated"] = _bool(args.allow_any)
    if args.auth is not None:
        changes["auth_modes"] = [m.strip() for m in args.auth.split(",") if m.strip()]
    if args.listen is not None:
        changes["listen"] = args.listen
    if args.storage is not None:
        changes["default_storage"] = args.storage
    for flag, key in (("cert", "tls_cert"), ("cert_key", "tls_key"), ("ca", "tls_ca")):
        value = getattr(args, flag)
        if value is not None:
            changes[key] = str(Path(value).expanduser().resolve()) if value else ""
    if agent_changes is not None:
        if changes:
            raise UsageError("the primary's transfer settings and the replica server's settings are set apart",
                             hint="give --bandwidth, --bandwidth-schedule, --max-transfers in one command, "
                                  "the replica server's settings in another")
        return transfer_commands.cmd_agent_set(args, agent_changes)
    if not changes:
        raise UsageError("nothing to change", hint="see hvrctl server set --help")
    if not monitoring:
        return _server_view(args, _client(args).request("PATCH", "/v1/server", changes))
    return _set_everywhere(args, changes, monitoring)


def _set_everywhere(args, changes: dict, monitoring: dict) -> int:
    """Monitoring settings to the agent if it runs here; all changes to the listener if it runs here (it
    must when there are listener settings among them)."""
    agent_view = None
    try:
        agent_view = AdminClient(args.agent_socket, "hvr-agent").request("PATCH", "/v1/server", monitoring)
    except UnavailableError:
        pass
    try:
        view = _client(args).request("PATCH", "/v1/server", changes)
    except UnavailableError:
        if agent_view is None or len(changes) > len(monitoring):
            raise
        if args.output == "json":
            emit_json(agent_view)
        else:
            print(kv([("agent", agent_view["server_name"]),
                      ("monitoring interval", f"{agent_view['monitoring_interval_s'] // 3600} h"),
                      ("monitoring start (UTC)", agent_view["monitoring_start"]),
                      ("latency limit", f"{agent_view['latency_limit_s']} s")]))
        return 0
    return _server_view(args, view)


def cmd_key_add(args) -> int:
    key = read_key(args.file)
    result = _client(args).request("POST", "/v1/keys", {"principal": key.principal,
                                                       "secret": base64.b64encode(key.secret).decode(),
                                                       "replace": args.replace})
    if args.output == "json":
        emit_json(result)
    elif result["replaced"]:
        print(f"installed key {result['key_id']} of {key.principal}, replacing {', '.join(result['replaced'])}")
    else:
        print(f"installed key {result['key_id']} of {key.principal}")
    return 0


def cmd_key_remove(args) -> int:
    route = f"/v1/keys/{urllib.parse.quote(args.principal, safe='')}"
    if args.key_id:
        route += "?" + urllib.parse.urlencode({"key_id": args.key_id})
    result = _client(args).request("DELETE", route)
    if args.output == "json":
        emit_json(result)
    else:
        print(f"removed key {', '.join(result['key_ids'])} of {args.principal}"
              + (f"; closed {result['connections_closed']} connection(s)" if result["connections_closed"] else ""))
    return 0


def cmd_key_list(args) -> int:
    keys = _client(args).request("GET", "/v1/keys")
    if args.output == "json":
        emit_json(keys)
    else:
        print(table([{"principal": k["principal"], "key_id": k["key_id"], "added": _time(k["added_ns"])}
                     for k in keys], [("PRINCIPAL", "principal"), ("KEY ID", "key_id"), ("ADDED", "added")]))
    return 0


def cmd_key_new(args) -> int:
    try:
        key = Key.generate(args.principal)
    except HvrError as exc:  # a bad argument (exit 2), not a failed authentication (77)
        raise UsageError(exc.message, hint=exc.hint) from None
    write_key(key, args.out, overwrite=args.force)
    if args.output == "json":
        emit_json({"principal": key.principal, "key_id": key.key_id, "file": str(args.out)})
    else:
        print(f"wrote a new key {key.key_id} for {key.principal} to {args.out} (mode 0600)")
        print(f"next: on the replica server, hvrctl server key add {args.out}")
    return 0


def _time(ns: int | None) -> str | None:
    if not ns:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat(timespec="seconds")


def cmd_replica_get(args) -> int:
    client = _client(args)
    reps = [client.request("GET", f"/v1/replicas/{args.name}")] if args.name else client.request("GET", "/v1/replicas")
    if args.output == "json":
        emit_json(reps[0] if args.name else reps)
        return 0
    rows = [{"name": r["name"], "state": r["state"], "health": r.get("health"), "primary": r["primary_server"],
             "gen": r["generation"], "received": r["last_received_sequence"], "applied": r["last_applied_sequence"],
             "last_replication": _time(r["last_replication_time_ns"]),
             "last_applied_log": _time(r["last_applied_log_time_ns"])} for r in reps]
    print(table(rows, [("NAME", "name"), ("STATE", "state"), ("HEALTH", "health"), ("PRIMARY", "primary"),
                       ("GEN", "gen"),
                       ("RECEIVED", "received"), ("APPLIED", "applied"), ("LAST REPLICATION", "last_replication"),
                       ("LAST APPLIED LOG", "last_applied_log")]))
    if args.name and reps[0].get("state_detail"):
        print(f"\ndetail: {reps[0]['state_detail']}")
    if args.name:
        for sentence in reps[0].get("health_details") or []:
            print(f"health: {sentence}")
    if args.name:
        rep = reps[0]
        size = sum(d["size_bytes"] for d in rep["disks"])
        print(f"\ndisks: {len(rep['disks'])}, {human_bytes(size)} in {rep['storage']}")
        print(f"recovery points: {rep['recovery_points']} ({human_bytes(rep['recovery_points_bytes'])} of undo data); "
              f"history {rep['recovery_history']} hourly, fine window {rep['fine_window_min']} min, "
              f"application-consistent every {rep['app_consistent_hours'] or '-'} h")
        test = rep.get("test_failover")
        print(f"test failover: {test['test_vm'] + ' at point ' + str(test['recovery_point']['id']) if test else '-'}"
              f" (last started {rep['last_test_failover_time'] or 'never'})")
        fo = rep.get("failover")
        if fo:
            print(f"failover: to recovery point {fo['recovery_point']} (cycle {fo['point_sequence']}), {fo['step']}, "
                  f"generation {fo['old_generation']} -> {rep['generation']}{' (forced)' if fo['forced'] else ''}")
    return 0


def cmd_replica_remove(args) -> int:
    query = "?delete_storage=1" if args.delete_storage else ""
    result = _client(args).request("DELETE", f"/v1/replicas/{args.name}{query}")
    if args.output == "json":
        emit_json(result)
    else:
        kept = "deleted" if result["storage_deleted"] else f"kept in {result['storage']}"
        print(f"removed replica {args.name} (storage {kept})")
    return 0


def cmd_replica_resume(args) -> int:
    result = _client(args).request("POST", f"/v1/replicas/{args.name}/{args.verb_route}")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"replica {args.name} is {result['state']}")
    return 0
