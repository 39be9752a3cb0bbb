"""The replication API (``/v1``) that primaries call: the HTTP shell.

Authenticates every request (a signed token, or over TLS the client
certificate the handshake verified: ``docs/security.md``; failed
authentications limited per source address), authorises it
(:mod:`hvr_common.pure.authorization`: the request carries the primary's
:class:`Grant`), checks the server settings,
parses paths and headers, streams bodies to :class:`ReplicaService`.  Routes,
headers, bodies and the status of every error code are those of
:mod:`hvr_common.pure.wire` (``docs/replication-protocol.md``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid

from aiohttp import web

from hvr_common.pure.auth_failures import AuthFailureLimiter
from hvr_common.pure.errors import UsageError
from hvr_common.pure.input_limits import MAX_JSON_BODY_BYTES, decimal, json_object, quoted
from hvr_common.pure.recovery_points import Consistency, HistorySettings
from hvr_common.shell.certificate_files import peer_principal
from hvr_common.shell.logs import event
from hvr_common.shell.http_middleware import error_middleware
from hvr_common.pure.token_auth import AuthError, ReplayCache, verify
from hvr_common.pure.wire import routes
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.pure.wire.messages import DigestQuery, HeartbeatRequest, ReplicaView
from hvr_listener.body_feed import TooLargeError
from hvr_listener.peer_connections import PeerConnections
from hvr_listener.digests import ReplicaDigests
from hvr_listener.replicas import ReplicaService
from hvr_listener.settings import ServerSettings

log = logging.getLogger("hvr.listener.api")

SERVICE = web.AppKey("service", ReplicaService)
SETTINGS = web.AppKey("settings", ServerSettings)
REPLAY = web.AppKey("replay", ReplayCache)
DIGESTS = web.AppKey("digests", ReplicaDigests)
STARTED_S = web.AppKey("started_s", int)  # requests signed earlier are refused (the replay cache is new)
FAILURES = web.AppKey("failures", AuthFailureLimiter)
PEERS = web.AppKey("peers", PeerConnections)
GRANT = "hvr_grant"  # the request's hvr_common.pure.authorization.Grant
MAX_JSON_BODY = MAX_JSON_BODY_BYTES
BODY_CHUNK = 4 * 1024 * 1024  # aiohttp buffers this much of a body before it stops reading the socket
BODY_IDLE_TIMEOUT_S = 60.0  # a stalled upload must not hold the VM's lock forever
VERSION = "0.1.0"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    settings = request.app[SETTINGS]
    current = settings.current()
    if not current["enabled"]:
        raise error("replication_disabled", "this replica server does not accept replication (it is disabled)",
                    hint="on the replica host: hvrctl server set --enabled true")
    failures, address = request.app[FAILURES], request.remote or "unknown"
    failures.check(address, time.monotonic())
    try:
        principal = _authenticate(request, current["auth_modes"])
    except AuthError:
        failures.failed(address, time.monotonic())
        raise
    request[GRANT] = settings.grant(principal)
    request.app[PEERS].note(request.transport, principal)
    return await handler(request)


def _authenticate(request: web.Request, modes: list[str]) -> str:
    """The principal: of the signed token when the request carries one, else of the client certificate."""
    settings = request.app[SETTINGS]
    tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    if request.headers.get(routes.AUTHORIZATION_HEADER) is None and tls is not None and "certificate" in modes:
        # the handshake verified the chain to the CA bundle; the principal is the certificate's host name
        principal = peer_principal(tls.getpeercert(binary_form=True))
        if not settings.certificate_trusted(request.transport):  # the bundle changed since the handshake
            raise AuthError("the client certificate no longer chains to a CA this server trusts",
                            hint="issue the primary a certificate from a CA of the server's bundle (hvrctl server get)")
        return principal
    if "token" not in modes:
        raise AuthError("token authentication is not accepted by this server",
                        hint="use an authentication mode the server accepts (hvrctl server get)")
    return verify(request.headers.get(routes.AUTHORIZATION_HEADER), request.method, request.path_qs,
                  request.headers.get(routes.CONTENT_DIGEST_HEADER), int(time.time()), settings.key,
                  request.app[REPLAY], not_before=request.app[STARTED_S])


async def _json(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise TooLargeError(f"JSON body larger than {MAX_JSON_BODY} bytes")
    raw = bytearray()
    while len(raw) <= MAX_JSON_BODY:  # read(n) gives what has arrived, up to n bytes
        piece = await request.content.read(MAX_JSON_BODY + 1 - len(raw))
        if not piece:
            break
        raw += piece
    raw = bytes(raw)
    if len(raw) > MAX_JSON_BODY:
        raise TooLargeError(f"JSON body larger than {MAX_JSON_BODY} bytes")
    if hashlib.sha256(raw).hexdigest() != request.headers.get(routes.CONTENT_DIGEST_HEADER):
        raise error("digest_mismatch", f"body does not match its {routes.CONTENT_DIGEST_HEADER} digest")
    return json_object(raw)


def _vm_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["vm_id"])
    except ValueError:
        raise UsageError(f"{quoted(request.match_info['vm_id'])} is not a VM id (UUID)") from None


def _generation(request: web.Request) -> int:
    return decimal(request.headers.get(routes.GENERATION_HEADER), f"{routes.GENERATION_HEADER} header", minimum=1)


def _int_query(request: web.Request, key: str) -> int:
    return decimal(request.query.get(key), f"query parameter {key!r}")


async def _body_chunks(request: web.Request):
    reader = request.content
    try:
        while True:
            async with asyncio.timeout(BODY_IDLE_TIMEOUT_S):
                # one received piece as it is (readany would join all that is buffered)
                chunk, end_of_http_chunk = await reader.readchunk()
            if not chunk:
                if end_of_http_chunk:  # a chunked body's chunk boundary, not its end
                    continue
                return
            yield chunk
    except TimeoutError:
        raise error("body_truncated", f"no body data for {BODY_IDLE_TIMEOUT_S:.0f} s; upload abandoned") from None
    except (ConnectionResetError, web.HTTPException):
        raise
    except Exception as exc:  # aiohttp reports a body cut short in several ways
        raise error("body_truncated", f"body could not be read completely: {exc}") from None


async def get_server(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response({"server": settings.server_name, "version": VERSION, "time_ns": time.time_ns(),
                              "auth_modes": settings.current()["auth_modes"]})


async def put_replica(request: web.Request) -> web.Response:
    body = await _json(request)
    rep, created = await request.app[SERVICE].enable(_vm_id(request), request[GRANT], body)
    return web.json_response(ReplicaView.from_replica(rep).to_json(), status=201 if created else 200)


async def get_replica(request: web.Request) -> web.Response:
    rep = await request.app[SERVICE].get(_vm_id(request), request[GRANT])
    return web.json_response(ReplicaView.from_replica(rep).to_json())


async def put_initial(request: web.Request) -> web.Response:
    try:
        disk_id = uuid.UUID(request.match_info["disk_id"])
    except ValueError:
        raise UsageError("disk id is not a UUID") from None
    offset = await request.app[SERVICE].initial_window(
        _vm_id(request), disk_id, request[GRANT], _generation(request), _int_query(request, "offset"),
        _int_query(request, "end"), request.content_length, request.headers[routes.CONTENT_DIGEST_HEADER],
        _body_chunks(request))
    return web.json_response({"offset": offset})


async def post_initial_complete(request: web.Request) -> web.Response:
    body = await _json(request)
    rep = await request.app[SERVICE].initial_complete(_vm_id(request), request[GRANT], body)
    return web.json_response(ReplicaView.from_replica(rep).to_json())


def _consistency(request: web.Request) -> Consistency:
    raw = request.query.get("consistency", Consistency.CRASH.value)
    try:
        return Consistency(raw)
    except ValueError:
        raise UsageError(f"query parameter 'consistency' must be crash or application, not {quoted(raw)}") from None


async def put_cycle(request: web.Request) -> web.Response:
    sequence = decimal(request.match_info["sequence"], "cycle sequence number", minimum=1)
    consistency = _consistency(request)
    created, rep = await request.app[SERVICE].receive_cycle(
        _vm_id(request), sequence, request[GRANT], _generation(request), request.content_length,
        request.headers[routes.CONTENT_DIGEST_HEADER], _body_chunks(request), consistency)
    return web.json_response({"sequence": sequence, "next_sequence": rep.next_sequence},
                             status=201 if created else 200)


async def put_cycle_stream(request: web.Request) -> web.Response:
    """The streamed form's body (chunked, digest header ``routes.STREAMED_DIGEST``): staged, not yet recorded."""
    sequence = decimal(request.match_info["sequence"], "cycle sequence number", minimum=1)
    if request.headers.get(routes.CONTENT_DIGEST_HEADER) != routes.STREAMED_DIGEST:
        raise error("upload_form_mismatch", f"a streamed cycle body carries {routes.CONTENT_DIGEST_HEADER} "
                    f"{routes.STREAMED_DIGEST}; its digest comes with the commit request")
    digest, length = await request.app[SERVICE].stage_cycle(_vm_id(request), sequence, request[GRANT],
                                                            _generation(request), _body_chunks(request))
    return web.json_response({"sequence": sequence, "sha256": digest, "bytes": length}, status=202)


