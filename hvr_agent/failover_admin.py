"""The agent's failover routes (docs/agent-admin-api.md, "Failover"), added to the admin app.

* ``POST /v1/vms/{name}/failover/prepare``, ``DELETE`` (cancel): a planned failover on the primary;
* ``POST /v1/vms/{name}/failover/serve``, ``DELETE`` (withdraw), ``POST .../serve/complete``: a failed-over
  VM served on the new primary;
* ``POST /v1/vms/{name}/failover/reverse``: replicate it back (the body of ``vm enable``).
"""

from __future__ import annotations

from aiohttp import web

from hvr_common.shell.http_middleware import read_json_object
from hvr_agent.admin import enable_from_body
from hvr_agent.failover import Failover

FAILOVER = web.AppKey("failover", Failover)


async def prepare(request: web.Request) -> web.Response:
    return web.json_response(await request.app[FAILOVER].prepare(request.match_info["name"]))


async def cancel(request: web.Request) -> web.Response:
    return web.json_response(await request.app[FAILOVER].cancel(request.match_info["name"]))


async def serve(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    return web.json_response(await request.app[FAILOVER].serve(request.match_info["name"], body))


async def withdraw(request: web.Request) -> web.Response:
    return web.json_response(await request.app[FAILOVER].withdraw(request.match_info["name"]))


async def complete(request: web.Request) -> web.Response:
    return web.json_response(await request.app[FAILOVER].complete(request.match_info["name"]))


async def reverse(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    failover, name = request.app[FAILOVER], request.match_info["name"]
    return web.json_response(await failover.reverse(name, lambda: enable_from_body(failover.replication, name,
                                                                                     body)))


def add_failover_routes(app: web.Application, failover: Failover) -> None:
    app[FAILOVER] = failover
    app.router.add_post("/v1/vms/{name}/failover/prepare", prepare)
    app.router.add_delete("/v1/vms/{name}/failover/prepare", cancel)
    app.router.add_post("/v1/vms/{name}/failover/serve", serve)
    app.router.add_delete("/v1/vms/{name}/failover/serve", withdraw)
    app.router.add_post("/v1/vms/{name}/failover/serve/complete", complete)
    app.router.add_post("/v1/vms/{name}/failover/reverse", reverse)
