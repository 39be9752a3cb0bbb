"""The agent's admin API: JSON over HTTP on a unix socket (mode 0600).

Routes (documented in docs/agent-admin-api.md):

* ``GET /v1/status``
* ``GET /v1/vms``, ``POST /v1/vms``
* ``GET /v1/vms/{name}``, ``DELETE /v1/vms/{name}``
* ``POST /v1/vms/{name}/cut``
* ``POST /v1/vms/{name}/replication`` (enable), ``PATCH /v1/vms/{name}/replication`` (settings),
  ``DELETE /v1/vms/{name}/replication`` (remove)
* ``GET /v1/replication``, ``GET /v1/replication/{name}`` (Get-VMReplication)
* ``GET /v1/vms/{name}/replication/measure`` (Measure-VMReplication),
  ``POST /v1/vms/{name}/replication/statistics/reset`` (Reset-VMReplicationStatistics)
* ``GET /v1/server``, ``PATCH /v1/server`` (the monitoring interval and its start time)
* ``POST /v1/vms/{name}/replication/{initial,sync-now,suspend,resume}``
* ``GET /v1/settings``, ``PATCH /v1/settings``, ``DELETE /v1/settings`` (bandwidth, parallel transfers)
* ``POST /v1/vms/{name}/replication/initial/export`` (progress as NDJSON: :mod:`hvr_common.shell.progress_stream`)
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.input_limits import is_int_in
from hvr_common.pure.recovery_points import HistorySettings
from hvr_common.pure.media_manifest import DEFAULT_CHUNK_BYTES
from hvr_common.pure.tracking_mode import parse_tracking
from hvr_common.shell.http_middleware import error_middleware, read_json_object
from hvr_agent.replica_credentials import ReplicaCredentials
from hvr_common.shell.progress_stream import stream_job
from hvr_agent.replication import ReplicationManager
from hvr_agent.transfers import Transfers
from hvr_agent.vms import VmRegistry

log = logging.getLogger("hvr.agent.admin")

REGISTRY = web.AppKey("registry", VmRegistry)
STATUS = web.AppKey("status", dict)
REPLICATION = web.AppKey("replication", ReplicationManager)
TRANSFERS = web.AppKey("transfers", Transfers)

MAX_BODY = 1024 * 1024
HISTORY_FIELDS = {"recovery_history", "fine_window_min", "app_consistent_hours"}
CREDENTIAL_FIELDS = {"auth", "key_file", "tls", "ca_file", "cert_file", "cert_key_file"}


async def get_status(request: web.Request) -> web.Response:
    reg = request.app[REGISTRY]
    return web.json_response(dict(request.app[STATUS], vms=len(reg.vms)))


async def list_vms(request: web.Request) -> web.Response:
    reg = request.app[REGISTRY]
    return web.json_response([dict(vm.status(), nbd_clients=reg.nbd_clients(vm.name)) for vm in reg.vms.values()]
                             + reg.unavailable_status())


async def add_vm(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    unknown = set(body) - {"name", "disks", "read_only", "tracking"}
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("name")
    disks = body.get("disks")
    read_only = body.get("read_only", False)
    if not isinstance(name, str):
        raise UsageError("field 'name' must be a string")
    if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
        raise UsageError("field 'disks' must be a list of image paths")
    if not isinstance(read_only, bool):
        raise UsageError("field 'read_only' must be true or false")
    tracking = parse_tracking(body.get("tracking"))
    vm = await request.app[REGISTRY].add(name, disks, read_only, tracking)
    return web.json_response(vm.status(), status=201)


def _vm(request: web.Request):
    name = request.match_info["name"]
    vm = request.app[REGISTRY].vms.get(name)
    if vm is None:
        raise NotFoundError(f"no VM named {name!r} is registered", hint="hvrctl vm list shows the registered VMs")
    return vm


async def get_vm(request: web.Request) -> web.Response:
    vm = _vm(request)
    return web.json_response(dict(vm.status(), nbd_clients=request.app[REGISTRY].nbd_clients(vm.name)))


async def patch_vm(request: web.Request) -> web.Response:
    """``PATCH /v1/vms/{name}`` ``{"tracking": "journal"|"bitmap"}``: switch the mode at a cut made now."""
    name = _vm(request).name
    body = await read_json_object(request)
    if set(body) != {"tracking"}:
        raise UsageError("the body must be {\"tracking\": \"journal\" or \"bitmap\"}")
    vm = await request.app[REGISTRY].set_tracking(name, parse_tracking(body["tracking"]),
                                                   shipped=_shipped(request, name))
    rep = request.app[REPLICATION].vms.get(name)
    if rep is not None:  # the operator's mode stands: a switch made for the journal's budget ends
        await rep.cycles.switch.forget("the operator set the tracking mode")
    return web.json_response(vm.status())


async def remove_vm(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in request.app[REGISTRY].unavailable:
        name = _vm(request).name
    await request.app[REGISTRY].remove(name)
    return web.json_response({"removed": name})


def _shipped(request: web.Request, name: str) -> bool:
    """Whether a cycle will ship what a cut of the VM closes (no replication, no cycle)."""
    rep = request.app[REPLICATION].vms.get(name)
    return rep is not None and rep.rel.rec.next_sequence is not None


async def cut_vm(request: web.Request) -> web.Response:
    name = _vm(request).name
    closed = await request.app[REGISTRY].cut(name, shipped=_shipped(request, name))
    vm = request.app[REGISTRY].vms[name]
    return web.json_response({"vm": name, "sequence": vm.sequence, "logs": [c.to_dict() for c in closed]})


# --- replication ---------------------------------------------------------------------------
def _fields(body: dict, allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")


async def enable_replication(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    return web.json_response(await enable_from_body(request.app[REPLICATION], request.match_info["name"], body),
                             status=201)


async def enable_from_body(manager: ReplicationManager, name: str, body: dict) -> dict:
    """Enable-VMReplication from an enable request's body (also ``failover/reverse``'s)."""
    _fields(body, {"replica_server", "port", "frequency_s", "compression"} | CREDENTIAL_FIELDS | HISTORY_FIELDS)
    for key in ("replica_server", "port", "frequency_s"):
        if key not in body:
            raise UsageError(f"field {key!r} is required")
    history = HistorySettings.from_json({k: v for k, v in body.items() if k in HISTORY_FIELDS})
    credentials = ReplicaCredentials.of(**{k: v for k, v in body.items() if k in CREDENTIAL_FIELDS})
    return await manager.enable(
        name, replica_host=body["replica_server"], port=body["port"],
        credentials=credentials, frequency_s=body["frequency_s"], compression=body.get("compression", True),
        history=history)


async def set_replication(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _fields(body, HISTORY_FIELDS)
    return web.json_response(await request.app[REPLICATION].change_settings(request.match_info["name"], body))


async def remove_replication(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].remove(request.match_info["name"]))


async def list_replication(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].status())


async def get_replication(request: web.Request) -> web.Response:
    return web.json_response((await request.app[REPLICATION].status(request.match_info["name"]))[0])


async def measure_replication(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].measure(request.match_info["name"]))


async def reset_statistics(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].reset_statistics(request.match_info["name"]))


async def get_server(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].server_view())


async def patch_server(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].change_server(await read_json_object(request)))


def _at_ns(body: dict) -> int | None:
    """A start time: nanoseconds since the epoch in SQLite's range (a larger one overflowed the clock: a 500)."""
    at_ns = body.get("at_ns")
    if at_ns is not None and not is_int_in(at_ns, 0):
        raise UsageError("field 'at_ns' must be a time in nanoseconds since the epoch (0 to 2^63 - 1)")
    return at_ns


