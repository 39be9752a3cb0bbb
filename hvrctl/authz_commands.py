"""``hvrctl authz ...``: authorization entries of the replica server (*-VMReplicationAuthorizationEntry)."""

from __future__ import annotations

import argparse
import urllib.parse

from hvr_common.pure.errors import UsageError
from hvrctl.client import AdminClient
from hvrctl.output import emit_json, table

_ABOUT = ("An entry allows primaries whose name matches PATTERN (a name, or a wildcard in the first label only: "
          "*.example.com) to replicate to this server, into per-VM folders under its storage location, as "
          "members of its trust group. Entries apply while 'allow any authenticated' is off "
          "(hvrctl server set --allow-any false).")


def register(sub, common) -> None:
    authz = sub.add_parser("authz", parents=[common], help="authorization entries (allowed primaries)",
                           description=_ABOUT)
    asub = authz.add_subparsers(dest="verb", metavar="VERB", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    p = asub.add_parser("add", parents=[common], help="allow primaries matching PATTERN (New-...AuthorizationEntry)",
                        description=_ABOUT, formatter_class=raw,
                        epilog="example: hvrctl authz add '*.site1.example.com' --storage /srv/replicas/site1 "
                               "--trust-group site1")
    p.add_argument("pattern", metavar="PATTERN")
    p.add_argument("--storage", required=True, metavar="PATH", help="storage location of their new replicas")
    p.add_argument("--trust-group", required=True, metavar="NAME", help="their trust group")
    p.set_defaults(func=cmd_add)
    p = asub.add_parser("list", parents=[common], help="list authorization entries (Get-...AuthorizationEntry)",
                        epilog="example: hvrctl authz list -o json")
    p.set_defaults(func=cmd_list)
    p = asub.add_parser("set", parents=[common], help="change an entry (Set-...AuthorizationEntry)",
                        description="Change an entry's storage location (for replicas created from now on: "
                                    "existing ones stay where they are) or trust group.",
                        epilog="example: hvrctl authz set '*.site1.example.com' --storage /srv/replicas/new")
    p.add_argument("pattern", metavar="PATTERN")
    p.add_argument("--storage", metavar="PATH")
    p.add_argument("--trust-group", metavar="NAME")
    p.set_defaults(func=cmd_set)
    p = asub.add_parser("remove", parents=[common], help="remove an entry (Remove-...AuthorizationEntry)",
                        description="Remove an entry: its primaries are refused from the next request on and "
                                    "their open connections are closed. Their replicas stay.",
                        epilog="example: hvrctl authz remove '*.site1.example.com'")
    p.add_argument("pattern", metavar="PATTERN")
    p.set_defaults(func=cmd_remove)


def _client(args) -> AdminClient:
    return AdminClient(args.listener_socket, "hvr-listener")


def _route(pattern: str) -> str:
    return f"/v1/authorization/{urllib.parse.quote(pattern, safe='*')}"


def _emit(args, value) -> None:
    """JSON as it came, or a table of the entries (one entry or a list of them)."""
    if args.output == "json":
        emit_json(value)
        return
    entries = value if isinstance(value, list) else [value]
    print(table(entries, [("PATTERN", "pattern"), ("TRUST GROUP", "trust_group"), ("STORAGE", "storage")]))


def cmd_add(args) -> int:
    entry = _client(args).request("POST", "/v1/authorization", {"pattern": args.pattern, "storage": args.storage,
                                                                "trust_group": args.trust_group})
    _emit(args, entry)
    return 0


def cmd_list(args) -> int:
    entries = _client(args).request("GET", "/v1/authorization")
    _emit(args, entries)
    return 0


def cmd_set(args) -> int:
    changes = {k: v for k, v in (("storage", args.storage), ("trust_group", args.trust_group)) if v is not None}
    if not changes:
        raise UsageError("nothing to change", hint="give --storage and/or --trust-group")
    entry = _client(args).request("PATCH", _route(args.pattern), changes)
    _emit(args, entry)
    return 0


def cmd_remove(args) -> int:
    result = _client(args).request("DELETE", _route(args.pattern))
    if args.output == "json":
        emit_json(result)
    else:
        print(f"removed authorization entry {args.pattern}"
              + (f"; closed {result['connections_closed']} connection(s)" if result["connections_closed"] else ""))
    return 0
