"""The daemons' HTTP servers: aiohttp with hvr's size limits, answering even broken framing in JSON.

aiohttp answers a request it cannot parse (a bad request line, a header over
its limit, a broken chunked body) itself, before any middleware runs, in
plain text.  :class:`JsonErrorRunner` gives its server a request handler that
answers those in the JSON error body every other refusal has
(``http_malformed``, with aiohttp's status), logs one short event instead of a
traceback with the offending bytes, and bounds the request line and headers
(:mod:`hvr_common.pure.input_limits`).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from hvr_common.pure.input_limits import MAX_HEADER_FIELD_BYTES, MAX_HEADERS, MAX_REQUEST_LINE_BYTES, quoted
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.logs import event

log = logging.getLogger("hvr.http")

HANDLER_LIMITS = {"max_line_size": MAX_REQUEST_LINE_BYTES, "max_field_size": MAX_HEADER_FIELD_BYTES,
                  "max_headers": MAX_HEADERS}


class _JsonErrorHandler(RequestHandler):
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer has begun: nothing more can be said
            raise ConnectionError("response is sent already, cannot send another response")
        reason = str(exc.args[0]) if exc is not None and exc.args and status != 500 else None
        text = f"malformed HTTP request: {quoted(reason)}" if reason else _phrase(status)
        if status >= 500:
            body = {"code": "internal", "message": "internal error", "hint": "see the daemon's log for details"}
            log.error("unhandled error in the HTTP server", exc_info=exc)
        else:
            body = error("http_malformed", text).to_dict()
            event(log, "request_malformed", logging.INFO, status=status, error=text)
        resp = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        resp.force_close()
        return resp


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose server answers malformed requests in JSON, with hvr's header limits."""

    def __init__(self, app: web.Application, **kwargs):
        super().__init__(app, **{**HANDLER_LIMITS, **kwargs})

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _JsonErrorServer(plain.request_handler, request_factory=plain.request_factory,
                                handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs)
