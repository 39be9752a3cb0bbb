"""The flags of ``hvrctl vm enable`` that say how the primary authenticates to the replica server."""

from __future__ import annotations

from pathlib import Path

from hvr_common.pure.errors import UsageError

EXAMPLES = """examples:
  token over plain HTTP (authenticated and integrity-protected, not encrypted):
    hvrctl vm enable web1 --replica-server replica1.example.com --port 8443 --key /etc/hvr/keys/host1.key
  token inside TLS 1.3 (the replica server's certificate is verified):
    hvrctl vm enable web1 --replica-server replica1.example.com --port 8443 --key /etc/hvr/keys/host1.key \\
        --tls --ca /etc/hvr/tls/ca.pem
  certificate (mutual TLS 1.3; the certificate's host name is the principal):
    hvrctl vm enable web1 --replica-server replica1.example.com --port 8443 --auth certificate \\
        --cert /etc/hvr/tls/host1.pem --cert-key /etc/hvr/tls/host1-key.pem --ca /etc/hvr/tls/ca.pem
"""


def add_flags(p) -> None:
    p.add_argument("--auth", choices=("token", "certificate"), default="token",
                   help="token: signed requests (--key); certificate: mutual TLS 1.3 (--cert, --cert-key, --ca)")
    p.add_argument("--key", type=Path, metavar="FILE",
                   help="token mode: this primary's key file (hvrctl key new PRINCIPAL --out FILE; the replica "
                        "server knows it through hvrctl server key add)")
    p.add_argument("--tls", action="store_true",
                   help="token mode inside TLS 1.3, verifying the replica server's certificate against --ca")
    p.add_argument("--ca", type=Path, metavar="FILE", help="PEM CA bundle the replica server's certificate chains to")
    p.add_argument("--cert", type=Path, metavar="FILE",
                   help="certificate mode: this primary's certificate (clientAuth)")
    p.add_argument("--cert-key", type=Path, metavar="FILE", help="certificate mode: the certificate's key (0600)")


def _file(path: Path | None, what: str, hint: str) -> str | None:
    if path is None:
        return None
    path = path.expanduser().resolve()
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, not a file", hint="name the file itself")
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist", hint=hint)
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a regular file", hint="name the file itself")
    return str(path)


def credentials_of(args) -> dict:
    """The enable request's credential fields; the agent checks the files' contents."""
    if args.auth == "token" and args.key is None:
        raise UsageError("token authentication needs --key FILE",
                         hint="create it with hvrctl key new PRINCIPAL --out FILE, or use --auth certificate")
    body = {"auth": args.auth, "tls": bool(args.tls) or args.auth == "certificate",
            "key_file": _file(args.key, "key file", "create it with hvrctl key new PRINCIPAL --out FILE"),
            "ca_file": _file(args.ca, "CA bundle", "the CA that issued the replica server's certificate"),
            "cert_file": _file(args.cert, "certificate file", "hvrctl cert issue HOST ... --client"),
            "cert_key_file": _file(args.cert_key, "certificate key file", "hvrctl cert issue HOST ... --client")}
    return {k: v for k, v in body.items() if v is not None}
