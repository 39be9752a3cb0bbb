"""Who may replicate to this server: the admin routes of keys and authorization entries, and revocation.

* ``GET /v1/keys``, ``POST /v1/keys``, ``DELETE /v1/keys/{principal}[?key_id=ID]``
* ``GET /v1/authorization``, ``POST /v1/authorization``,
  ``PATCH /v1/authorization/{pattern}``, ``DELETE /v1/authorization/{pattern}``

Every change is stored, then the in-memory copy the request path reads is
reloaded (it takes effect on the next request), then :func:`revoke` closes
the open connections of every principal that lost its last key or its
authorization (``docs/authorization.md``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from aiohttp import web

from hvr_common.pure.authorization import AuthorizationEntry, check_pattern
from hvr_common.pure.errors import HvrError, NotFoundError, UsageError
from hvr_common.pure.token_auth import SECRET_BYTES, Key, check_principal
from hvr_common.shell.http_middleware import read_json_object
from hvr_common.shell.logs import event
from hvr_listener.peer_connections import PeerConnections
from hvr_listener.settings import ServerSettings
from hvr_listener.store import ListenerStore

log = logging.getLogger("hvr.listener.admin")

SETTINGS = web.AppKey("access_settings", ServerSettings)
STORE = web.AppKey("access_store", ListenerStore)
PEERS = web.AppKey("access_peers", PeerConnections)


def revoke(settings: ServerSettings, peers: PeerConnections, reason: str) -> int:
    """Close the open connections of principals the current keys, entries and settings no longer allow."""
    return peers.close_revoked(settings.still_allowed, reason)


def _fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}", hint=f"fields are: {', '.join(sorted(allowed))}")


# --- keys ---------------------------------------------------------------------
async def list_keys(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].key_list))


async def add_key(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    unknown = set(body) - {"principal", "secret", "replace"}
    if unknown:  # never echoed: a misplaced secret must not come back in the answer
        raise UsageError(f"unknown field(s): {len(unknown)} (the fields are principal, secret, replace)")
    principal = body.get("principal")
    if not isinstance(principal, str):
        raise UsageError("field 'principal' must be a string")
    try:
        check_principal(principal)
    except HvrError as exc:  # a bad field of the request (400), not a failed authentication
        raise UsageError(exc.message, hint=exc.hint) from None
    try:
        secret = base64.b64decode(body.get("secret", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise UsageError("field 'secret' must be base64") from None
    if len(secret) != SECRET_BYTES:
        raise UsageError(f"secret must be {SECRET_BYTES} bytes")
    if not isinstance(body.get("replace", False), bool):
        raise UsageError("field 'replace' must be true or false")
    result = await asyncio.to_thread(request.app[STORE].add_key, Key(principal, secret),
                                     replace=body.get("replace", False))
    request.app[SETTINGS].reload_keys()
    event(log, "key_added", principal=principal, key_id=result["key_id"], replaced=result["replaced"])
    return web.json_response(result, status=200 if result["replaced"] else 201)


async def remove_key(request: web.Request) -> web.Response:
    principal = request.match_info["principal"]
    key_id = request.query.get("key_id")
    removed = await asyncio.to_thread(request.app[STORE].remove_key, principal, key_id)
    request.app[SETTINGS].reload_keys()
    closed = revoke(request.app[SETTINGS], request.app[PEERS], "key_removed")
    event(log, "key_removed", principal=principal, key_ids=removed, connections_closed=closed)
    return web.json_response({"removed": principal, "key_ids": removed, "connections_closed": closed})


# --- authorization entries ---------------------------------------------------------
async def list_entries(request: web.Request) -> web.Response:
    entries = await asyncio.to_thread(request.app[STORE].authorization_entries)
    return web.json_response([e.to_json() for e in entries])


async def add_entry(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _fields(body, {"pattern", "storage", "trust_group"})
    entry = AuthorizationEntry.of(body.get("pattern"), body.get("storage"), body.get("trust_group"))
    await asyncio.to_thread(request.app[STORE].add_entry, entry)
    request.app[SETTINGS].reload_entries()
    event(log, "authorization_entry_added", **entry.to_json())
    return web.json_response(entry.to_json(), status=201)


async def _entry(request: web.Request) -> AuthorizationEntry:
    pattern = check_pattern(request.match_info["pattern"])
    for entry in await asyncio.to_thread(request.app[STORE].authorization_entries):
        if entry.pattern == pattern:
            return entry
    raise NotFoundError(f"no authorization entry for {pattern!r}", hint="hvrctl authz list shows them")


async def set_entry(request: web.Request) -> web.Response:
    """Set-VMReplicationAuthorizationEntry: a new storage location (for replicas created from now on) or
    trust group (for the decisions from now on; replicas keep the group that created them)."""
    body = await read_json_object(request)
    _fields(body, {"storage", "trust_group"})
    if not body:
        raise UsageError("nothing to change", hint="give storage and/or trust_group")
    old = await _entry(request)
    entry = AuthorizationEntry.of(old.pattern, body.get("storage", old.storage),
                                  body.get("trust_group", old.trust_group))
    await asyncio.to_thread(request.app[STORE].set_entry, entry)
    request.app[SETTINGS].reload_entries()
    event(log, "authorization_entry_changed", **entry.to_json())
    return web.json_response(entry.to_json())


async def remove_entry(request: web.Request) -> web.Response:
    pattern = check_pattern(request.match_info["pattern"])
    await asyncio.to_thread(request.app[STORE].remove_entry, pattern)
    request.app[SETTINGS].reload_entries()
    closed = revoke(request.app[SETTINGS], request.app[PEERS], "authorization_entry_removed")
    event(log, "authorization_entry_removed", pattern=pattern, connections_closed=closed)
    return web.json_response({"removed": pattern, "connections_closed": closed})


def register(app: web.Application, settings: ServerSettings, store: ListenerStore, peers: PeerConnections) -> None:
    app[SETTINGS] = settings
    app[STORE] = store
    app[PEERS] = peers
    app.router.add_get("/v1/keys", list_keys)
    app.router.add_post("/v1/keys", add_key)
    app.router.add_delete("/v1/keys/{principal}", remove_key)
    app.router.add_get("/v1/authorization", list_entries)
    app.router.add_post("/v1/authorization", add_entry)
    app.router.add_patch("/v1/authorization/{pattern}", set_entry)
    app.router.add_delete("/v1/authorization/{pattern}", remove_entry)
