"""The agent's TLS context of one replication, built again when its files are replaced.

A primary rotates its certificate (or the CA bundle it trusts) by replacing
the files in place, as it rotates a token key (:class:`hvr_common.shell.key_file.KeyFile`).
:meth:`ClientTls.current` looks at the identity of each file (inode, size,
modification and change times); when one moved, it checks the files again
(:meth:`TlsFiles.check`: valid now, clientAuth, key readable by its owner
only and belonging to the certificate) and builds a new context.  The
client's next connection presents the new certificate; connections already
open keep theirs until they close.  Files that cannot be used (for a moment
between writing the certificate and its key, or for good) leave the last
good context in use, reported through ``on_problem`` once per change.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

from hvr_common.pure.errors import HvrError
from hvr_common.shell.certificate_files import CLIENT, TlsFiles
from hvr_common.shell.tls_contexts import client_context


class ClientTls:
    def __init__(self, files: TlsFiles, context: ssl.SSLContext,
                 on_problem: Callable[[HvrError], None] | None = None):
        self.files = files
        self._context = context
        self._on_problem = on_problem
        self._identity = self._stat()

    def _stat(self) -> tuple:
        out = []
        for path in (self.files.ca, self.files.cert, self.files.key):
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            out.append(None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def current(self) -> ssl.SSLContext:
        """The context for the next connection (a new one once the files changed and are usable)."""
        identity = self._stat()
        if identity != self._identity:
            self._identity = identity
            try:
                self.files.check(CLIENT)
                self._context = client_context(self.files)
            except HvrError as exc:
                self._report(exc)
            except (ssl.SSLError, OSError) as exc:
                self._report(HvrError(f"the TLS files cannot be loaded: {exc}"))
        return self._context

    def _report(self, exc: HvrError) -> None:
        if self._on_problem is not None:
            self._on_problem(exc)


def tls_refusal(exc: Exception) -> str | None:
    """What a certificate refusal in the handshake said (ours of the server's, or the server's alert), else None."""
    cause = getattr(exc, "os_error", None) or exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return cause.verify_message or str(cause)
    if isinstance(cause, ssl.SSLError) and "ALERT" in (cause.reason or "").upper():
        return cause.reason.lower().replace("_", " ")
    return None
