"""Wiring of dnsmirror's services from a :class:`~dnsmirror.config.Config`, and ``serve``."""

from __future__ import annotations

import logging
import sys

from twisted.internet import error

from dnsmirror import logs
from dnsmirror.config import Config
from dnsmirror.dns import server as dnsserver
from dnsmirror.dns.forwarder import Forwarder
from dnsmirror.dns.packets import Responder
from dnsmirror.dns.resolvconf import default_upstreams
from dnsmirror.dns.stats import DnsStats
from dnsmirror.health import HealthState, ListenerProbe
from dnsmirror.logs import fields
from dnsmirror.patterns import HostMatcher

log = logging.getLogger("dnsmirror")


class ListenError(Exception):
    """A configured address could not be bound; the message names the key and the reason."""


class Services:
    """All listeners of one dnsmirror process. ``start`` binds everything or raises :class:`ListenError`."""

    def __init__(self, config: Config, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.matcher = HostMatcher(config.capture, config.skip)
        self.health = HealthState()
        self.dns_stats = DnsStats()
        self.upstreams = config.dns.upstreams or tuple(default_upstreams(config.dns.listen))
        self.responder = Responder(self.matcher, config.mirror.address, config.mirror.address6,
                                   config.dns.ttl, config.dns.answer_cache_size)
        self.forwarder = Forwarder(reactor, self.upstreams, config.dns.timeout)
        self.dns = dnsserver.DnsController(self.responder, self.forwarder, config.dns.allow, self.dns_stats)
        self.probe = ListenerProbe(reactor, self.health, config.https.listen, config.health.interval,
                                   config.health.timeout, config.health.failures)
        self.ports: list = []

    def _on_health(self, healthy: bool) -> None:
        self.responder.capture_enabled = healthy
        self.dns_stats.health_changes += 1

    def start(self) -> None:
        """Bind every listener and start the health probe."""
        try:
            for index, address in enumerate(self.config.dns.listen):
                try:
                    self.ports += dnsserver.listen(self.reactor, self.dns, address.host, address.port)
                except error.CannotListenError as exc:
                    raise ListenError(f"dns.listen[{index}]: cannot listen on {address} (UDP/TCP): "
                                      f"{_reason(exc)}") from exc
        except ListenError:
            self.stop()
            raise
        self.health.subscribe(self._on_health)
        self.probe.start()
        if not self.upstreams:
            log.warning("no upstream resolvers: set dns.upstreams; every forwarded query will get SERVFAIL")
        log.info(
            "dnsmirror started", extra=fields(
                dns=[str(a) for a in self.config.dns.listen], upstreams=[str(u) for u in self.upstreams],
                mirror=self.config.mirror.address, patterns=len(self.config.capture), config=self.config.source,
            ),
        )

    def stop(self) -> None:
        """Stop the probe and close every listener."""
        self.probe.stop()
        for port in self.ports:
            port.stopListening()
        self.ports = []


def _reason(exc: error.CannotListenError) -> str:
    reason = exc.socketError
    text = getattr(reason, "strerror", None) or str(reason)
    if getattr(reason, "errno", None) == 13:
        text += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return text


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    from twisted.internet import reactor

    logs.setup(config.log.format, config.log.level)
    services = Services(config, reactor)
    try:
        services.start()
    except ListenError as exc:
        log.error("%s", exc)
        print(f"dnsmirror: {exc}", file=sys.stderr)
        return 2
    reactor.addSystemEventTrigger("before", "shutdown", _stopping, services)
    reactor.run()
    return 0


def _stopping(services: Services) -> None:
    log.info("dnsmirror stopping")
    services.stop()
