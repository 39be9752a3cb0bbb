"""The admin API's backup routes (the HTTP shell of :mod:`hvr_listener.backups`).

* ``GET /v1/backups``                                    every backup held
* ``POST /v1/replicas/{name}/backup``                    begin (body ``{"recovery_point": ID}``, optional)
* ``GET /v1/replicas/{name}/backup``                     the backup held, 404 ``not_found`` if none
* ``DELETE /v1/replicas/{name}/backup``                  end
* ``GET /v1/replicas/{name}/backup/disks/{disk}/extents`` data and hole runs (``?offset=&length=``)
* ``GET /v1/replicas/{name}/backup/disks/{disk}/data``   raw bytes (``?offset=&length=``, at most 16 MiB)
"""

from __future__ import annotations

from aiohttp import web

from hvr_common.pure.errors import NotFoundError, UsageError
from hvr_common.pure.input_limits import decimal
from hvr_common.shell.http_middleware import read_json_object
from hvr_listener.backups import Backups

BACKUPS = web.AppKey("backups", Backups)


def _int_query(request: web.Request, key: str, default: int | None) -> int | None:
    raw = request.query.get(key)
    if raw is None:
        return default
    return decimal(raw, f"query parameter {key!r} (a whole number of bytes)")


async def list_backups(request: web.Request) -> web.Response:
    return web.json_response(request.app[BACKUPS].all())


async def begin_backup(request: web.Request) -> web.Response:
    body = await read_json_object(request) if request.can_read_body else {}
    unknown = sorted(set(body) - {"recovery_point"})
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}")
    view = await request.app[BACKUPS].begin(request.match_info["name"], body.get("recovery_point"))
    return web.json_response(view, status=201)


async def get_backup(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    view = request.app[BACKUPS].status(name)
    if view is None:
        raise NotFoundError(f"no backup of VM {name} is held", hint=f"hvrctl backup begin {name}")
    return web.json_response(view)


async def end_backup(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKUPS].end(request.match_info["name"]))


async def disk_extents(request: web.Request) -> web.Response:
    m = request.match_info
    runs = request.app[BACKUPS].extents(m["name"], m["disk"], _int_query(request, "offset", 0),
                                        _int_query(request, "length", None))
    return web.json_response(runs)


async def disk_data(request: web.Request) -> web.Response:
    m = request.match_info
    length = _int_query(request, "length", None)
    if length is None:
        raise UsageError("query parameter 'length' is required")
    data = request.app[BACKUPS].read(m["name"], m["disk"], _int_query(request, "offset", 0), length)
    return web.Response(body=data, content_type="application/octet-stream")


def add_routes(app: web.Application, backups: Backups) -> None:
    app[BACKUPS] = backups
    app.router.add_get("/v1/backups", list_backups)
    app.router.add_post("/v1/replicas/{name}/backup", begin_backup)
    app.router.add_get("/v1/replicas/{name}/backup", get_backup)
    app.router.add_delete("/v1/replicas/{name}/backup", end_backup)
    app.router.add_get("/v1/replicas/{name}/backup/disks/{disk}/extents", disk_extents)
    app.router.add_get("/v1/replicas/{name}/backup/disks/{disk}/data", disk_data)
