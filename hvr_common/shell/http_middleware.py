"""The error boundary of the daemons' HTTP APIs (aiohttp middleware).

Every failure leaves as a JSON error body: an :class:`HvrError` with its
code and the status the error catalogue gives it
(:mod:`hvr_common.pure.wire.error_catalogue`), an aiohttp HTTP error (404 route, 405 method, keeping its
``Allow`` header), and anything unexpected as a 500 whose traceback goes to
the log and never to the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from aiohttp import web

from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.pure.wire.error_catalogue import error, internal_error_body, status_for
from hvr_common.shell.logs import event
from hvr_common.shell.unix_socket import claim_socket_path, socket_identity


def error_middleware(logger: logging.Logger):
    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            return await handler(request)
        except HvrError as exc:
            status = status_for(exc)
            body = exc.to_dict()
            event(logger, "request_refused", logging.WARNING if status >= 500 or status == 401 else logging.INFO,
                  method=request.method, path=request.path_qs, status=status, code=body.get("code"),
                  error=exc.message)
            return web.json_response(body, status=status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return web.json_response(error("http_error", exc.reason).to_dict(), status=exc.status,
                                     headers=headers)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the boundary: log it whole, answer in JSON
            logger.exception("unhandled error in %s %s", request.method, request.path)
            event(logger, "request_failed", logging.ERROR, method=request.method, path=request.path_qs,
                  error=f"{type(exc).__name__}: {exc}")
            return web.json_response(internal_error_body(exc), status=500)
    return middleware


async def read_json_object(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


async def serve_on_unix_socket(runner: web.AppRunner, path: Path) -> tuple[int, int] | None:
    """Serve an admin API on ``path``, created 0600 (never readable by others, not even briefly).

    Returns the socket's identity, so the daemon removes only its own socket at exit.
    """
    claim_socket_path(path)
    old_umask = os.umask(0o177)
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return socket_identity(path)
