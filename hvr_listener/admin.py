"""The listener's admin API: JSON over HTTP on a unix socket (mode 0600); the HTTP shell only.

* ``GET /v1/server``, ``PATCH /v1/server``      replica server settings
* ``GET/POST /v1/keys``, ``DELETE /v1/keys/{principal}``, ``GET/POST /v1/authorization``,
  ``PATCH/DELETE /v1/authorization/{pattern}`` (:mod:`hvr_listener.access_control`)
* ``GET /v1/replicas``, ``GET /v1/replicas/{name}``
* ``DELETE /v1/replicas/{name}``, ``POST /v1/replicas/{name}/suspend``, ``POST /v1/replicas/{name}/resume``
  (the operator verbs: :mod:`hvr_listener.operator_verbs`)
* ``GET /v1/replicas/{name}/recovery-points``
* ``POST /v1/replicas/{name}/initial/import`` (progress as NDJSON: :mod:`hvr_common.shell.progress_stream`;
  :mod:`hvr_listener.initial_import`)
* ``POST /v1/replicas/{name}/test-failover``, ``DELETE /v1/replicas/{name}/test-failover``
  (:mod:`hvr_listener.test_failover`)
* ``/v1/backups``, ``/v1/replicas/{name}/backup...``: backups (:mod:`hvr_listener.backup_api`)
* ``POST/DELETE /v1/replicas/{name}/failover``, ``POST /v1/replicas/{name}/failover/complete``
  (:mod:`hvr_listener.failover`)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from hvr_common.pure.errors import HvrError, NotFoundError, UsageError
from hvr_common.pure.health import HealthReport, replica_health
from hvr_common.pure.input_limits import decimal
from hvr_common.shell.http_middleware import error_middleware, read_json_object
from hvr_common.shell.progress_stream import stream_job
from hvr_common.shell.threads import finish_in_thread
from hvr_common.shell.logs import event
from hvr_common.pure.wire.error_catalogue import error
from hvr_listener import access_control, adoption, backup_api, failover, initial_import, kept_aside, operator_verbs
from hvr_listener.backups import Backups
from hvr_listener.peer_connections import PeerConnections
from hvr_common.pure.wire.status_views import RecoveryPointView, ReplicaStatus, recovery_history_settings
from hvr_listener.recovery_history import Histories
from hvr_listener.test_failover import TestFailovers
from hvr_listener.replicas import ReplicaService
from hvr_listener.settings import ServerSettings
from hvr_listener.store import ListenerStore, Replica

log = logging.getLogger("hvr.listener.admin")

SETTINGS = web.AppKey("settings", ServerSettings)
STORE = web.AppKey("store", ListenerStore)
SERVICE = web.AppKey("service", ReplicaService)
ON_LISTEN_CHANGE = web.AppKey("on_listen_change", Callable[[], Awaitable[None]])
HISTORIES = web.AppKey("histories", Histories)
TESTS = web.AppKey("tests", TestFailovers)


def replica_status(rep: Replica) -> dict:
    return ReplicaStatus.from_replica(rep).to_json()


def _points(app: web.Application, rep: Replica) -> list:
    """The replica's recovery points, oldest first (worker thread)."""
    history = app[HISTORIES].get(rep.vm_id)
    if history is not None and history.created_ns == rep.created_ns:
        points, logs = history.points, history.logs  # each read once: a thinning step may swap both
        return [dataclasses.replace(p, undo_bytes=logs[p.id].size_bytes) if p.id in logs else p for p in points]
    return app[STORE].points(rep.vm_id)


def health_of(rep: Replica, now_ns: int) -> HealthReport:
    """The replica's own view of health (:func:`hvr_common.pure.health.replica_health`)."""
    return replica_health(rep.state, name=rep.name, frequency_s=rep.frequency_s,
                          last_received_ns=rep.last_replication_ns, last_applied_ns=rep.last_applied_ns,
                          state_detail=rep.state_detail, now_ns=now_ns)


async def _full_status(app: web.Application, rep: Replica) -> dict:
    """A replica's status with its health and recovery history (Get-VMReplication on the replica server)."""
    status = replica_status(rep)
    health = health_of(rep, time.time_ns())
    status.update(health=health.health.value, health_details=list(health.details))
    points = await asyncio.to_thread(_points, app, rep)
    status.update(recovery_history_settings(rep, points, app[TESTS].status(rep.name)))
    status["failover"] = await asyncio.to_thread(app[failover.FAILOVERS].status, rep.vm_id)
    return status


async def get_server(request: web.Request) -> web.Response:
    return web.json_response(request.app[SETTINGS].view())


