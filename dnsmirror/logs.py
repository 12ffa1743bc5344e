"""Structured logging: ``text`` for people, ``json`` (one object per line) for log pipelines.

Modules log with the standard library (``logging.getLogger("dnsmirror.dns")``) and pass structured
fields as ``extra={"fields": {...}}``; Twisted's own log events are routed into the same handler.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from twisted.logger import STDLibLogObserver, globalLogBeginner


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


def setup(format: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send dnsmirror's and Twisted's log records to ``stream`` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Twisted's per-connection chatter is noise at info level
    logging.getLogger("twisted").setLevel(max(logging.WARNING, root.level))
    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` argument carrying structured fields: ``log.info("...", extra=fields(host=h))``."""
    return {"fields": values}
