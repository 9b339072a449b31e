"""The service's logs: one JSON object a line on standard error (``[service] log_format =
"json"``, the default), or plain text for a person at a terminal (``"text"``).

Every line has ``ts`` (Unix seconds), ``level``, ``logger`` and ``msg``; an exception adds
``exc``. Each HTTP request is one line of the ``stowplan.access`` logger, written by
``metrics.MetricsMiddleware`` when the answer starts (a followed log may stream for hours),
with ``method``, ``path``, ``route`` (the template, e.g. ``/api/v1/runs/{ref}``), ``status``,
``ms`` (until the answer started) and ``client``. Headers,
bodies and query strings are never logged, so neither is a token. uvicorn's own lines (startup,
shutdown, errors) go through the same formatter; its access log is off (this one replaces it).
"""

from __future__ import annotations

import logging
from typing import Any, Final, Literal

import msgspec

ACCESS: Final = logging.getLogger("stowplan.access")
FIELDS: Final = ("method", "path", "route", "status", "ms", "client")
"""Extra fields a record may carry (``logging``'s ``extra=``), copied into the line."""

LogFormat = Literal["json", "text"]


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            if name in record.__dict__:
                doc[name] = record.__dict__[name]
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(doc).decode()


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={record.__dict__[k]}" for k in FIELDS if k in record.__dict__)
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def log_config(fmt: LogFormat) -> dict[str, Any]:
    """uvicorn's ``log_config`` (a ``logging.config.dictConfig``): every logger of the
    service, uvicorn's and stowplan's, through one handler on standard error."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"stowplan": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "stowplan",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "stowplan": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
    }


def access(method: str, path: str, route: str, status: int, ms: float, client: str) -> None:
    """One request's line (``stowplan.access``)."""
    ACCESS.info(
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "ms": round(ms, 2),
            "client": client,
        },
    )
