"""The error boundary of the daemons' HTTP APIs (aiohttp middleware).

Every failure leaves as a JSON error body: an :class:`HvrError` with its
code and the status the error catalogue gives it
(:mod:`hvr_common.pure.wire.error_catalogue`), an aiohttp HTTP error (404 route, 405 method, keeping its
``Allow`` header), a full file system as the transient 507 ``storage_full``,
and anything unexpected as a 500 whose traceback goes to the log and never
to the client.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
from pathlib import Path

from aiohttp import web

from hvr_common.pure.errors import HvrError
from hvr_common.pure.input_limits import json_object
from hvr_common.pure.wire.error_catalogue import error, internal_error_body, status_for
from hvr_common.shell.logs import event
from hvr_common.shell.unix_socket import claim_socket_path, socket_identity

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


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
        except (OSError, sqlite3.OperationalError) as exc:
            if not _is_storage_full(exc):
                return _internal(logger, request, exc)
            # a full file system is not the request's fault, and space may come back: transient
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            refused = error("storage_full", f"no space left to store this ({why})",
                            hint="free space on the replica host's storage; the primary retries by itself")
            event(logger, "request_refused", logging.WARNING, method=request.method, path=request.path_qs,
                  status=status_for(refused), code=refused.code, error=refused.message)
            return web.json_response(refused.to_dict(), status=status_for(refused))
        except Exception as exc:  # the boundary: log it whole, answer in JSON
            return _internal(logger, request, exc)
    return middleware


def _is_storage_full(exc: OSError | sqlite3.OperationalError) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    return "disk is full" in str(exc)  # SQLITE_FULL


def _internal(logger: logging.Logger, request: web.Request, exc: Exception) -> web.Response:
    logger.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    event(logger, "request_failed", logging.ERROR, method=request.method, path=request.path_qs,
          error=f"{type(exc).__name__}: {exc}")
    return web.json_response(internal_error_body(exc), status=500)


async def read_json_object(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    return json_object(await request.read(), "request body")


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
