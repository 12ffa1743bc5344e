"""Prometheus metrics, liveness and readiness on ``metrics.listen``.

``/metrics`` exposes the counters the services keep (plain dataclasses, cheap to bump on hot paths),
read only when scraped; ``/healthz`` answers 200 while the process serves; ``/readyz`` answers 200
while the mirror is healthy (captured names resolve to it) and 503 with the reason otherwise.
"""

from __future__ import annotations

import bisect
import platform
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource, server

from dnsmirror import __version__
from dnsmirror.failures import KINDS, FailureLog

DNS_OUTCOMES = ("captured", "forwarded", "fail_open", "refused", "malformed", "servfail", "rejected")


class Readiness(Protocol):
    """What ``/readyz`` and ``dnsmirror_mirror_healthy`` read: the health state, or the DNS process's view."""

    @property
    def healthy(self) -> bool: ...

    @property
    def reason(self) -> str: ...


METHODS = ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE")
# every value ``request.source`` takes (dnsmirror.access documents them); anything else counts as "other"
SOURCES = ("cache", "fill", "containerd", "peer", "upstream", "relay", "passthrough", "stale_tag", "mirror")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _label(value: str, known: tuple[str, ...]) -> str:
    return value if value in known else "other"


class Histogram:
    """Bucket counts, sum and count of observations, by one bounded label."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        counts = self.counts.setdefault(label, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[label] += value

    def family(self, name: str, documentation: str, label_name: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=[label_name])
        for label, counts in sorted(self.counts.items()):
            cumulative, running = [], 0
            for bound, count in zip((*map(str, self.buckets), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric([label], cumulative, self.sums[label])
        return family


class HttpMetrics:
    """Requests the mirror answered: by method, status class and source, latency and bytes by source.

    Labels take fixed values only (:data:`METHODS`, :data:`STATUS_CLASSES`, :data:`SOURCES`, else
    ``other``), so the series stay few whatever clients send."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.bytes: Counter[str] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)

    def observe(self, method: str, status: int, source: str | None, seconds: float, sent: int) -> None:
        """Count one finished (or aborted) response."""
        source_label = _label(source or "mirror", SOURCES)
        status_class = f"{status // 100}xx" if 100 <= status < 600 else "other"
        self.requests[(_label(method, METHODS), status_class, source_label)] += 1
        self.bytes[source_label] += sent
        self.latency.observe(source_label, seconds)

    def collect(self) -> Iterable:
        requests = CounterMetricFamily("dnsmirror_http_requests", "HTTP requests answered by the mirror, by "
                                       "method, status class and where the body came from",
                                       labels=["method", "status_class", "source"])
        for (method, status_class, source), count in sorted(self.requests.items()):
            requests.add_metric([method, status_class, source], count)
        yield requests
        sent = CounterMetricFamily("dnsmirror_http_response_bytes", "Response body bytes sent, by source",
                                   labels=["source"])
        for source, count in sorted(self.bytes.items()):
            sent.add_metric([source], count)
        yield sent
        yield self.latency.family("dnsmirror_http_request_duration_seconds",
                                  "Time from request to the end of the response, by source", "source")


def failure_families(log: FailureLog) -> Iterable:
    """``dnsmirror_<component>_errors_total{kind}`` for upstream, peer and cache failures; every kind is
    always present (at 0), so alerts and dashboards need no absent() guard."""
    for component, kinds in KINDS.items():
        family = CounterMetricFamily(
            f"dnsmirror_{component}_errors",
            f"{component.capitalize()} failures by kind "
            "(each one is also logged at warning with host and reason)",
            labels=["kind"],
        )
        for kind in kinds:
            family.add_metric([kind], log.count(component, kind))
        yield family


def build_info() -> GaugeMetricFamily:
    """``dnsmirror_build_info{version, python}`` 1: the Prometheus convention for the running version."""
    info = GaugeMetricFamily("dnsmirror_build_info", "The running dnsmirror's version (always 1)",
                             labels=["version", "python"])
    info.add_metric([__version__, platform.python_version()], 1)
    return info


# the DNS server's bounds at work (already counted in an outcome above, e.g. servfail)
DNS_LIMIT_COUNTERS = {
    "overloaded": "Forwarded queries answered SERVFAIL without asking upstream: too many forwards in flight",
    "tcp_refused": "TCP DNS connections closed at once: too many in all or from one client address",
    "tcp_timeouts": "TCP DNS connections closed because a query did not arrive whole in time",
    "unsent": "UDP DNS answers the kernel refused to send (a full send buffer, no route to the client)",
}


class StatsCollector:
    """Turns the services' counter dataclasses into metric families at scrape time.

    ``sources`` maps a metric prefix (``tls``, ``content``) to a callable returning the dataclass;
    a field becomes ``dnsmirror_<prefix>_<field>_total`` (a counter), or a gauge when its name ends
    in ``_max``. DNS outcomes become one counter with an ``outcome`` label.
    """

    def __init__(self, dns_stats: Callable[[], Any], sources: dict[str, Callable[[], object]],
                 gauges: dict[str, tuple[str, Callable[[], float]]], health: Readiness,
                 counters: dict[str, tuple[str, Callable[[], float]]] | None = None,
                 http: Callable[[], HttpMetrics | None] | None = None,
                 failure_log: FailureLog | None = None, extra: Iterable[Callable[[], Iterable]] = ()) -> None:
        self.dns_stats = dns_stats
        self.sources = sources
        self.gauges = gauges
        self.counters = counters or {}
        self.health = health
        self.http = http
        self.failure_log = failure_log
        self.extra = tuple(extra)

    def collect(self) -> Iterable:
        yield build_info()
        http = self.http() if self.http is not None else None
        if http is not None:
            yield from http.collect()
        if self.failure_log is not None:
            yield from failure_families(self.failure_log)
        for families in self.extra:
            yield from families()
        for name, (description, read) in self.counters.items():
            yield CounterMetricFamily(f"dnsmirror_{name}", description, value=read())
        dns = self.dns_stats()
        queries = CounterMetricFamily("dnsmirror_dns_queries", "DNS queries by outcome", labels=["outcome"])
        for outcome in DNS_OUTCOMES:
            queries.add_metric([outcome], getattr(dns, outcome))
        yield queries
        for name, description in DNS_LIMIT_COUNTERS.items():
            yield CounterMetricFamily(f"dnsmirror_dns_{name}", description, value=getattr(dns, name, 0))
        yield CounterMetricFamily("dnsmirror_health_changes", "Changes between capturing and failing open",
                                  value=dns.health_changes)
        yield GaugeMetricFamily("dnsmirror_mirror_healthy", "1 while captured names resolve to this mirror",
                                value=1 if self.health.healthy else 0)
        for prefix, source in self.sources.items():
            stats = source()
            if stats is None or not is_dataclass(stats):
                continue
            for field in fields(stats):
                value = getattr(stats, field.name)
                name = f"dnsmirror_{prefix}_{field.name}"
                if field.name.endswith("_max"):
                    yield GaugeMetricFamily(name, f"{prefix} {field.name.replace('_', ' ')}", value=value)
                else:
                    yield CounterMetricFamily(name, f"{prefix} {field.name.replace('_', ' ')}", value=value)
        for name, (description, read) in self.gauges.items():
            yield GaugeMetricFamily(f"dnsmirror_{name}", description, value=read())


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _Health(resource.Resource):
    isLeaf = True

    def __init__(self, health: Readiness | None) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.health is None or self.health.healthy:
            return b"ok\n"
        request.setResponseCode(503)
        return f"not ready: {self.health.reason}\n".encode()


def metrics_site(collector: StatsCollector, health: Readiness) -> server.Site:
    """The twisted.web site of the metrics listener."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    root = resource.Resource()
    root.putChild(b"metrics", _Metrics(registry))
    root.putChild(b"healthz", _Health(None))
    root.putChild(b"readyz", _Health(health))
    site = server.Site(root)
    site.displayTracebacks = False
    return site
