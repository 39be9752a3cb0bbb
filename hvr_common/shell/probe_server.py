"""The HTTP probe endpoint both daemons serve on ``http_listen``: ``/healthz``, ``/readyz``, ``/metrics``.

* ``/healthz``: 200 ``ok`` whenever the process and its event loop answer.
* ``/readyz``: 200 ``{"ready": true}``, or 503 ``{"ready": false, "problems": [...]}`` with one
  sentence per unmet condition (each daemon says what ready means: ``hvr_agent/probes.py``,
  ``hvr_listener/probes.py``).
* ``/metrics``: the Prometheus text format.  The daemon's sampler reads its state at scrape time
  and returns the metric families; the process and platform metrics come from prometheus-client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from hvr_common.pure.errors import ConflictError
from hvr_common.pure.metric_names import READY
from hvr_common.shell.http_middleware import error_middleware
from hvr_common.shell.logs import event

Readiness = Callable[[], Awaitable[list[str]]]
Sampler = Callable[[], Awaitable[list[Metric]]]

READINESS = web.AppKey("readiness", Callable)
SAMPLER = web.AppKey("sampler", Callable)
SCRAPE = web.AppKey("scrape", object)
REGISTRY = web.AppKey("registry", CollectorRegistry)


class ScrapeCollector:
    """Hands the families gathered for the scrape in progress to prometheus-client's exposition."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)

    def describe(self) -> list[Metric]:
        return []  # no fixed set: nothing is collected at registration


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    problems = await request.app[READINESS]()
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True, "problems": []})


async def metrics(request: web.Request) -> web.Response:
    families = await request.app[SAMPLER]()
    ready = GaugeMetricFamily(READY.full_name, READY.help)
    ready.add_metric([], 0.0 if await request.app[READINESS]() else 1.0)
    scrape = request.app[SCRAPE]
    # no await between setting and exposing: two scrapes cannot mix their families
    scrape.families = [*families, ready]
    try:
        body = generate_latest(request.app[REGISTRY])
    finally:
        scrape.families = []
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_probe_app(readiness: Readiness, sampler: Sampler, log: logging.Logger) -> web.Application:
    app = web.Application(middlewares=[error_middleware(log)])
    registry = CollectorRegistry(auto_describe=False)
    scrape = ScrapeCollector()
    registry.register(scrape)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    app[READINESS] = readiness
    app[SAMPLER] = sampler
    app[SCRAPE] = scrape
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_probes(app: web.Application, endpoint: tuple[str, int],
                       log: logging.Logger) -> tuple[web.AppRunner, tuple[str, int]]:
    """Bind ``app`` on ``endpoint`` (TCP); returns the runner (to clean up) and the bound address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, endpoint[0], endpoint[1], reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConflictError(f"cannot serve the HTTP probes on {endpoint[0]}:{endpoint[1]}: {exc.strerror}",
                            hint="another process uses the port (http_listen in the configuration)") from None
    server = site._server
    bound = server.sockets[0].getsockname()[:2] if server is not None and server.sockets else endpoint
    event(log, "http_listening", host=bound[0], port=bound[1])
    return runner, bound
