"""The agent's client of a replica server's replication API (``docs/replication-protocol.md``).

In token mode every request is signed: ``Authorization`` carries the HMAC
over method, path with query, body digest, timestamp and a fresh nonce.
``X-Hvr-Content-SHA256`` always carries the body's digest.  A retried
request is signed again (new timestamp and nonce), never replayed.  With a
TLS context the client speaks HTTPS (TLS 1.3); in certificate mode its
certificate authenticates it and nothing is signed
(:mod:`hvr_agent.replica_credentials`).  Journal-mode cycle uploads stream
from their spool file (``aiofiles``), with the digest computed when the spool
was written; initial windows are sent from the pieces they were built into in
memory; both set ``Content-Length``.  A bitmap-mode cycle is sent in the
streamed form: a chunked body made as it is sent (its digest header is
``routes.STREAMED_DIGEST``), then a signed commit request that carries the
body's digest and length.

Every upload body passes the agent's :class:`~hvr_agent.throttle.Throttle`
(the bandwidth cap and its schedule), and while any upload of this client is
in flight the client holds one place of the agent's parallel transfers
(``max_active_transfers``): a client is one VM's replication, so a VM counts
once however many of its windows travel together.  Both live in the
:class:`~hvr_agent.transfers.Transfers` passed in; an upload added later
(a resync) gets both by going through :meth:`ReplicaClient._request`.

Paths, headers and bodies are those of :mod:`hvr_common.pure.wire`.
Answers are mapped at this boundary (rule 5):

* 2xx: the decoded JSON body;
* 401, 403, 404, 409 and the other 4xx: a permanent :class:`ReplicaError`
  subclass carrying the server's ``code``, ``message``, ``hint``, ``detail``;
* 5xx, 429, a 4xx whose code the error catalogue calls transient (the body
  was damaged on the way: ``digest_mismatch``, ``body_truncated``), refused or
  dropped connections, timeouts: :class:`ReplicaUnavailableError` (transient:
  the caller retries with backoff), with the server's code when it gave one;
* a certificate refused in the TLS handshake by either side: a permanent
  :class:`ReplicaAuthError` with code ``tls_refused``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from hvr_common.pure.errors import ConflictError, NotFoundError, UsageError
from hvr_common.pure.input_limits import decimal
from hvr_common.pure.recovery_points import Consistency, HistorySettings
from hvr_common.pure.token_auth import Key, authorization
from hvr_common.pure.transfer_settings import TransferSettings
from hvr_common.pure.wire import routes
from hvr_common.pure.wire.error_catalogue import CATALOGUE, RemoteError, RemoteTransientError
from hvr_common.pure.wire.messages import DigestQuery, EnableRequest, HeartbeatRequest, InitialCompleteRequest
from hvr_common.shell.key_file import KeyFile
from hvr_agent import upload_body
from hvr_agent.client_tls import ClientTls, tls_refusal
from hvr_agent.transfers import Transfers

MAX_ANSWER_BYTES = 1024 * 1024


class ReplicaError(RemoteError):
    """A refusal by the replica server (permanent: retrying the same request cannot help).

    ``code`` is the replica's code; the agent's admin API passes it on as 502.
    """

    fallback_code = "replica_refused"


class ReplicaAuthError(ReplicaError):
    """401: the replica did not accept our signature."""

    fallback_code = "unauthenticated"
    exit_code = 77


class ReplicaForbiddenError(ReplicaError):
    """403: authenticated, but not allowed (server disabled, VM of another principal)."""

    fallback_code = "forbidden"
    exit_code = 77


class ReplicaNotFoundError(ReplicaError, NotFoundError):
    """404: the replica has no such VM."""

    fallback_code = "unknown_vm"


class ReplicaConflictError(ReplicaError, ConflictError):
    """409: fencing, sequence or state conflict (``code`` tells which; ``detail`` may carry offsets)."""

    fallback_code = "conflict"


class ReplicaRejectedError(ReplicaError):
    """400, 411, 413 and other 4xx: the replica refused our request as malformed or too large."""

    fallback_code = "bad_request"


class ReplicaUnavailableError(RemoteTransientError):
    """5xx, a transient 4xx (damaged on the way), connection refused or dropped, timeout: try again later."""

    fallback_code = "replica_unavailable"

    def __init__(self, message: str, *, status: int = 0, **kw):
        super().__init__(message, status=status, **kw)


_PERMANENT = {401: ReplicaAuthError, 403: ReplicaForbiddenError, 404: ReplicaNotFoundError,
              409: ReplicaConflictError}


@dataclass(frozen=True, slots=True)
class ReplicaEndpoint:
    host: str
    port: int
    tls: bool = False

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class ReplicaClient:
    """One replica server, one key or certificate.  Use as ``async with ReplicaClient(...) as client``.

    ``key`` is a key, or a :class:`KeyFile` whose current key signs each request
    (the key file replaced: the next request is signed with the new key); None:
    certificate mode (``ssl_context`` carries the certificate; a :class:`ClientTls`
    gives each new connection the files that replaced the old ones).
    """

    def __init__(self, endpoint: ReplicaEndpoint, key: Key | KeyFile | None, *,
                 ssl_context: ssl.SSLContext | ClientTls | None = None, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 300.0, clock=time.time, transfers: Transfers | None = None):
        if (ssl_context is not None) != endpoint.tls or (key is None and ssl_context is None):
            raise ValueError("a TLS endpoint needs a TLS context, and certificate mode needs TLS")
        self.endpoint = endpoint
        self.transfers = transfers if transfers is not None else Transfers(TransferSettings())
        self._uploads = 0  # uploads of this client in flight (it holds a transfer place while > 0)
        self._place_lock = asyncio.Lock()
        self._key = key
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    @property
    def key(self) -> Key | None:
        return self._key.current() if isinstance(self._key, KeyFile) else self._key

    def _tls(self) -> ssl.SSLContext | None:
        """The TLS context of the next connection (a :class:`ClientTls` follows its replaced files)."""
        return self._ssl.current() if isinstance(self._ssl, ClientTls) else self._ssl

    async def __aenter__(self) -> ReplicaClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False,
                                              connector=aiohttp.TCPConnector(limit=4, force_close=False,
                                                                             ssl=self._tls() or True))
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- routes ----------------------------------------------------------------------------
    async def enable(self, vm_id: uuid.UUID, request: EnableRequest) -> tuple[int, dict]:
        """PUT /v1/replicas/{vm_id}: (status, body); 201 created, 200 identical record present."""
        return await self._request("PUT", routes.replica_path(vm_id), json_body=request.to_json())

    async def replica_state(self, vm_id: uuid.UUID) -> dict:
        """GET /v1/replicas/{vm_id}: the replica's view (``ReplicaView.to_json()``)."""
        return await self._json("GET", routes.replica_path(vm_id))

    async def send_initial_window(self, vm_id: uuid.UUID, disk_id: uuid.UUID, start: int, end: int,
                                  generation: int, pieces: Sequence[bytes], sha256: str, size_bytes: int) -> dict:
        """PUT one initial window held in memory as ``pieces`` (header first)."""
        path = routes.initial_window_path(vm_id, disk_id, start, end)
        _, body = await self._request("PUT", path, upload=(pieces, sha256, size_bytes),
                                      headers={routes.GENERATION_HEADER: str(generation)})
        return body

    async def complete_initial(self, vm_id: uuid.UUID, generation: int, next_sequence: int) -> dict:
        return await self._json("POST", routes.initial_complete_path(vm_id),
                                InitialCompleteRequest(generation, next_sequence).to_json())

    async def send_cycle(self, vm_id: uuid.UUID, sequence: int, generation: int, spool: Path, sha256: str,
                         size_bytes: int, consistency: Consistency = Consistency.CRASH) -> tuple[int, dict]:
        """PUT /v1/replicas/{vm_id}/cycles/{sequence}: (status, body); 201 stored, 200 already stored."""
        return await self._request("PUT", routes.cycle_path(vm_id, sequence, consistency.value),
                                   upload=(spool, sha256, size_bytes),
                                   headers={routes.GENERATION_HEADER: str(generation)})

    async def stream_cycle(self, vm_id: uuid.UUID, sequence: int, generation: int, body) -> dict:
        """PUT /v1/replicas/{vm_id}/cycles/{sequence}/stream: the chunked body (an async iterator of
        bytes); the replica answers 202 with the digest and length it received (nothing is stored yet)."""
        try:
            _, answer = await self._request("PUT", routes.cycle_stream_path(vm_id, sequence),
                                            upload=(body, routes.STREAMED_DIGEST, None),
                                            headers={routes.GENERATION_HEADER: str(generation)})
        except ReplicaError as exc:
            if exc.code != "http_error":
                raise
            raise ReplicaRejectedError(f"{exc.message}: replica server {self.endpoint} does not take streamed "
                                       "cycles (bitmap tracking), it is older than this agent", status=exc.status,
                                       remote_code="http_error",
                                       hint="upgrade hvr-listener on the replica host, or track the VM by journal "
                                            "(hvrctl vm set-tracking NAME journal)") from None
        return answer

    async def commit_cycle(self, vm_id: uuid.UUID, sequence: int, generation: int, sha256: str, size_bytes: int,
                           consistency: Consistency = Consistency.CRASH) -> tuple[int, dict]:
        """POST /v1/replicas/{vm_id}/cycles/{sequence}/commit: (status, body); 201 stored, 200 already stored."""
        return await self._request("POST", routes.cycle_commit_path(vm_id, sequence, consistency.value),
                                   json_body={"sha256": sha256, "bytes": size_bytes},
                                   headers={routes.GENERATION_HEADER: str(generation)})

    async def set_settings(self, vm_id: uuid.UUID, generation: int, settings: HistorySettings) -> dict:
        """PUT /v1/replicas/{vm_id}/settings: the recovery history settings; the replica answers them."""
        _, answer = await self._request("PUT", routes.replica_settings_path(vm_id), json_body=settings.to_json(),
                                        headers={routes.GENERATION_HEADER: str(generation)})
        return answer

    async def heartbeat(self, vm_id: uuid.UUID, generation: int, beat: HeartbeatRequest) -> dict:
        """POST /v1/replicas/{vm_id}/heartbeat: the replica's generation and state."""
        return (await self._request("POST", routes.heartbeat_path(vm_id), json_body=beat.to_json(),
                                    headers={routes.GENERATION_HEADER: str(generation)}))[1]

    # --- the request shell -----------------------------------------------------------------
    async def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        _, answer = await self._request(method, path, json_body=body)
        return answer

    async def digests(self, vm_id: uuid.UUID, disk_id: uuid.UUID, query: DigestQuery) -> tuple[bytes, int]:
        """POST /v1/replicas/{vm_id}/digests/{disk_id}: the nodes' digests (concatenated) and the
        replica's last applied sequence when they were read."""
        path = routes.digests_path(vm_id, disk_id)
        status, raw, headers = await self._exchange("POST", path, json_body=query.to_json())
        if not 200 <= status < 300:
            _answer(status, raw, f"POST {path} on replica server {self.endpoint}")
        try:  # ASCII digits in range: str.isdigit() also takes '²', which int() refuses
            applied = decimal(headers.get(routes.APPLIED_SEQUENCE_HEADER), routes.APPLIED_SEQUENCE_HEADER)
        except UsageError as exc:
            raise ReplicaUnavailableError(f"replica server {self.endpoint} answered digests: {exc}", status=status)
        return raw, applied

    async def complete_resync(self, vm_id: uuid.UUID, generation: int, next_sequence: int) -> dict:
        """POST /v1/replicas/{vm_id}/resync/complete: the replica drops what the resync replaced."""
        return await self._json("POST", routes.resync_complete_path(vm_id),
                                {"generation": generation, "next_sequence": next_sequence})

    async def _request(self, method: str, path: str, *, json_body: dict | None = None,
                       upload: tuple[Path | Sequence[bytes] | AsyncIterator[bytes], str, int | None] | None = None,
                       headers: dict | None = None) -> tuple[int, dict]:
        status, raw, _ = await self._exchange(method, path, json_body=json_body, upload=upload, headers=headers)
        return status, _answer(status, raw, f"{method} {path} on replica server {self.endpoint}")

    async def _exchange(self, method: str, path: str, *, json_body: dict | None = None,
                        upload: tuple[Path | Sequence[bytes], str, int] | None = None,
                        headers: dict | None = None) -> tuple[int, bytes, Mapping[str, str]]:
        if self._session is None:
            raise RuntimeError("ReplicaClient used outside 'async with'")
        hdrs = dict(headers or {})
        data = None
        if upload is not None:
            spool, digest, size = upload
            hdrs["Content-Type"] = routes.BUNDLE_CONTENT_TYPE
            throttle = self.transfers.throttle
            if size is None:  # streamed: chunked transfer encoding
                data = upload_body.stream_body(spool, throttle)
            else:
                hdrs["Content-Length"] = str(size)
                data = (upload_body.stream_file(spool, size, throttle) if isinstance(spool, Path)
                        else upload_body.stream_pieces(spool, throttle))
        elif json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode()
            digest = hashlib.sha256(data).hexdigest()
            hdrs["Content-Type"] = routes.JSON_CONTENT_TYPE
        else:
            digest = hashlib.sha256(b"").hexdigest()
        hdrs[routes.CONTENT_DIGEST_HEADER] = digest
        key = self.key
        if key is not None:
            hdrs[routes.AUTHORIZATION_HEADER] = authorization(key, method, path, digest, int(self._clock()))
        url = URL(self.endpoint.base + path, encoded=True)
        where = f"{method} {path} on replica server {self.endpoint}"
        try:
            async with self._transfer(upload is not None), \
                    self._session.request(method, url, data=data, headers=hdrs, allow_redirects=False,
                                         ssl=self._tls() or True) as resp:
                raw = await _read_answer(resp)
                status = resp.status
                answer_headers = resp.headers.copy()  # case-insensitive
        except aiohttp.ClientSSLError as exc:
            refused = tls_refusal(exc)
            if refused is None:
                raise ReplicaUnavailableError(f"{where} failed in TLS: {_describe(exc)}") from None
            raise ReplicaAuthError(f"{where}: TLS handshake failed: {refused}", status=0, remote_code="tls_refused",
                                   hint="check the certificates and CA bundles of both hosts "
                                        "(docs/security.md)") from None
        except aiohttp.ClientOSError as exc:
            refused = tls_refusal(exc)
            if refused is None:
                raise ReplicaUnavailableError(f"{where} failed: {_describe(exc)}",
                                              hint="check that hvr-listener runs there and the network "
                                                   "between the hosts") from None
            raise ReplicaAuthError(f"{where}: the replica server refused our certificate: {refused}", status=0,
                                   remote_code="tls_refused",
                                   hint="check our certificate: its CA, validity, clientAuth usage") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ReplicaUnavailableError(f"{where} failed: {_describe(exc)}",
                                          hint="check that hvr-listener runs there and the network "
                                               "between the hosts") from None
        except asyncio.TimeoutError:
            raise ReplicaUnavailableError(f"{where} timed out") from None
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and upload is not None:
                raise
            raise ReplicaUnavailableError(f"{where} failed: {exc}") from None
        return status, raw, answer_headers

    @asynccontextmanager
    async def _transfer(self, uploading: bool):
        """While an upload is in flight: one place of the agent's parallel transfers, for this client."""
        if not uploading:
            yield
            return
        async with self._place_lock:
            if self._uploads == 0:
                await self.transfers.slots.acquire()
            self._uploads += 1
        try:
            yield
        finally:
            self._uploads -= 1
            if self._uploads == 0:
                self.transfers.slots.release()