async def start_initial(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    _fields(body, {"at_ns", "use_existing"})
    at_ns = _at_ns(body)
    use_existing = body.get("use_existing", False)
    if not isinstance(use_existing, bool):
        raise UsageError("field 'use_existing' must be true or false")
    return web.json_response(await request.app[REPLICATION].start_initial(request.match_info["name"], at_ns,
                                                                          use_existing))


async def export_initial(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    _fields(body, {"directory", "chunk_bytes"})
    directory = body.get("directory")
    chunk_bytes = body.get("chunk_bytes", DEFAULT_CHUNK_BYTES)
    if not isinstance(directory, str) or not directory:
        raise UsageError("field 'directory' must be the media folder's absolute path")
    if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or not 4096 <= chunk_bytes <= 1 << 30 \
            or chunk_bytes % 4096:
        raise UsageError("field 'chunk_bytes' must be a multiple of 4096 from 4 KiB to 1 GiB")
    manager, name = request.app[REPLICATION], request.match_info["name"]
    return await stream_job(request, log, lambda report: manager.export_initial(name, Path(directory), chunk_bytes,
                                                                                 report))


async def sync_now(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    _fields(body, {"wait"})
    wait = body.get("wait", True)
    if not isinstance(wait, bool):
        raise UsageError("field 'wait' must be true or false")
    return web.json_response(await request.app[REPLICATION].sync_now(request.match_info["name"], wait))


async def suspend_replication(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].suspend(request.match_info["name"]))


async def resume_replication(request: web.Request) -> web.Response:
    return web.json_response(await request.app[REPLICATION].resume(request.match_info["name"]))


# --- transfer settings (bandwidth cap and schedule, parallel transfers) ---------------------
async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRANSFERS].view())


