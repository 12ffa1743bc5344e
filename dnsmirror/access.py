"""The access log: one line per HTTP request the mirror answered, with where the bytes came from.

Fields: method, host, path (never the query string, which can carry signed URLs), status, body bytes
sent, duration in milliseconds, the client's address and ``source``, always one of :data:`SOURCES`:
``cache``, ``fill`` (joined a fill in progress), ``containerd``, ``peer`` (filled the cache from a peer
node), ``upstream`` (filled the cache, or upstream's refusal or failure of a read by digest),
``relay`` (streamed without caching), ``passthrough``, ``stale_tag``, or ``mirror`` (answered by
dnsmirror itself: an error before any source answered, a request for a name it does not mirror). No
header is logged, so no credential can be. Each line is also counted in
:class:`~dnsmirror.metrics.HttpMetrics`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from twisted.web import server

from dnsmirror.logs import fields
from dnsmirror.metrics import SOURCES, HttpMetrics

__all__ = ["SOURCES", "AccessLogSite", "access_fields"]

log = logging.getLogger("dnsmirror.access")

_MAX_PATH = 512


def access_fields(request: Any, now: float, outcome: str = "done") -> dict[str, Any]:
    """The structured fields of one access-log line for ``request`` (started at ``request.started_at``)."""
    # before requestReceived (a push cut mid-body) only the raw URI is known
    path = (getattr(request, "path", None) or request.uri.split(b"?", 1)[0]).decode("latin-1")
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    address = request.getClientAddress()
    started = getattr(request, "started_at", now)
    values = {
        "event": "access",
        "method": (request.method or b"").decode("latin-1"),
        "host": host[:255],
        "path": path if len(path) <= _MAX_PATH else path[:_MAX_PATH] + "...",
        "status": request.code,
        "bytes": request.sentLength,
        "ms": round((now - started) * 1000, 1),
        "client": getattr(address, "host", None),
        "source": getattr(request, "source", None) or "mirror",
    }
    if outcome != "done":
        values["outcome"] = outcome
    return values


class AccessLogSite(server.Site):
    """A Site that writes the access log through :mod:`logging` (``access`` turns it off) and counts
    every response in ``http_metrics``."""

    def __init__(self, resource, *, access: bool = True, http_metrics: HttpMetrics | None = None,
                 observers: tuple = (), **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.access = access
        self.http_metrics = http_metrics if http_metrics is not None else HttpMetrics()
        self.observers = observers  # callables of (request, access fields), e.g. the pull report

    def log(self, request) -> None:
        """twisted.web calls this when a response is finished."""
        self._ended(request, "done")

    def log_unfinished(self, request) -> None:
        """The client went away (or the response was aborted) before the response was complete."""
        self._ended(request, "aborted")

    def _ended(self, request, outcome: str) -> None:
        values = access_fields(request, time.monotonic(), outcome=outcome)
        self.http_metrics.observe(
            values["method"],
            values["status"] or 0,
            values["source"],
            values["ms"] / 1000,
            values["bytes"] or 0,
        )
        for observe in self.observers:
            observe(request, values)
        if self.access and log.isEnabledFor(logging.INFO):
            log.info("request", extra=fields(**values))
