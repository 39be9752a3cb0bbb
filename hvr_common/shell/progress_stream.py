"""A long admin request that reports its progress: newline-delimited JSON (``application/x-ndjson``).

The answer starts only with the first progress report: a job that fails
before it (a wrong state, a bad argument) is answered as any other request,
with its error status and JSON body.  After it, every line is one object:
``{"progress": {...}}`` now and then, and last either ``{"result": {...}}``
or ``{"error": {code, message, hint}, "status": S}`` (the status the error
would have had).  A client that reads no lines still sees the last one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from hvr_common.pure.errors import HvrError
from hvr_common.pure.wire.error_catalogue import internal_error_body, status_for
from hvr_common.shell.logs import event

NDJSON_CONTENT_TYPE = "application/x-ndjson"

Report = Callable[[dict], Awaitable[None]]


async def stream_job(request: web.Request, logger: logging.Logger,
                     job: Callable[[Report], Awaitable[dict]]) -> web.StreamResponse:
    response: web.StreamResponse | None = None

    async def report(progress: dict) -> None:
        nonlocal response
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": NDJSON_CONTENT_TYPE})
            await response.prepare(request)
        await response.write(json.dumps({"progress": progress}).encode() + b"\n")

    try:
        result = await job(report)
        line = {"result": result}
    except HvrError as exc:
        if response is None:
            raise
        event(logger, "request_refused", logging.INFO, method=request.method, path=request.path_qs,
              status=status_for(exc), code=exc.code, error=exc.message)
        line = {"error": exc.to_dict(), "status": status_for(exc)}
    except Exception as exc:
        if response is None:
            raise
        logger.exception("unhandled error in %s %s", request.method, request.path)
        line = {"error": internal_error_body(exc), "status": 500}
    if response is None:
        return web.json_response(line["result"])
    await response.write(json.dumps(line).encode() + b"\n")
    await response.write_eof()
    return response
