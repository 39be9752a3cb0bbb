"""Certificate, private key and CA bundle files of certificate authentication (PEM).

Checked when a daemon starts, by ``--check-config`` and when an operator
names them: each must be readable; a certificate must be valid now and carry
the extended key usage of its role (``serverAuth`` for the replica server,
``clientAuth`` for a primary); a private key must be readable by its owner
only and belong to the certificate.  Every refusal is a
``certificate_invalid`` error naming the file, with a hint.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.pure.principal_names import principal_of
from hvr_common.pure.wire.error_catalogue import error

SERVER = "server"
CLIENT = "client"
_USAGE_OID = {SERVER: ExtendedKeyUsageOID.SERVER_AUTH, CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH}
_USAGE_NAME = {SERVER: "serverAuth", CLIENT: "clientAuth"}


def _invalid(message: str, hint: str) -> HvrError:
    return error("certificate_invalid", message, hint=hint)


def _read(path: Path, what: str) -> bytes:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _invalid(f"{what} {path} is not a file", f"give the path of the PEM {what}")
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise _invalid(f"{what} {path} does not exist", "hvrctl cert issue makes one for a lab") from None
    except PermissionError:
        raise _invalid(f"{what} {path} is not readable by this user",
                       f"let the daemon's user read it (chown/chmod {path})") from None


def certificate_principal(cert: x509.Certificate) -> str:
    """The principal the certificate names (first SAN DNS name, else CN)."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        dns = list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns = []
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns and isinstance(cns[0].value, str) else None
    return principal_of(dns, cn)


def has_usage(cert: x509.Certificate, usage: str) -> bool:
    """True when the certificate's extended key usage names ``usage`` (server or client)."""
    try:
        eku = cert.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value
    except x509.ExtensionNotFound:
        return False
    return _USAGE_OID[usage] in eku


def check_certificate(path: Path, usage: str, now: dt.datetime | None = None) -> x509.Certificate:
    """The first certificate of ``path``, refused unless valid at ``now`` and made for ``usage``."""
    raw = _read(path, "certificate file")
    try:
        cert = x509.load_pem_x509_certificates(raw)[0]
    except ValueError:
        raise _invalid(f"certificate file {path} holds no PEM certificate", "give a PEM (BEGIN CERTIFICATE) file") \
            from None
    now = now or dt.datetime.now(dt.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise _invalid(f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                       "check the host's clock, or issue a certificate valid now")
    if now >= cert.not_valid_after_utc:
        raise _invalid(f"certificate {path} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                       "issue a new certificate (hvrctl cert issue, or your PKI)")
    if not has_usage(cert, usage):
        raise _invalid(f"certificate {path} lacks the {_USAGE_NAME[usage]} extended key usage",
                       f"issue it for a {'replica server' if usage == SERVER else 'primary'} "
                       f"(hvrctl cert issue ... --{usage})")
    try:
        certificate_principal(cert)
    except UsageError as exc:
        raise _invalid(f"certificate {path}: {exc.message}", exc.hint or "") from None
    return cert


def check_private_key(path: Path, cert: x509.Certificate | None = None) -> None:
    """Refuse a key file others may read, that is no unencrypted PEM key, or not the certificate's."""
    raw = _read(path, "private key file")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _invalid(f"private key file {path} is readable by others (mode {mode:04o})", f"chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise _invalid(f"private key file {path} holds no unencrypted PEM private key",
                       "give the key as PEM without a passphrase") from None
    if cert is not None and key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != cert.public_key(
            ).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise _invalid(f"private key file {path} does not belong to its certificate",
                       "give the key the certificate was issued for")


def check_ca_bundle(path: Path) -> list[x509.Certificate]:
    """The certificates of the CA bundle ``path``, refused unless it holds at least one."""
    raw = _read(path, "CA bundle")
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError:
        raise _invalid(f"CA bundle {path} holds no PEM certificate", "give the PEM file of the issuing CA(s)") \
            from None


MAX_CHAIN_DEPTH = 8


def chains_to(der: bytes, bundle: list[x509.Certificate]) -> bool:
    """Whether the certificate ``der`` was issued by a CA of ``bundle``, through CAs of the bundle up to a
    self-signed one (the handshake's rule, checked again when the bundle changes under an open connection)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    for _ in range(MAX_CHAIN_DEPTH):
        issuer = next((ca for ca in bundle if _issued(cert, ca)), None)
        if issuer is None:
            return False
        if issuer.issuer == issuer.subject:
            return True
        cert = issuer
    return False


def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if ca.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class TlsFiles:
    """One side's files: its certificate and key (None: server-authenticated TLS only) and the CAs it trusts."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def check(self, usage: str) -> str | None:
        """Refuse any unusable file; the principal of the certificate (None without one)."""
        check_ca_bundle(self.ca)
        if self.cert is None:
            return None
        cert = check_certificate(self.cert, usage)
        if self.key is None:
            raise _invalid(f"certificate {self.cert} is given without its private key", "give the key file too")
        check_private_key(self.key, cert)
        return certificate_principal(cert)


def peer_principal(der: bytes | None) -> str:
    """The principal of a primary's verified certificate (DER); 401 unless it carries clientAuth."""
    if not der:
        raise error("unauthenticated", "no client certificate was presented",
                    hint="give the primary a certificate (hvrctl vm enable --auth certificate --cert ...)")
    cert = x509.load_der_x509_certificate(der)
    if not has_usage(cert, CLIENT):
        raise error("unauthenticated", "the client certificate lacks the clientAuth extended key usage",
                    hint="issue the primary's certificate with clientAuth (hvrctl cert issue ... --client)")
    try:
        return certificate_principal(cert)
    except UsageError as exc:
        raise error("unauthenticated", exc.message, hint=exc.hint) from None
