"""Failures logged once with host, repository, kind and reason, counted by kind; request metrics."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dnsmirror import failures, upstream
from dnsmirror.failures import FailureLog, fill_failure_kind, peer_kind, repository_of, upstream_kind
from dnsmirror.health import HealthState
from dnsmirror.metrics import HttpMetrics, StatsCollector
from dnsmirror.resolver import ResolutionError
from dnsmirror.store import DigestMismatch, StoreFull


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.WARNING, logger="dnsmirror.failures")
    return lambda: [record for record in caplog.records if record.name == "dnsmirror.failures"]


def test_a_failure_is_logged_at_warning_with_where_and_why_and_counted(records):
    log = FailureLog(Clock())
    log.report("upstream", "dns", "ghcr.io: lookup failed", host="ghcr.io", repository="team/app")
    [record] = records()
    assert record.levelno == logging.WARNING
    assert record.fields == {
        "event": "upstream_failure",
        "component": "upstream",
        "kind": "dns",
        "host": "ghcr.io",
        "repository": "team/app",
        "reason": "ghcr.io: lookup failed",
    }
    assert log.count("upstream", "dns") == 1


def test_a_burst_is_logged_once_per_interval_and_counted_exactly(records):
    clock = Clock()
    log = FailureLog(clock)
    for _ in range(1000):
        log.report("upstream", "connect", "refused", host="quay.io")
    log.report("upstream", "connect", "refused", host="ghcr.io")  # another host is its own line
    assert len(records()) == 2
    assert log.count("upstream", "connect") == 1001
    clock.now += failures.REPEAT_INTERVAL
    log.report("upstream", "connect", "refused", host="quay.io")
    assert records()[-1].fields["not_logged_since_last"] == 999


def test_unknown_kinds_and_long_reasons_stay_bounded(records):
    log = FailureLog(Clock())
    log.report("cache", "a-kind-nobody-declared", "x" * 10_000)
    assert log.count("cache", "other") == 1
    assert len(records()[0].fields["reason"]) < 400
    for index in range(5000):  # many hosts: the repeat table stays bounded
        log.report("peer", "timeout", "slow", host=f"10.0.{index // 256}.{index % 256}:5001")
    assert len(log._last_logged) <= 1000


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ResolutionError("ghcr.io", "lookup failed: [Errno 101] Network is unreachable"), "dns"),
        (upstream.UpstreamTimeout("GET https://ghcr.io/v2/: connect timed out after 5s"), "connect_timeout"),
        (
            upstream.UpstreamTimeout("GET https://ghcr.io/v2/: no response headers within 30s"),
            "first_byte_timeout",
        ),
        (upstream.UpstreamTimeout("GET https://ghcr.io/v2/: no body bytes for 60s"), "read_timeout"),
        (
            upstream.UpstreamTLSError("GET https://ghcr.io/v2/: TLS failed: certificate verify failed", True),
            "tls",
        ),
        (
            upstream.UpstreamUnavailable("GET https://ghcr.io/v2/a/blobs/x: body cut after 10 of 20 bytes"),
            "body_cut",
        ),
        (upstream.UpstreamUnavailable("GET https://ghcr.io/v2/: ConnectionRefusedError: refused"), "connect"),
        (upstream.RedirectRefused("refusing redirect to http URL"), "redirect"),
        (upstream.BodyTooLarge("too big"), "too_large"),
    ],
)
def test_upstream_failures_are_classified(exc, kind):
    assert upstream_kind(exc) == kind
    assert kind in failures.UPSTREAM_KINDS


def test_other_classifications():
    assert repository_of("https://ghcr.io/v2/team/app/blobs/sha256:ab") == "team/app"
    assert repository_of("https://auth.docker.io/token?scope=repository:x:pull") is None
    assert peer_kind("body broke off at byte 10: timeout") == "body_cut"
    assert peer_kind("User timeout caused connection failure.") == "timeout"
    assert peer_kind("Connection was refused by other side") == "refused"
    # a node of another secret (or without peers.tls) fails the handshake: not a body that failed verification
    assert peer_kind("ResponseNeverReceived: [('SSL routines', '', 'certificate verify failed')]") == "tls"
    assert peer_kind("body of sha256:ab failed verification: digest mismatch") == "digest_mismatch"
    assert peer_kind("body broke off at byte 10: SSL routines: decryption failed") == "body_cut"
    assert fill_failure_kind("upstream", StoreFull("full")) == ("cache", "full")
    assert fill_failure_kind("upstream", DigestMismatch("sha256:a", "sha256:b", 1)) == (
        "upstream",
        "digest_mismatch",
    )
    assert fill_failure_kind("containerd", DigestMismatch("sha256:a", "sha256:b", 1)) == ("cache", "damaged")
    # the peer client reports it
    assert fill_failure_kind("peer", DigestMismatch("sha256:a", "sha256:b", 1)) is None
    assert fill_failure_kind("upstream", None) is None  # a cut body: the upstream client reported it


class Dns:
    captured = forwarded = fail_open = refused = malformed = servfail = rejected = health_changes = 0


def scrape(collector) -> dict[str, dict]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, text


def test_metrics_follow_the_conventions():
    http = HttpMetrics()
    http.observe("GET", 200, "cache", 0.02, 1000)
    http.observe("GET", 502, None, 0.5, 90)
    http.observe("BREW", 418, "made-up", 1.0, 0)
    log = FailureLog(Clock())
    log.report("upstream", "dns", "lookup failed", host="ghcr.io")
    collector = StatsCollector(lambda: Dns(), {}, {"cache_bytes": ("bytes", lambda: 5)}, HealthState(),
                               counters={"cache_evictions": ("evicted", lambda: 3)}, http=lambda: http,
                               failure_log=log)
    samples, text = scrape(collector)
    assert samples[("dnsmirror_http_requests_total", (("method", "GET"), ("source", "cache"),
                                                      ("status_class", "2xx")))] == 1
    assert samples[("dnsmirror_http_requests_total", (("method", "GET"), ("source", "mirror"),
                                                      ("status_class", "5xx")))] == 1
    assert samples[("dnsmirror_http_requests_total", (("method", "other"), ("source", "other"),
                                                      ("status_class", "4xx")))] == 1
    assert samples[("dnsmirror_http_response_bytes_total", (("source", "cache"),))] == 1000
    assert (
        samples[("dnsmirror_http_request_duration_seconds_bucket", (("le", "0.025"), ("source", "cache")))]
        == 1
    )
    assert samples[("dnsmirror_http_request_duration_seconds_count", (("source", "mirror"),))] == 1
    assert samples[("dnsmirror_upstream_errors_total", (("kind", "dns"),))] == 1
    assert samples[("dnsmirror_upstream_errors_total", (("kind", "tls"),))] == 0
    assert samples[("dnsmirror_peer_errors_total", (("kind", "timeout"),))] == 0
    assert samples[("dnsmirror_cache_errors_total", (("kind", "full"),))] == 0
    assert samples[("dnsmirror_cache_evictions_total", ())] == 3
    assert "# TYPE dnsmirror_cache_evictions_total counter" in text
    assert "# TYPE dnsmirror_cache_bytes gauge" in text
    from dnsmirror import __version__
    assert any(name == "dnsmirror_build_info" and dict(labels)["version"] == __version__ and value == 1
               for (name, labels), value in samples.items())


def test_the_dns_servers_bounds_are_counted_on_metrics():
    from dnsmirror.dns.stats import DnsStats
    stats = DnsStats(overloaded=4, tcp_refused=2, tcp_timeouts=1, unsent=3)
    samples, text = scrape(StatsCollector(lambda: stats, {}, {}, HealthState()))
    assert samples[("dnsmirror_dns_unsent_total", ())] == 3
    assert samples[("dnsmirror_dns_overloaded_total", ())] == 4
    assert samples[("dnsmirror_dns_tcp_refused_total", ())] == 2
    assert samples[("dnsmirror_dns_tcp_timeouts_total", ())] == 1
    assert "# TYPE dnsmirror_dns_tcp_refused_total counter" in text
