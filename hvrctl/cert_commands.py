"""``hvrctl cert ...``: a lab certificate authority for certificate authentication."""

from __future__ import annotations

import argparse
from pathlib import Path

from hvr_common.shell.certificate_authority import CA_CERT, new_ca, issue
from hvrctl.output import emit_json, kv


def register(sub, common) -> None:
    cert = sub.add_parser("cert", parents=[common], help="lab certificates for certificate authentication",
                          description="Create a lab CA and issue server and client certificates with it. "
                                      "A production site issues them with its own PKI (docs/security.md).")
    csub = cert.add_subparsers(dest="verb", metavar="VERB", required=True)
    ca = csub.add_parser("ca", parents=[common], help="the lab CA")
    casub = ca.add_subparsers(dest="ca_verb", metavar="VERB", required=True)
    p = casub.add_parser("new", parents=[common], help="create a CA in a folder",
                         description="Create a CA key (ca-key.pem) and certificate (ca.pem) in DIR "
                                     "(folder 0700, files 0600). Keep DIR off the replica and primary hosts.",
                         epilog="example: hvrctl cert ca new /root/hvr-ca",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite an existing CA in DIR")
    p.set_defaults(func=cmd_ca_new)
    p = csub.add_parser("issue", parents=[common], help="issue a certificate for a host",
                        description="Issue a certificate for HOSTNAME (subjectAltName DNS and CN) signed by the "
                                    "CA in --ca, into --out: HOSTNAME.pem, HOSTNAME-key.pem and ca.pem. "
                                    "--server for a replica server (serverAuth), --client for a primary "
                                    "(clientAuth).",
                        epilog="examples:\n"
                               "  hvrctl cert issue replica1.example.com --ca /root/hvr-ca --out /tmp/r1 --server\n"
                               "  hvrctl cert issue host1.example.com --ca /root/hvr-ca --out /tmp/h1 --client",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hostname", metavar="HOSTNAME")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="folder of 'hvrctl cert ca new'")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the files (created 0700)")
    usage = p.add_mutually_exclusive_group(required=True)
    usage.add_argument("--server", dest="usage", action="store_const", const="server",
                       help="a replica server's certificate (serverAuth)")
    usage.add_argument("--client", dest="usage", action="store_const", const="client",
                       help="a primary's certificate (clientAuth)")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.set_defaults(func=cmd_issue)


def cmd_ca_new(args) -> int:
    path = new_ca(args.dir, overwrite=args.force)
    view = {"ca_certificate": str(path), "ca_key": str(args.dir / "ca-key.pem")}
    if args.output == "json":
        emit_json(view)
    else:
        print(kv(list(view.items())))
    return 0


def cmd_issue(args) -> int:
    cert, key = issue(args.ca, args.hostname, args.out, args.usage, overwrite=args.force)
    view = {"hostname": args.hostname, "usage": args.usage, "certificate": str(cert), "key": str(key),
            "ca_certificate": str(args.out / CA_CERT)}
    if args.output == "json":
        emit_json(view)
    else:
        print(kv(list(view.items())))
    return 0
