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

    def issue_odd(self, folder: str, *, common_name: str | None, san: str | None,
                  client_auth: bool) -> tuple[Path, Path]:
        """A client certificate the lab tooling would not make, signed by the trusted CA: no extended key usage
        at all (``client_auth`` false), and/or no host name (no SAN, a CN that is not a host name or none)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        ca_key = serialization.load_pem_private_key((self.ca_dir / "ca-key.pem").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        builder = (x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2)))
        if client_auth:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        out = self.root / folder
        out.mkdir(mode=0o700)
        cert_path, key_path = out / "cert.pem", out / "key.pem"
        cert_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

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
