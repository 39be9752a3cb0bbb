"""Structured logging: every log line is an event name plus fields.

On a terminal the lines read as ``event key=value ...``; otherwise (journald,
files, pipes) they are JSON objects, one per line.  Call :func:`configure`
once in a daemon's ``main()``; everywhere else use :func:`event`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    """Log the event ``name`` with ``fields`` (vm, disk, seq, bytes, latency_s, ...)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"hvr_fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "hvr_fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "hvr_fields", {})
        parts = [time.strftime("%H:%M:%S", time.localtime(record.created)), record.levelname.lower()[:4],
                 record.getMessage()]
        parts += [f"{k}={v}" for k, v in fields.items()]
        line = " ".join(str(p) for p in parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
