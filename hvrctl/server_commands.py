"""``hvrctl server ...``, ``hvrctl key ...`` and ``hvrctl replica ...``: the replica server side."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

from hvr_common.pure.errors import UsageError
from hvr_common.shell.key_file import read_key, write_key
from hvr_common.pure.token_auth import Key
from hvrctl import adopt_commands
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
    p.set_defaults(func=cmd_server_get)
    p = ssub.add_parser("set", parents=[common], help="change replica server settings",
                        description="Change settings; all given changes are validated first and applied together.")
    p.add_argument("--enabled", metavar="true|false", help="accept replication at all")
    p.add_argument("--auth", metavar="MODES", help="accepted authentication modes, comma-separated (token)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address and port of the replication API (rebinds now)")
    p.add_argument("--storage", metavar="PATH", help="default storage location for new replicas")
    p.add_argument("--allow-any", metavar="true|false",
                   help="accept replication from any authenticated primary")
    p.set_defaults(func=cmd_server_set)

    key = ssub.add_parser("key", parents=[common], help="keys of primaries allowed to authenticate",
                          description="Install, list and remove primaries' token keys on this server.")
    ksub = key.add_subparsers(dest="key_verb", metavar="VERB", required=True)
    p = ksub.add_parser("add", parents=[common], help="install a primary's key file",
                        description="Install the key made by 'hvrctl key new' so that primary can authenticate.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--replace", action="store_true", help="replace an installed key of the same principal")
    p.set_defaults(func=cmd_key_add)
    p = ksub.add_parser("remove", parents=[common], help="remove a primary's key",
                        description="Remove a principal's key: its requests are refused from now on.")
    p.add_argument("principal", metavar="PRINCIPAL")
    p.set_defaults(func=cmd_key_remove)
    p = ksub.add_parser("list", parents=[common], help="list installed keys (principals only)")
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
    p = rsub.add_parser("resume", parents=[common], help="leave Error and apply stored cycles again",
                        description="After the cause of an Error was fixed, apply the stored cycles again.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_replica_resume)
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
                  ("allow any authenticated", view["allow_any_authenticated"]), ("installed keys", view["keys"])]))
    return 0


def cmd_server_get(args) -> int:
    return _server_view(args, _client(args).request("GET", "/v1/server"))


def cmd_server_set(args) -> int:
    changes: dict = {}
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
    if not changes:
        raise UsageError("nothing to change", hint="see hvrctl server set --help")
    return _server_view(args, _client(args).request("PATCH", "/v1/server", changes))


def cmd_key_add(args) -> int:
    key = read_key(args.file)
    result = _client(args).request("POST", "/v1/keys", {"principal": key.principal,
                                                       "secret": base64.b64encode(key.secret).decode(),
                                                       "replace": args.replace})
    if args.output == "json":
        emit_json(result)
    else:
        print(f"{'replaced' if result['replaced'] else 'installed'} key of {key.principal}")
    return 0


def cmd_key_remove(args) -> int:
    result = _client(args).request("DELETE", f"/v1/keys/{args.principal}")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"removed key of {args.principal}")
    return 0


def cmd_key_list(args) -> int:
    keys = _client(args).request("GET", "/v1/keys")
    if args.output == "json":
        emit_json(keys)
    else:
        print(table([{"principal": k["principal"], "added": _time(k["added_ns"])} for k in keys],
                    [("PRINCIPAL", "principal"), ("ADDED", "added")]))
    return 0


def cmd_key_new(args) -> int:
    key = Key.generate(args.principal)
    write_key(key, args.out, overwrite=args.force)
    if args.output == "json":
        emit_json({"principal": key.principal, "file": str(args.out)})
    else:
        print(f"wrote a new key for {key.principal} to {args.out} (mode 0600)")
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
    rows = [{"name": r["name"], "state": r["state"], "primary": r["primary_server"],
             "gen": r["generation"], "received": r["last_received_sequence"], "applied": r["last_applied_sequence"],
             "last_replication": _time(r["last_replication_time_ns"]),
             "last_applied_log": _time(r["last_applied_log_time_ns"])} for r in reps]
    print(table(rows, [("NAME", "name"), ("STATE", "state"), ("PRIMARY", "primary"), ("GEN", "gen"),
                       ("RECEIVED", "received"), ("APPLIED", "applied"), ("LAST REPLICATION", "last_replication"),
                       ("LAST APPLIED LOG", "last_applied_log")]))
    if args.name and reps[0].get("state_detail"):
        print(f"\ndetail: {reps[0]['state_detail']}")
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
    result = _client(args).request("POST", f"/v1/replicas/{args.name}/resume")
    if args.output == "json":
        emit_json(result)
    else:
        print(f"replica {args.name} is {result['state']}")
    return 0
