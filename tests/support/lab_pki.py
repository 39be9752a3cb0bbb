"""Certificates for the TLS tests, made with the lab CA of ``hvrctl cert`` (real files, real chains)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from pathlib import Path

from hvr_common.shell.certificate_authority import issue, new_ca

SERVER_NAME = "localhost"  # the test listeners answer on 127.0.0.1; clients connect to "localhost"


class LabPki:
    """Two CAs (``ca`` trusted, ``other_ca`` not) and the certificates a test asks for."""

    def __init__(self, root: Path):
        self.root = root
        self.ca_dir = root / "ca"
        self.other_ca_dir = root / "other-ca"
        self.ca = new_ca(self.ca_dir)
        new_ca(self.other_ca_dir, "another lab CA")
        self.server_cert, self.server_key = self.issue(SERVER_NAME, "server")

    def issue(self, host: str, usage: str, *, ca_dir: Path | None = None, folder: str | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              overwrite: bool = False) -> tuple[Path, Path]:
        """A certificate and its key; ``overwrite`` replaces the files of an earlier one (a rotation)."""
        return issue(ca_dir or self.ca_dir, host, self.root / (folder or f"{host}-{usage}"), usage,
                     not_before=not_before, not_after=not_after, overwrite=overwrite)

    @staticmethod
    def fingerprint(cert: Path) -> str:
        """The SHA-256 of the certificate's DER, as the listener logs it for each new connection."""
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()

    def listener_config(self) -> dict:
        return {"tls_cert": str(self.server_cert), "tls_key": str(self.server_key), "tls_ca": str(self.ca)}

    def client_context(self, cert: tuple[Path, Path] | None = None, *,
                       maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client that trusts the lab CA, presents ``cert`` if given, and speaks up to ``maximum``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.ca))
        if maximum is not None:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = maximum
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx
