"""The agent's admin API: JSON over HTTP on a unix socket (mode 0600).

Routes (documented in docs/agent-admin-api.md):

* ``GET /v1/status``
* ``GET /v1/vms``, ``POST /v1/vms``
* ``GET /v1/vms/{name}``, ``DELETE /v1/vms/{name}``
* ``POST /v1/vms/{name}/cut``
* ``POST /v1/vms/{name}/replication`` (enable), ``PATCH /v1/vms/{name}/replication`` (settings),
  ``DELETE /v1/vms/{name}/replication`` (remove)
* ``GET /v1/replication``, ``GET /v1/replication/{name}`` (Get-VMReplication)
* ``GET /v1/vms/{name}/replication/measure`` (Measure-VMReplication)
* ``POST /v1/vms/{name}/replication/{initial,sync-now,suspend,resume}``
"""

from __future__ import annotations

import logging

from aiohttp import web

from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.recovery_points import HistorySettings
from hvr_common.shell.http_middleware import error_middleware, read_json_object
from hvr_agent.replication import ReplicationManager
from hvr_agent.vms import VmRegistry

log = logging.getLogger("hvr.agent.admin")

REGISTRY = web.AppKey("registry", VmRegistry)
STATUS = web.AppKey("status", dict)
REPLICATION = web.AppKey("replication", ReplicationManager)

MAX_BODY = 1024 * 1024
HISTORY_FIELDS = {"recovery_history", "fine_window_min", "app_consistent_hours"}


async def get_status(request: web.Request) -> web.Response:
    reg = request.app[REGISTRY]
    return web.json_response(dict(request.app[STATUS], vms=len(reg.vms)))


async def list_vms(request: web.Request) -> web.Response:
    reg = request.app[REGISTRY]
    return web.json_response([vm.status() for vm in reg.vms.values()] + reg.unavailable_status())


async def add_vm(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    unknown = set(body) - {"name", "disks", "read_only"}
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
    vm = await request.app[REGISTRY].add(name, disks, read_only)
    return web.json_response(vm.status(), status=201)


def _vm(request: web.Request):
    name = request.match_info["name"]
    vm = request.app[REGISTRY].vms.get(name)
    if vm is None:
        raise NotFoundError(f"no VM named {name!r} is registered", hint="hvrctl vm list shows the registered VMs")
    return vm


async def get_vm(request: web.Request) -> web.Response:
    return web.json_response(_vm(request).status())


async def remove_vm(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in request.app[REGISTRY].unavailable:
        name = _vm(request).name
    await request.app[REGISTRY].remove(name)
    return web.json_response({"removed": name})


async def cut_vm(request: web.Request) -> web.Response:
    name = _vm(request).name
    closed = await request.app[REGISTRY].cut(name)
    vm = request.app[REGISTRY].vms[name]
    return web.json_response({"vm": name, "sequence": vm.sequence, "logs": [c.to_dict() for c in closed]})


# --- replication ---------------------------------------------------------------------------
def _fields(body: dict, allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")


async def enable_replication(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _fields(body, {"replica_server", "port", "key_file", "frequency_s", "compression"} | HISTORY_FIELDS)
    for key in ("replica_server", "port", "key_file", "frequency_s"):
        if key not in body:
            raise UsageError(f"field {key!r} is required")
    history = HistorySettings.from_json({k: v for k, v in body.items() if k in HISTORY_FIELDS})
    result = await request.app[REPLICATION].enable(
        request.match_info["name"], replica_host=body["replica_server"], port=body["port"],
        key_file=body["key_file"], frequency_s=body["frequency_s"], compression=body.get("compression", True),
        history=history)
    return web.json_response(result, status=201)


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


async def start_initial(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    _fields(body, {"at_ns", "use_existing"})
    at_ns = body.get("at_ns")
    if at_ns is not None and (not isinstance(at_ns, int) or isinstance(at_ns, bool) or at_ns < 0):
        raise UsageError("field 'at_ns' must be a time in nanoseconds since the epoch")
    use_existing = body.get("use_existing", False)
    if not isinstance(use_existing, bool):
        raise UsageError("field 'use_existing' must be true or false")
    return web.json_response(await request.app[REPLICATION].start_initial(request.match_info["name"], at_ns,
                                                                          use_existing))


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


async def resync_replication(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    _fields(body, {"at_ns", "cancel"})
    at_ns = body.get("at_ns")
    if at_ns is not None and (not isinstance(at_ns, int) or isinstance(at_ns, bool) or at_ns < 0):
        raise UsageError("field 'at_ns' must be a time in nanoseconds since the epoch")
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


def make_app(registry: VmRegistry, status: dict, replication: ReplicationManager) -> web.Application:
    app = web.Application(middlewares=[error_middleware(log)], client_max_size=MAX_BODY)
    app[REGISTRY] = registry
    app[STATUS] = status
    app[REPLICATION] = replication
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", add_vm)
    app.router.add_get("/v1/vms/{name}", get_vm)
    app.router.add_delete("/v1/vms/{name}", remove_vm)
    app.router.add_post("/v1/vms/{name}/cut", cut_vm)
    app.router.add_post("/v1/vms/{name}/replication", enable_replication)
    app.router.add_patch("/v1/vms/{name}/replication", set_replication)
    app.router.add_delete("/v1/vms/{name}/replication", remove_replication)
    app.router.add_get("/v1/vms/{name}/replication/measure", measure_replication)
    app.router.add_post("/v1/vms/{name}/replication/initial", start_initial)
    app.router.add_post("/v1/vms/{name}/replication/sync-now", sync_now)
    app.router.add_post("/v1/vms/{name}/replication/suspend", suspend_replication)
    app.router.add_post("/v1/vms/{name}/replication/resume", resume_replication)
    app.router.add_post("/v1/vms/{name}/replication/resync", resync_replication)
    app.router.add_post("/v1/vms/{name}/replication/verify", verify_replication)
    app.router.add_get("/v1/replication", list_replication)
    app.router.add_get("/v1/replication/{name}", get_replication)
    return app