async def patch_server(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    changes = await read_json_object(request)
    old_listen = settings.listen_endpoint()
    old_tls = (settings.tls_files(), settings.requires_client_certificate())
    await asyncio.to_thread(settings.update, changes)
    settings.apply_limits()
    closed = access_control.revoke(settings, request.app[access_control.PEERS], "server_settings_changed")
    event(log, "server_settings_changed", changes=changes, connections_closed=closed)
    if settings.listen_endpoint() != old_listen or (settings.tls_files(), settings.requires_client_certificate()) \
            != old_tls or {"tls_cert", "tls_key", "tls_ca"} & set(changes):
        await request.app[ON_LISTEN_CHANGE]()  # rebinds with the new address or TLS context
    return web.json_response(settings.view())


async def list_replicas(request: web.Request) -> web.Response:
    reps = await asyncio.to_thread(request.app[STORE].replicas)
    return web.json_response([await _full_status(request.app, r) for r in reps])


async def get_replica(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    rep = await asyncio.to_thread(request.app[STORE].replica_by_name, name)
    if rep is None:
        raise NotFoundError(f"no replica VM named {name!r} on this server")
    status = await _full_status(request.app, rep)
    history = await asyncio.to_thread(request.app[STORE].cycle_history, rep.vm_id)
    status["cycles"] = [{"sequence": c.sequence, "bytes": c.bytes, "received_ns": c.received_ns,
                         "applied_ns": c.applied_ns} for c in history[-100:]]
    return web.json_response(status)


async def remove_replica(request: web.Request) -> web.Response:
    """Remove-VMReplication on the replica: forget the VM (and with delete_storage, its files)."""
    name = request.match_info["name"]
    delete_storage = request.query.get("delete_storage") in ("1", "true", "yes")
    if request.app[backup_api.BACKUPS].status(name) is not None:
        raise error("backup_running", f"a backup of VM {name} is held", hint=f"end it first: hvrctl backup end {name}")
    rep = await operator_verbs.remove_replica(request.app[SERVICE], name, delete_storage)
    await asyncio.to_thread(request.app[HISTORIES].forget, rep.vm_id)
    return web.json_response({"removed": name, "storage_deleted": delete_storage,
                              "storage": str(rep.storage_dir)})


async def adopt_replica(request: web.Request) -> web.Response:
    """Enable-VMReplication -AsReplica: an existing copy becomes the images of the primary's VM ``vm_id``."""
    body = await read_json_object(request)
    unknown = set(body) - {"name", "vm_id", "disks", "disk_ids", "keep_aside"}
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    try:
        vm_id = uuid.UUID(str(body.get("vm_id")))
        disk_ids = None if body.get("disk_ids") is None else [uuid.UUID(str(d)) for d in body["disk_ids"]]
    except (ValueError, TypeError):
        raise UsageError("fields 'vm_id' and 'disk_ids' must be the primary VM's ids (UUIDs)") from None
    disks = body.get("disks")
    if not isinstance(disks, list) or not all(isinstance(d, str) and d for d in disks):
        raise UsageError("field 'disks' must be a list of image paths")
    keep_aside = body.get("keep_aside", False)
    if not isinstance(keep_aside, bool):
        raise UsageError("field 'keep_aside' must be true or false")
    reps = await asyncio.to_thread(request.app[STORE].replicas)
    taken = {r.name for r in reps} | {str(r.vm_id) for r in reps}
    record = await asyncio.to_thread(adoption.adopt, Path(request.app[SETTINGS].storage_dir()), taken,
                                     body.get("name"), vm_id, [Path(d) for d in disks], keep_aside=keep_aside,
                                     disk_ids=disk_ids)
    event(log, "replica_adopted", vm=record["name"], vm_id=record["vm_id"], disks=len(record["disks"]),
          keep_aside=keep_aside)
    return web.json_response(record, status=201)


async def get_adoption(request: web.Request) -> web.Response:
    """The adoption recorded under a name and not yet taken by an enabling."""
    name = request.match_info["name"]
    record = await asyncio.to_thread(adoption.adoption_record, Path(request.app[SETTINGS].storage_dir()), name)
    if record is None:
        raise NotFoundError(f"no copy is adopted as {name!r} on this server", hint="hvrctl replica adopt")
    return web.json_response(record)


async def suspend_replica(request: web.Request) -> web.Response:
    """Pause replication on the replica: cycles are stored, not applied, until it is resumed."""
    rep = await operator_verbs.suspend_replica(request.app[SERVICE], request.match_info["name"])
    return web.json_response(replica_status(rep))


async def resume_replica(request: web.Request) -> web.Response:
    """Leave Error once the cause is fixed, or a pause on the replica: stored cycles are applied (again)."""
    rep = await operator_verbs.resume_replica(request.app[SERVICE], request.match_info["name"])
    return web.json_response(replica_status(rep))


async def import_initial(request: web.Request) -> web.StreamResponse:
    """Import-VMInitialReplication: load initial-replication media into the replica's images."""
    body = await read_json_object(request)
    unknown = sorted(set(body) - {"directory"})
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}")
    directory = body.get("directory")
    if not isinstance(directory, str) or not directory:
        raise UsageError("field 'directory' must be the media folder's absolute path")
    service, name = request.app[SERVICE], request.match_info["name"]
    return await stream_job(request, log, lambda report: initial_import.import_media(service, name, Path(directory),
                                                                                     report))


async def list_recovery_points(request: web.Request) -> web.Response:
    """Get-VMSnapshot on a replica: the recovery points, oldest first; the last one is the latest."""
    name = request.match_info["name"]
    rep = await asyncio.to_thread(request.app[STORE].replica_by_name, name)
    if rep is None:
        raise NotFoundError(f"no replica VM named {name!r} on this server", hint="hvrctl replica get lists them")
    points = await asyncio.to_thread(_points, request.app, rep)
    test = request.app[TESTS].status(name)
    pinned = test["recovery_point"]["id"] if test else None
    kept = await asyncio.to_thread(request.app[HISTORIES].kept_aside.point_id, rep)
    return web.json_response([RecoveryPointView.of(p, latest=p is points[-1], test_failover=p.id == pinned,
                                                   label=kept_aside.LABEL if p.id == kept else None).to_json()
                              for p in points])


async def release_recovery_point(request: web.Request) -> web.Response:
    """The operator is done with a kept-aside point: unpinned, then dropped by retention like any point."""
    name = request.match_info["name"]
    rep = await asyncio.to_thread(request.app[STORE].replica_by_name, name)
    if rep is None:
        raise NotFoundError(f"no replica VM named {name!r} on this server", hint="hvrctl replica get lists them")
    point_id = decimal(request.match_info["id"], "the recovery point id", minimum=1)
    histories = request.app[HISTORIES]
    async with request.app[SERVICE].image_lock(rep.vm_id):  # a pin changes only under the image lock
        await asyncio.to_thread(histories.kept_aside.release, rep, point_id)
        history = await finish_in_thread(histories.load, rep)
        dropped = await histories.thin(rep, history)
    return web.json_response({"name": rep.name, "released": point_id, "points_dropped": dropped})


async def start_test_failover(request: web.Request) -> web.Response:
    """Start-VMFailover -AsTest: the test VM's disks served over NBD at a recovery point."""
    body = await read_json_object(request) if request.can_read_body else {}
    unknown = sorted(set(body) - {"recovery_point"})
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}")
    view = await request.app[TESTS].start(request.match_info["name"], body.get("recovery_point"))
    return web.json_response(view, status=201)


