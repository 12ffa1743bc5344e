"""Prometheus metrics, liveness and readiness on ``metrics.listen``.

``/metrics`` exposes the counters the services keep (plain dataclasses, cheap to bump on hot paths),
read only when scraped; ``/healthz`` answers 200 while the process serves; ``/readyz`` answers 200
while the mirror is healthy (captured names resolve to it) and 503 with the reason otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource, server

from dnsmirror.health import HealthState

DNS_OUTCOMES = ("captured", "forwarded", "fail_open", "refused", "malformed", "servfail", "rejected")


class StatsCollector:
    """Turns the services' counter dataclasses into metric families at scrape time.

    ``sources`` maps a metric prefix (``tls``, ``content``) to a callable returning the dataclass;
    a field becomes ``dnsmirror_<prefix>_<field>_total`` (a counter), or a gauge when its name ends
    in ``_max``. DNS outcomes become one counter with an ``outcome`` label.
    """

    def __init__(self, dns_stats: Callable[[], object], sources: dict[str, Callable[[], object]],
                 gauges: dict[str, tuple[str, Callable[[], float]]], health: HealthState) -> None:
        self.dns_stats = dns_stats
        self.sources = sources
        self.gauges = gauges
        self.health = health

    def collect(self) -> Iterable:
        dns = self.dns_stats()
        queries = CounterMetricFamily("dnsmirror_dns_queries", "DNS queries by outcome", labels=["outcome"])
        for outcome in DNS_OUTCOMES:
            queries.add_metric([outcome], getattr(dns, outcome))
        yield queries
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

    def render_GET(self, request) -> bytes:  # noqa: N802 - twisted.web's naming
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _Health(resource.Resource):
    isLeaf = True

    def __init__(self, health: HealthState | None) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request) -> bytes:  # noqa: N802 - twisted.web's naming
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.health is None or self.health.healthy:
            return b"ok\n"
        request.setResponseCode(503)
        return f"not ready: {self.health.reason}\n".encode()


def metrics_site(collector: StatsCollector, health: HealthState) -> server.Site:
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