async def _read_answer(resp: aiohttp.ClientResponse) -> bytes:
    """The answer's body, at most ``MAX_ANSWER_BYTES`` of it (answers are small JSON objects)."""
    out = bytearray()
    while len(out) <= MAX_ANSWER_BYTES:
        chunk = await resp.content.read(64 * 1024)
        if not chunk:
            break
        out += chunk
    return bytes(out[:MAX_ANSWER_BYTES])


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _answer(status: int, raw: bytes, where: str) -> dict:
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError, RecursionError):  # a hostile answer nested too deep, too
        body = None
    if 200 <= status < 300:
        if not isinstance(body, dict):
            raise ReplicaUnavailableError(f"{where}: HTTP {status} with a body that is not a JSON object",
                                          status=status)
        return body
    err = body if isinstance(body, dict) else {}
    message = str(err.get("message") or f"HTTP {status}")
    detail = err.get("detail") if isinstance(err.get("detail"), dict) else None
    hint = err.get("hint") if isinstance(err.get("hint"), str) else None
    server_code = err.get("code") if isinstance(err.get("code"), str) else None
    entry = CATALOGUE.get(server_code)
    # Transient: the server failed or is busy, or the bytes were damaged or cut on the way (the
    # upload is rebuilt from its spool file and sent again); the catalogue says which codes those are.
    if status >= 500 or status == 429 or (entry is not None and entry.status == status and entry.transient):
        raise ReplicaUnavailableError(f"replica server: {message} ({where}, HTTP {status})", status=status,
                                      remote_code=server_code, hint=hint, detail=detail)
    cls = _PERMANENT.get(status, ReplicaRejectedError)
    raise cls(f"replica server: {message}", status=status, remote_code=server_code, hint=hint,
              detail=dict(detail or {}, status=status))
