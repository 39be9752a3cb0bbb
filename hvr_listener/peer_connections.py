"""Open connections of authenticated primaries, so that a revoked principal loses them at once.

The replication API notes each connection with the principal its last
request authenticated as.  After a key, an authorization entry, a setting
or (in certificate mode) a trusted CA is removed or changed, the daemon
calls :meth:`PeerConnections.close_revoked` with the rule that still holds:
every open connection whose principal it refuses is closed, a request in
flight on it included.  Each new request is authenticated and authorised
again anyway; closing the connections ends what is under way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

from hvr_common.shell.logs import event

log = logging.getLogger("hvr.listener.api")

# (principal, transport) -> still allowed?  A transport is given so a certificate rule can look at its peer.
StillAllowed = Callable[[str, asyncio.BaseTransport], bool]


class PeerConnections:
    def __init__(self) -> None:
        self._principal_of: dict[asyncio.BaseTransport, str] = {}

    def note(self, transport: asyncio.BaseTransport | None, principal: str) -> None:
        """``transport`` carries requests of ``principal`` (called after each authenticated request)."""
        if transport is None or transport.is_closing():
            return
        if transport not in self._principal_of:
            event(log, "peer_connection_opened", principal=principal, certificate_sha256=_certificate_sha256(transport))
        self._principal_of[transport] = principal
        if len(self._principal_of) > 64 and len(self._principal_of) & 63 == 0:
            self._forget_closed()

    def _forget_closed(self) -> None:
        for transport in [t for t in self._principal_of if t.is_closing()]:
            del self._principal_of[transport]

    def principals(self) -> dict[str, int]:
        """Open connections per principal."""
        self._forget_closed()
        out: dict[str, int] = {}
        for principal in self._principal_of.values():
            out[principal] = out.get(principal, 0) + 1
        return out

    def close_revoked(self, still_allowed: StillAllowed, reason: str) -> int:
        """Close every open connection whose principal ``still_allowed`` refuses; returns how many."""
        self._forget_closed()
        closed = 0
        for transport, principal in list(self._principal_of.items()):
            if still_allowed(principal, transport):
                continue
            del self._principal_of[transport]
            transport.abort()
            closed += 1
            event(log, "peer_connection_closed", principal=principal, reason=reason)
        return closed


def _certificate_sha256(transport: asyncio.BaseTransport) -> str | None:
    """The fingerprint of the client certificate the connection presented (which one, during a rotation)."""
    tls = transport.get_extra_info("ssl_object")
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    return hashlib.sha256(der).hexdigest() if der else None
