"""The agent's admin API: JSON over HTTP on a unix socket (mode 0600).

Routes (documented in docs/agent-admin-api.md):

* ``GET /v1/status``
* ``GET /v1/vms``, ``POST /v1/vms``
* ``GET /v1/vms/{name}``, ``DELETE /v1/vms/{name}``
* ``POST /v1/vms/{name}/cut``
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from hvr_common.errors import HvrError, NotFoundError, UsageError
from hvr_common.http_errors import status_for
from hvr_common.logs import event
from hvr_agent.vms import VmRegistry

log = logging.getLogger("hvr.agent.admin")

REGISTRY = web.AppKey("registry", VmRegistry)
STATUS = web.AppKey("status", dict)

MAX_BODY = 1024 * 1024


def _error_response(exc: HvrError) -> web.Response:
    return web.json_response(exc.to_dict(), status=status_for(exc))


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except HvrError as exc:
        event(log, "admin_request_failed", logging.INFO, method=request.method, path=request.path,
              code=exc.code, error=exc.message)
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status >= 400:
            body = {"code": "http_error", "message": exc.reason}
            return web.json_response(body, status=exc.status)
        raise


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


async def get_status(request: web.Request) -> web.Response:
    reg = request.app[REGISTRY]
    return web.json_response(dict(request.app[STATUS], vms=len(reg.vms)))


async def list_vms(request: web.Request) -> web.Response:
    reg = request.app[REGISTRY]
    return web.json_response([vm.status() for vm in reg.vms.values()])


async def add_vm(request: web.Request) -> web.Response:
    body = await _json_body(request)
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
    name = _vm(request).name
    await request.app[REGISTRY].remove(name)
    return web.json_response({"removed": name})


async def cut_vm(request: web.Request) -> web.Response:
    name = _vm(request).name
    closed = await request.app[REGISTRY].cut(name)
    vm = request.app[REGISTRY].vms[name]
    return web.json_response({"vm": name, "sequence": vm.sequence, "logs": [c.to_dict() for c in closed]})


def make_app(registry: VmRegistry, status: dict) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app[REGISTRY] = registry
    app[STATUS] = status
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", add_vm)
    app.router.add_get("/v1/vms/{name}", get_vm)
    app.router.add_delete("/v1/vms/{name}", remove_vm)
    app.router.add_post("/v1/vms/{name}/cut", cut_vm)
    return app
