"""TLS 1.3 contexts of the replication API: the listener's and the agent's.

Only TLS 1.3 is offered or accepted.  The listener presents its certificate
and, in certificate mode, requires a client certificate that chains to its CA
bundle (OpenSSL refuses one whose extended key usage excludes clientAuth;
:func:`hvr_common.shell.certificate_files.peer_principal` also requires it
present).  The agent verifies the listener's certificate against its CA
bundle, its serverAuth usage and the host name of ``--replica-server``.
"""

from __future__ import annotations

import ssl

from hvr_common.shell.certificate_files import TlsFiles


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(files: TlsFiles, *, require_client_cert: bool) -> ssl.SSLContext:
    """The listener's context; without ``require_client_cert`` a client certificate is optional (token mode)."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The agent's context: verifies the server (CA, serverAuth, host name); presents ``files.cert`` if any."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=str(files.ca))
    if files.cert is not None:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx
