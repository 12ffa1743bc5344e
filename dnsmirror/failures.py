"""Failures of upstream registries, peer nodes and the cache disk, as an operator needs to see them.

Each failure is logged at warning with ``component`` (``upstream``, ``peer``, ``cache``), ``kind`` (a
short fixed word: :data:`UPSTREAM_KINDS`, :data:`PEER_KINDS`, :data:`CACHE_KINDS`), ``host``,
``repository`` and ``reason``, and counted by component and kind for ``/metrics``. Reasons are built by
the callers from URLs already stripped of their query (:func:`dnsmirror.upstream.loggable_url`) and
never from headers, so no credential can reach the log.

One failure is reported at one place (the upstream client, the peer client, the content chain), so it
is logged once. A burst of the same failure (one host down, a thousand requests) is logged once per
:data:`REPEAT_INTERVAL` per (component, kind, host); the next line says how many were not logged.
Counting is always exact.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable

from dnsmirror.logs import fields
from dnsmirror.resolver import ResolutionError
from dnsmirror.store import DigestMismatch, StoreFull

log = logging.getLogger("dnsmirror.failures")

UPSTREAM_KINDS = (
    "dns",
    "connect",
    "connect_timeout",
    "tls",
    "first_byte_timeout",
    "read_timeout",
    "body_cut",
    "proxy",
    "redirect",
    "too_large",
    "status_5xx",
    "status_429",
    "digest_mismatch",
    "other",
)
PEER_KINDS = ("refused", "timeout", "status", "body_cut", "digest_mismatch", "tls", "other")
CACHE_KINDS = ("full", "write", "read", "damaged", "other")
KINDS = {"upstream": UPSTREAM_KINDS, "peer": PEER_KINDS, "cache": CACHE_KINDS}

REPEAT_INTERVAL = 10.0
_MAX_REASON = 300
_MAX_TRACKED = 1000


class FailureLog:
    """Counts failures by (component, kind) and logs them, a burst of one kind at one host once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.counts: Counter[tuple[str, str]] = Counter()
        self._last_logged: dict[tuple[str, str, str], float] = {}
        self._suppressed: Counter[tuple[str, str, str]] = Counter()

    def report(self, component: str, kind: str, reason: str, *, host: str | None = None,
               repository: str | None = None, digest: str | None = None) -> None:
        """Count one failure and log it (unless the same one was logged within :data:`REPEAT_INTERVAL`)."""
        if kind not in KINDS.get(component, ()):
            kind = "other"
        self.counts[(component, kind)] += 1
        key = (component, kind, host or "")
        now = self.clock()
        last = self._last_logged.get(key)
        if last is not None and now - last < REPEAT_INTERVAL:
            self._suppressed[key] += 1
            return
        if len(self._last_logged) >= _MAX_TRACKED:
            self._forget_older_than(now - REPEAT_INTERVAL)
        self._last_logged[key] = now
        values: dict[str, object] = {"event": f"{component}_failure", "component": component, "kind": kind,
                                     "host": host, "repository": repository}
        if digest is not None:
            values["digest"] = digest
        values["reason"] = reason if len(reason) <= _MAX_REASON else reason[:_MAX_REASON] + "..."
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            values["not_logged_since_last"] = suppressed
        log.warning("%s failure (%s)", component, kind, extra=fields(**values))

    def count(self, component: str, kind: str) -> int:
        return self.counts[(component, kind)]

    def _forget_older_than(self, cutoff: float) -> None:
        self._last_logged = {key: at for key, at in self._last_logged.items() if at >= cutoff}
        if len(self._last_logged) >= _MAX_TRACKED:
            self._last_logged.clear()
        self._suppressed = Counter(
            {key: n for key, n in self._suppressed.items() if key in self._last_logged}
        )


# The process's failure log: the reporting sites sit deep in the request path, where passing one more
# object through every constructor would touch every module for a counter.
failures = FailureLog()


def report(component: str, kind: str, reason: str, **where: str | None) -> None:
    """Report a failure to the process's :data:`failures` log."""
    failures.report(component, kind, reason, **where)


def report_fill_failure(source: str, cause: BaseException | None, reason: str, **where: str | None) -> None:
    """Report why a cache fill from ``source`` failed, unless it was reported where it happened (a body
    cut upstream is reported by the upstream client, a peer's failure by the peer client)."""
    found = fill_failure_kind(source, cause)
    if found is not None:
        component, kind = found
        failures.report(component, kind, reason, **where)


def fill_failure_kind(source: str, cause: BaseException | None) -> tuple[str, str] | None:
    """(component, kind) of a failed fill's cause, or None when its own reporter already counted it."""
    if isinstance(cause, StoreFull):
        return "cache", "full"
    if isinstance(cause, DigestMismatch):
        if source == "upstream":
            return "upstream", "digest_mismatch"
        if source == "containerd":
            return "cache", "damaged"
        return None
    if isinstance(cause, OSError):
        return "cache", "write"
    return None


# --- classification: pure ---------------------------------------------------------------------------------

_REPOSITORY = re.compile(r"^https?://[^/]+/v2/(?P<name>.+?)/(?:blobs|manifests|tags|referrers)/")


def repository_of(url: str) -> str | None:
    """The repository an OCI distribution URL names (``/v2/<name>/blobs/...``), else None."""
    match = _REPOSITORY.match(url)
    return match.group("name") if match else None


def upstream_kind(exc: BaseException) -> str:
    """The :data:`UPSTREAM_KINDS` word for an upstream exception (of
    :data:`~dnsmirror.upstream.UPSTREAM_FAILURES`)."""
    from dnsmirror import upstream  # upstream reports through this module: imported when first used

    text = str(exc)
    if isinstance(exc, ResolutionError):
        return "dns"
    if isinstance(exc, upstream.UpstreamTLSError):
        return "tls"
    if isinstance(exc, upstream.UpstreamTimeout):
        if "connect timed out" in text:
            return "connect_timeout"
        if "no body bytes" in text:
            return "read_timeout"
        return "first_byte_timeout"
    if isinstance(exc, upstream.RedirectRefused | upstream.TooManyRedirects):
        return "redirect"
    if isinstance(exc, upstream.BodyTooLarge):
        return "too_large"
    if isinstance(exc, upstream.UpstreamUnavailable):
        if "body cut" in text:
            return "body_cut"
        if "proxy" in text.lower() or "tunnel" in text.lower():
            return "proxy"
        return "connect"
    return "other"


def peer_kind(reason: str) -> str:
    """The :data:`PEER_KINDS` word for a peer failure's reason text."""
    text = reason.lower()
    # a failed peer TLS handshake ("certificate verify failed") is not a body that failed its check; a body
    # cut by a TLS error stays a cut body
    if ("ssl" in text or "tls" in text or "certificate" in text) and "broke off" not in text:
        return "tls"
    if "digest" in text or "mismatch" in text or "verif" in text:
        return "digest_mismatch"
    if "broke off" in text or "body cut" in text:
        return "body_cut"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "refused" in text or "unreachable" in text or "no route" in text:
        return "refused"
    if "answered" in text or "status" in text:
        return "status"
    return "other"