async def set_settings(request: web.Request) -> web.Response:
    return web.json_response(await request.app[TRANSFERS].change(await read_json_object(request)))


async def reset_settings(request: web.Request) -> web.Response:
    return web.json_response(await request.app[TRANSFERS].reset())


async def resync_replication(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    _fields(body, {"at_ns", "cancel"})
    at_ns = _at_ns(body)
    cancel = body.get("cancel", False)
    if not isinstance(cancel, bool):
        raise UsageError("field 'cancel' must be true or false")
    return web.json_response(await request.app[REPLICATION].resync(request.match_info["name"], at_ns, cancel))


async def verify_replication(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    _fields(body, {"repair"})
    repair = body.get("repair", False)
    if not isinstance(repair, bool):
        raise UsageError("field 'repair' must be true or false")
    return web.json_response(await request.app[REPLICATION].verify(request.match_info["name"], repair))


def make_app(registry: VmRegistry, status: dict, replication: ReplicationManager,
             transfers: Transfers | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware(log)], client_max_size=MAX_BODY)
    app[REGISTRY] = registry
    app[STATUS] = status
    app[REPLICATION] = replication
    app[TRANSFERS] = transfers if transfers is not None else replication.transfers
    app.router.add_get("/v1/settings", get_settings)
    app.router.add_patch("/v1/settings", set_settings)
    app.router.add_delete("/v1/settings", reset_settings)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", add_vm)
    app.router.add_get("/v1/vms/{name}", get_vm)
    app.router.add_patch("/v1/vms/{name}", patch_vm)
    app.router.add_delete("/v1/vms/{name}", remove_vm)
    app.router.add_post("/v1/vms/{name}/cut", cut_vm)
    app.router.add_post("/v1/vms/{name}/replication", enable_replication)
    app.router.add_patch("/v1/vms/{name}/replication", set_replication)
    app.router.add_delete("/v1/vms/{name}/replication", remove_replication)
    app.router.add_get("/v1/vms/{name}/replication/measure", measure_replication)
    app.router.add_post("/v1/vms/{name}/replication/statistics/reset", reset_statistics)
    app.router.add_get("/v1/server", get_server)
    app.router.add_patch("/v1/server", patch_server)
    app.router.add_post("/v1/vms/{name}/replication/initial", start_initial)
    app.router.add_post("/v1/vms/{name}/replication/initial/export", export_initial)
    app.router.add_post("/v1/vms/{name}/replication/sync-now", sync_now)
    app.router.add_post("/v1/vms/{name}/replication/suspend", suspend_replication)
    app.router.add_post("/v1/vms/{name}/replication/resume", resume_replication)
    app.router.add_post("/v1/vms/{name}/replication/resync", resync_replication)
    app.router.add_post("/v1/vms/{name}/replication/verify", verify_replication)
    app.router.add_get("/v1/replication", list_replication)
    app.router.add_get("/v1/replication/{name}", get_replication)
    return app
