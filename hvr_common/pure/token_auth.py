"""Token authentication ("Kerberos-like" mode): HMAC-SHA256 signed requests.

Each primary holds a key: a principal name and a 32-byte secret, shared with
the replica server (``hvrctl key new`` / ``hvrctl server key add``).  Every
request carries::

    Authorization: HVR1-HMAC-SHA256 principal=<name>,ts=<unix seconds>,nonce=<32 hex>,sig=<64 hex>
    X-Hvr-Content-SHA256: <hex SHA-256 of the body>

where ``sig`` is HMAC-SHA256(secret, canonical request) and the canonical
request is the newline-joined method, path (with query), body digest,
timestamp and nonce.  A principal may have two keys installed at once (a
rotation: the new key added, the primary switched, the old key removed); a
signature made with either is accepted.  The server refuses (401, with the reason) a missing or
malformed header, an unknown principal, a timestamp more than
``MAX_SKEW_S`` away from its clock, a nonce it has seen within the window,
and a wrong signature.  The body digest is checked against the body itself by
whoever reads the body (a mismatch is a 400: the request was authentic but
damaged).

Pure: time and the key lookup are passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hvr_common.pure.errors import HvrError, TransientError
from hvr_common.pure.wire.routes import AUTHORIZATION_HEADER, CONTENT_DIGEST_HEADER

SCHEME = "HVR1-HMAC-SHA256"
MAX_SKEW_S = 300
SECRET_BYTES = 32
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_HEADER_RE = re.compile(
    r"^" + re.escape(SCHEME) +
    r" principal=(?P<principal>[A-Za-z0-9._@-]{1,255}),ts=(?P<ts>[0-9]{1,12}),"
    r"nonce=(?P<nonce>[0-9a-f]{32}),sig=(?P<sig>[0-9a-f]{64})\Z")
PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,254}\Z")  # \Z: a trailing newline is refused


class AuthError(HvrError):
    """The request is not authenticated (HTTP 401)."""

    code = "unauthenticated"
    exit_code = 77  # EX_NOPERM


class SignedBeforeStartError(TransientError):
    """Signed before this server started: its replay cache cannot vouch for it (HTTP 503).

    The sender signs again and retries; a captured request cannot be replayed
    after a restart.
    """

    code = "signed_before_restart"


@dataclass(frozen=True)
class Key:
    principal: str
    secret: bytes

    @property
    def key_id(self) -> str:
        """A public name of the key (16 hex digits), to tell two keys of a principal apart."""
        return key_id(self.secret)

    @staticmethod
    def generate(principal: str) -> "Key":
        check_principal(principal)
        return Key(principal, secrets.token_bytes(SECRET_BYTES))


def key_id(secret: bytes) -> str:
    """16 hex digits derived from ``secret`` one way: it names the key and reveals nothing of it."""
    return hashlib.sha256(b"hvr key id\0" + secret).hexdigest()[:16]


def check_principal(principal: str) -> None:
    if not isinstance(principal, str) or not PRINCIPAL_RE.fullmatch(principal):
        raise AuthError(f"principal {principal!r:.80} is not valid",
                        hint="use letters, digits, '.', '_', '@' or '-', e.g. the host's FQDN")


def canonical_request(method: str, path: str, body_sha256: str, ts: int, nonce: str) -> bytes:
    return "\n".join([method.upper(), path, body_sha256, str(ts), nonce]).encode()


def sign(key: Key, method: str, path: str, body_sha256: str, ts: int, nonce: str) -> str:
    return hmac.new(key.secret, canonical_request(method, path, body_sha256, ts, nonce), hashlib.sha256).hexdigest()


def authorization(key: Key, method: str, path: str, body_sha256: str, ts: int, nonce: str | None = None) -> str:
    nonce = nonce or secrets.token_hex(16)
    sig = sign(key, method, path, body_sha256, ts, nonce)
    return f"{SCHEME} principal={key.principal},ts={ts},nonce={nonce},sig={sig}"


class ReplayCache:
    """Nonces seen within the skew window, bounded in size (oldest forgotten first)."""

    def __init__(self, window_s: int = 2 * MAX_SKEW_S, max_entries: int = 200_000):
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()

    def check_and_add(self, principal: str, nonce: str, now: int) -> None:
        while self._seen:
            (_, oldest_ts) = next(iter(self._seen.items()))
            if oldest_ts >= now - self.window_s and len(self._seen) < self.max_entries:
                break
            self._seen.popitem(last=False)
        key = (principal, nonce)
        if key in self._seen:
            raise AuthError("request was replayed (nonce already used)",
                            hint="each request needs a fresh nonce; check for a proxy resending requests")
        self._seen[key] = now


def verify(header: str | None, method: str, path: str, body_sha256: str | None, now: int,
           lookup: Callable[[str], Key | Sequence[Key] | None], cache: ReplayCache, not_before: int = 0) -> str:
    """Return the authenticated principal or raise :class:`AuthError` saying why not.

    ``lookup`` gives the principal's key, or its keys (a signature by any of them is accepted).
    """
    if not header:
        raise AuthError(f"request is not signed (no {AUTHORIZATION_HEADER} header)",
                        hint="the primary needs a key: hvrctl key new, then hvrctl server key add on the replica")
    m = _HEADER_RE.match(header.strip())
    if m is None:
        raise AuthError(f"{AUTHORIZATION_HEADER} header is malformed (expected {SCHEME} principal=,ts=,nonce=,sig=)")
    if not body_sha256 or not re.fullmatch(r"[0-9a-f]{64}", body_sha256):
        raise AuthError(f"request lacks a valid {CONTENT_DIGEST_HEADER} header")
    principal, ts, nonce, sig = m["principal"], int(m["ts"]), m["nonce"], m["sig"]
    if abs(now - ts) > MAX_SKEW_S:
        raise AuthError(f"request timestamp is {now - ts:+d} s from the server's clock (limit ±{MAX_SKEW_S} s)",
                        hint="synchronise the clocks of both hosts (NTP)")
    found = lookup(principal)
    keys = (found,) if isinstance(found, Key) else tuple(found or ())
    if not keys:
        raise AuthError(f"principal {principal!r} is not known to this replica server",
                        hint="add its key on the replica: hvrctl server key add FILE")
    matches = [hmac.compare_digest(sign(key, method, path, body_sha256, ts, nonce), sig) for key in keys]
    if not any(matches):
        raise AuthError("signature does not match (wrong key, or the request was altered)")
    if ts < not_before:
        raise SignedBeforeStartError("request was signed before this replica server started",
                                     hint="sign it again and retry (agents do this by themselves)")
    cache.check_and_add(principal, nonce, now)
    return principal