async def post_cycle_commit(request: web.Request) -> web.Response:
    """The streamed form's commit: the body's digest and length, signed; the cycle is then stored (P2)."""
    sequence = decimal(request.match_info["sequence"], "cycle sequence number", minimum=1)
    consistency = _consistency(request)
    body = await _json(request)
    digest, length = body.get("sha256"), body.get("bytes")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise UsageError("commit request: 'sha256' must be 64 lowercase hex digits")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise UsageError("commit request: 'bytes' must be a non-negative integer")
    created, rep = await request.app[SERVICE].commit_cycle(_vm_id(request), sequence, request[GRANT],
                                                           _generation(request), digest, length, consistency)
    return web.json_response({"sequence": sequence, "next_sequence": rep.next_sequence},
                             status=201 if created else 200)


async def put_settings(request: web.Request) -> web.Response:
    """The recovery history settings the primary keeps for the VM (``hvrctl vm enable`` / ``vm set``)."""
    generation = _generation(request)
    body = await _json(request)
    rep, settings = await request.app[SERVICE].set_history(_vm_id(request), request[GRANT], generation, body)
    event(log, "replica_settings_changed", vm=rep.name, **settings.to_json())
    return web.json_response(settings.to_json())


async def post_digests(request: web.Request) -> web.Response:
    """Digests of nodes of a replica disk's tree (the primary's compare: resync, verify)."""
    try:
        disk_id = uuid.UUID(request.match_info["disk_id"])
    except ValueError:
        raise UsageError("disk id is not a UUID") from None
    query = DigestQuery.from_json(await _json(request))
    body, applied = await request.app[DIGESTS].answer(_vm_id(request), disk_id, request[GRANT], query)
    return web.Response(body=body, content_type=routes.DIGESTS_CONTENT_TYPE,
                        headers={routes.APPLIED_SEQUENCE_HEADER: str(applied)})


