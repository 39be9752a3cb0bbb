"""How the agent authenticates to a replica server, and how it protects the connection.

Three ways (``docs/security.md``):

* ``token`` over plain HTTP: every request signed with the key file's
  secret; authenticated and integrity-protected, not encrypted;
* ``token`` with ``tls``: the same signatures inside TLS 1.3 that verifies
  the replica server's certificate (CA bundle, serverAuth, host name);
* ``certificate``: mutual TLS 1.3; the agent presents its certificate
  (clientAuth), whose host name is its principal, and signs nothing.

Files are checked (readable, valid now, right usage, key readable by its
owner only) when replication is enabled and whenever the replication task
starts; replaced while it runs, they are checked again and used from the next
connection on (:class:`hvr_agent.client_tls.ClientTls`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from hvr_common.pure.errors import UsageError
from hvr_common.pure.token_auth import Key
from hvr_common.shell.certificate_files import CLIENT, TlsFiles
from hvr_common.shell.key_file import read_key
from hvr_common.shell.tls_contexts import client_context

AUTH_MODES = ("token", "certificate")


def _absolute(name: str, value) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not Path(value).is_absolute():
        raise UsageError(f"{name} must be an absolute path, not {value!r}")
    return Path(value)


@dataclass(frozen=True)
class ReplicaCredentials:
    auth: str = "token"
    key_file: Path | None = None  # token mode
    ca_file: Path | None = None  # TLS: the CAs the replica server's certificate must chain to
    cert_file: Path | None = None  # certificate mode
    cert_key_file: Path | None = None

    @classmethod
    def of(cls, *, auth="token", key_file=None, tls=False, ca_file=None, cert_file=None,
           cert_key_file=None) -> ReplicaCredentials:
        """Validated from the enable request's fields (paths only; the files are read by :meth:`load`)."""
        if auth not in AUTH_MODES:
            raise UsageError(f"auth must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
        if not isinstance(tls, bool):
            raise UsageError("tls must be true or false")
        creds = cls(auth, _absolute("key file", key_file), _absolute("CA file", ca_file),
                    _absolute("certificate file", cert_file), _absolute("certificate key file", cert_key_file))
        if auth == "token":
            if creds.key_file is None:
                raise UsageError("token authentication needs a key file", hint="hvrctl vm enable ... --key FILE")
            if creds.cert_file or creds.cert_key_file:
                raise UsageError("a client certificate is for --auth certificate")
            if tls and creds.ca_file is None:
                raise UsageError("TLS needs the CA bundle that issued the replica server's certificate",
                                 hint="hvrctl vm enable ... --tls --ca FILE")
            if not tls and creds.ca_file is not None:
                raise UsageError("a CA bundle is for TLS: add --tls, or --auth certificate")
        else:
            if creds.key_file is not None:
                raise UsageError("a key file is for token authentication, not --auth certificate")
            if None in (creds.ca_file, creds.cert_file, creds.cert_key_file):
                raise UsageError("certificate authentication needs a certificate, its key and the CA bundle",
                                 hint="hvrctl vm enable ... --auth certificate --cert FILE --cert-key FILE --ca FILE")
        return creds

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def to_json(self) -> dict:
        return {"auth": self.auth, "tls": self.tls,
                **{k: str(v) for k, v in (("key_file", self.key_file), ("ca_file", self.ca_file),
                                          ("cert_file", self.cert_file), ("cert_key_file", self.cert_key_file))
                   if v is not None}}

    def files(self) -> TlsFiles:
        """The TLS files: the CA bundle, and in certificate mode the certificate and its key."""
        return TlsFiles(ca=self.ca_file, cert=self.cert_file, key=self.cert_key_file)

    def load(self) -> tuple[Key | None, ssl.SSLContext | None, str]:
        """Read and check the files (blocking): the signing key, the TLS context and the principal."""
        key = read_key(self.key_file) if self.auth == "token" else None
        if not self.tls:
            return key, None, key.principal
        files = self.files()
        principal = files.check(CLIENT)
        return key, client_context(files), key.principal if key is not None else principal