async def stop_test_failover(request: web.Request) -> web.Response:
    """Stop-VMFailover: delete the test VM and everything it wrote."""
    return web.json_response(await request.app[TESTS].stop(request.match_info["name"]))


def make_app(settings: ServerSettings, store: ListenerStore, on_listen_change: Callable[[], Awaitable[None]],
             service: ReplicaService, histories: Histories, tests: TestFailovers,
             backups: Backups, peers: PeerConnections, failovers: failover.Failovers) -> web.Application:
    app = web.Application(middlewares=[error_middleware(log)], client_max_size=1024 * 1024)
    app[SETTINGS] = settings
    app[STORE] = store
    app[ON_LISTEN_CHANGE] = on_listen_change
    app[SERVICE] = service
    app[HISTORIES] = histories
    app[TESTS] = tests
    app.router.add_get("/v1/server", get_server)
    app.router.add_patch("/v1/server", patch_server)
    access_control.register(app, settings, store, peers)
    app.router.add_get("/v1/replicas", list_replicas)
    app.router.add_get("/v1/replicas/{name}", get_replica)
    app.router.add_delete("/v1/replicas/{name}", remove_replica)
    app.router.add_post("/v1/replicas/{name}/suspend", suspend_replica)
    app.router.add_post("/v1/replicas/{name}/resume", resume_replica)
    app.router.add_post("/v1/adoptions", adopt_replica)
    app.router.add_get("/v1/replicas/{name}/recovery-points", list_recovery_points)
    app.router.add_post("/v1/replicas/{name}/recovery-points/{id}/release", release_recovery_point)
    app.router.add_get("/v1/adoptions/{name}", get_adoption)
    app.router.add_post("/v1/replicas/{name}/initial/import", import_initial)
    app.router.add_post("/v1/replicas/{name}/test-failover", start_test_failover)
    app.router.add_delete("/v1/replicas/{name}/test-failover", stop_test_failover)
    backup_api.add_routes(app, backups)
    failover.register(app, failovers)
    return app
