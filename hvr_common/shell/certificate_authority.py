"""A lab certificate authority: a CA key and certificate in a folder, and certificates it issues.

For trying certificate authentication without a PKI (``hvrctl cert``); a
production site issues with its own PKI (``docs/security.md``).  Keys are
ECDSA P-256; folders are created 0700 and every file 0600, whatever the
umask.  A CA folder holds ``ca.pem`` and ``ca-key.pem``; an issued folder
``HOST.pem``, ``HOST-key.pem`` and a copy of the CA as ``ca.pem``.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hvr_common.pure.errors import ConflictError, UsageError
from hvr_common.pure.principal_names import is_dns_name
from hvr_common.shell.certificate_files import check_private_key
from hvr_common.shell.files import write_private_file

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CA_DAYS = 3650
ISSUED_DAYS = 825
USAGES = {"server": (ExtendedKeyUsageOID.SERVER_AUTH,), "client": (ExtendedKeyUsageOID.CLIENT_AUTH,),
          "both": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)}


def _private_dir(path: Path) -> None:
    """``path`` and every folder made on the way to it: 0700 whatever the umask (``mkdir -p`` would give
    the parents the umask's mode, 0777 under umask 000)."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        for folder in missing:
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(folder, 0o700)
        if not path.is_dir():
            raise NotADirectoryError(path)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{path} exists and is not a folder") from None
    except PermissionError:
        raise UsageError(f"cannot create folder {path}: permission denied",
                         hint="run as a user who may write there, or choose another folder") from None
    os.chmod(path, 0o700)


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` (0600); ``overwrite`` writes a temporary file and renames it over ``path``, so
    a reader (an agent following its replaced certificate) sees the old file or the new one, never a part."""
    if not overwrite and path.exists():
        raise ConflictError(f"{path} already exists", hint="choose another folder, or --force")
    write_private_file(path, data, overwrite=overwrite, exists_hint="choose another folder, or --force")


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_ca(folder: Path, name: str = "hvr lab CA", *, overwrite: bool = False) -> Path:
    """Create a CA in ``folder``; the path of its certificate."""
    _private_dir(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(folder / CA_KEY, _key_pem(key), overwrite)
    _write_private(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), overwrite)
    return folder / CA_CERT


def _load_ca(folder: Path):
    if not (folder / CA_KEY).is_file() or not (folder / CA_CERT).is_file():
        raise UsageError(f"{folder} is not a CA folder (no {CA_KEY} and {CA_CERT})",
                         hint="create one: hvrctl cert ca new DIR")
    try:
        check_private_key(folder / CA_KEY)
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    except OSError as exc:
        raise UsageError(f"{folder} is not a CA folder: {exc.strerror}", hint="create one: hvrctl cert ca new DIR") \
            from None
    except ValueError as exc:
        raise UsageError(f"{folder} is not a CA folder: {exc}", hint="create one: hvrctl cert ca new DIR") from None
    return key, cert


def issue(ca_folder: Path, hostname: str, out: Path, usage: str, *, overwrite: bool = False,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          san: bool = True) -> tuple[Path, Path]:
    """Issue a certificate for ``hostname`` with ``usage`` (server, client or both) into ``out``.

    ``not_before``/``not_after`` and ``san`` exist for tests of refusals.
    Returns the paths of the certificate and its key.
    """
    if not is_dns_name(hostname):
        raise UsageError(f"{hostname!r} is not a host name", hint="give the host's DNS name, e.g. host1.example.com")
    if usage not in USAGES:
        raise UsageError(f"usage must be one of {', '.join(USAGES)}")
    ca_key, ca_cert = _load_ca(ca_folder)
    _private_dir(out)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before or now - dt.timedelta(minutes=5))
               .not_valid_after(not_after or now + dt.timedelta(days=ISSUED_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage(list(USAGES[usage])), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = out / f"{hostname}.pem", out / f"{hostname}-key.pem"
    _write_private(key_path, _key_pem(key), overwrite)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite)
    _write_private(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), True)
    return cert_path, key_path