async def post_resync_complete(request: web.Request) -> web.Response:
    body = await _json(request)
    rep = await request.app[SERVICE].complete_resync(_vm_id(request), request[GRANT], body)
    return web.json_response(ReplicaView.from_replica(rep).to_json())


async def post_heartbeat(request: web.Request) -> web.Response:
    """The primary's heartbeat: whether the VM runs there (the split-brain guard of failover)."""
    generation = _generation(request)
    beat = HeartbeatRequest.from_json(await _json(request))
    rep = await request.app[SERVICE].heartbeat(_vm_id(request), request[GRANT], generation, beat.running,
                                               beat.nbd_clients)
    return web.json_response({"generation": rep.generation, "state": rep.state.value})


def make_app(service: ReplicaService, settings: ServerSettings, max_bundle_bytes: int,
             peers: PeerConnections | None = None, failures: AuthFailureLimiter | None = None) -> web.Application:
    # aiohttp's own body limit applies to request.read()/post(); bundles are streamed and bounded by the service.
    app = web.Application(middlewares=[error_middleware(log), auth_middleware], client_max_size=MAX_JSON_BODY)
    app[SERVICE] = service
    app[SETTINGS] = settings
    app[REPLAY] = ReplayCache()
    app[STARTED_S] = int(time.time())
    app[FAILURES] = failures or AuthFailureLimiter()
    app[PEERS] = peers or PeerConnections()
    app[DIGESTS] = ReplicaDigests(service.access, service.resync_activity)
    app.router.add_get(routes.SERVER, get_server)
    app.router.add_put(routes.REPLICA, put_replica)
    app.router.add_get(routes.REPLICA, get_replica)
    app.router.add_put(routes.INITIAL_WINDOW, put_initial)
    app.router.add_post(routes.INITIAL_COMPLETE, post_initial_complete)
    app.router.add_put(routes.CYCLE, put_cycle)
    app.router.add_put(routes.CYCLE_STREAM, put_cycle_stream)
    app.router.add_post(routes.CYCLE_COMMIT, post_cycle_commit)
    app.router.add_put(routes.REPLICA_SETTINGS, put_settings)
    app.router.add_post(routes.DIGESTS, post_digests)
    app.router.add_post(routes.RESYNC_COMPLETE, post_resync_complete)
    app.router.add_post(routes.HEARTBEAT, post_heartbeat)
    return app
