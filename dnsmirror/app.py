"""Wiring of dnsmirror's services from a :class:`~dnsmirror.config.Config`, and ``serve``."""

from __future__ import annotations

import ipaddress
import logging
import signal

from twisted.internet import defer, error, task
from twisted.web import http, server

from dnsmirror import __version__, failures, logs
from dnsmirror import ca as camod
from dnsmirror.access import AccessLogSite
from dnsmirror.authz import Grants
from dnsmirror.bypass import TlsBypass
from dnsmirror.config import Config
from dnsmirror.content import ContentChain, ContentStats
from dnsmirror.dns import server as dnsserver
from dnsmirror.dns.child import ChildSettings, DnsProcess, bind_sockets
from dnsmirror.dns.forwarder import Forwarder
from dnsmirror.dns.packets import Responder
from dnsmirror.dns.resolvconf import default_upstreams
from dnsmirror.dns.stats import DnsStats
from dnsmirror.health import HealthState, ListenerProbe
from dnsmirror.https import HttpsBindError, HttpsListener
from dnsmirror.limits import (
    ConnectionLimiter,
    DescriptorBudget,
    current_limit,
    descriptors_in_use,
    plan_budget,
    raise_descriptor_limit,
    with_header_deadline,
)
from dnsmirror.logs import fields
from dnsmirror.metrics import StatsCollector, metrics_site
from dnsmirror.patterns import HostMatcher
from dnsmirror.peers import (
    Holders,
    PeerClient,
    PeerRequest,
    PeerResource,
    PeerSecretError,
    PeerSet,
    PeerStats,
    load_secret,
)
from dnsmirror.proxy import PassThrough
from dnsmirror.pulls import PullReporter
from dnsmirror.resolver import AddressPolicy, UpstreamResolver
from dnsmirror.store import ContainerdContentSource, Store, StoreError
from dnsmirror.streaming import DiskIO
from dnsmirror.tags import TagMemory
from dnsmirror.tls import CaWatcher, SniServer, TlsStats, prepare_signing
from dnsmirror.uploads import StreamingRequest
from dnsmirror.upstream import UpstreamClient
from dnsmirror.web import RegistryChannel, RegistryResource

log = logging.getLogger("dnsmirror")

HTTP_IDLE_TIMEOUT = 120


class ListenError(Exception):
    """A configured address could not be bound; the message names the key and the reason."""


class Services:
    """All listeners of one dnsmirror process. ``start`` binds everything or raises :class:`ListenError`."""

    def __init__(self, config: Config, reactor=None, web_site=None, dns_process: bool = False) -> None:
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
        self.tls_bypass = TlsBypass(reactor, config.upstream.tls_failure_bypass, self.responder.forget_answers)
        self.responder.bypassed = self.tls_bypass.bypassed
        self.forwarder = Forwarder(reactor, self.upstreams, config.dns.timeout)
        self.dns = dnsserver.DnsController(self.responder, self.forwarder, config.dns.allow, self.dns_stats)
        # serve runs the DNS in a process of its own (dnsmirror.dns.child); tests may keep it in-process
        self.dns_process: DnsProcess | None = None
        # what /readyz and dnsmirror_mirror_healthy follow: captured names resolve to the mirror
        self.ready = self.health
        self._dns_in_child = dns_process
        self.probe = ListenerProbe(reactor, self.health, config.health.targets or config.https.listen,
                                   config.health.interval,
                                   config.health.timeout, config.health.failures)
        self.ports: list = []
        self.tls_stats = TlsStats()
        self.web_site = web_site  # the twisted.web Site/Resource behind HTTPS; None = 503 placeholder
        self.https: HttpsListener | None = None
        self.ca_watcher: CaWatcher | None = None
        self.store: Store | None = None
        self.disk: DiskIO | None = None
        self.upstream: UpstreamClient | None = None
        self.content_stats = ContentStats()
        self.content: ContentChain | None = None
        self.passthrough: PassThrough | None = None
        self.peer_stats = PeerStats()
        self.peer_set: PeerSet | None = None
        self.peer_client: PeerClient | None = None
        listeners = tuple(name for name, used in (("https", config.https.listen), ("peers", config.peers.enabled),
                                                   ("metrics", config.metrics.listen is not None)) if used)
        self.budget: DescriptorBudget = plan_budget(current_limit(), descriptors_in_use(), listeners)
        self.limiters: dict[str, ConnectionLimiter] = {}
        self._health_heard = False
        self.site = None  # the HTTPS listener's Site (its http_metrics feed /metrics)
        self.pulls: PullReporter | None = None

    def _limited(self, name: str, factory) -> ConnectionLimiter:
        """``factory`` behind the connection caps the descriptor budget gives listener ``name``."""
        limiter = self.limiters[name] = ConnectionLimiter(factory, self.budget.caps(name), name, self.reactor)
        return limiter

    def _build_front(self):
        """The registry front: cache store, upstream client, content chain, pass-through."""
        cache = self.config.cache
        try:
            self.store = Store.open(cache.dir, cache.max_size, direct_writes=cache.direct_writes)
        except (StoreError, OSError) as exc:
            raise ListenError(f"cache.dir: cannot use {cache.dir}: {exc}") from exc
        self.disk = DiskIO(self.reactor, self.store)
        self.disk.start()
        self.upstream = UpstreamClient.from_config(self.config, self.reactor, fallback_resolvers=self.upstreams)
        self.upstream.on_tls_failure = self.tls_bypass.record_failure
        grants = Grants(cache.grant_ttl, cache.offline_grant_ttl)
        self.passthrough = PassThrough(self.reactor, self.upstream, self.disk, grants, TagMemory(), cache.stale_tags)
        containerd = ContainerdContentSource(cache.containerd_content) if cache.containerd_content else None
        self.content = ContentChain(self.reactor, self.disk, self.upstream, grants, self.passthrough,
                                    self.content_stats, containerd, self._start_peers())
        # idle keep-alive connections are closed after this; a request in progress is never timed out
        self.pulls = PullReporter(self.reactor)
        self.pulls.start()
        site = AccessLogSite(RegistryResource(self.matcher, self.content, self.passthrough, self.pulls),
                             access=self.config.log.access, requestFactory=StreamingRequest, timeout=HTTP_IDLE_TIMEOUT,
                             observers=(self.pulls.request_ended,))
        site.protocol = with_header_deadline(RegistryChannel)
        site.displayTracebacks = False
        return site

    def _start_peers(self) -> PeerClient | None:
        """The peer listener, membership and client, when peers are configured; raises :class:`ListenError`."""
        peers = self.config.peers
        if not peers.enabled:
            return None
        try:
            secret = load_secret(peers.secret_file)
        except PeerSecretError as exc:
            raise ListenError(str(exc)) from exc
        resolve = None
        if peers.dns_name:
            if not (peers.resolvers or self.upstreams):
                raise ListenError("peers.resolvers: no DNS server to resolve peers.dns_name with "
                                  "(set peers.resolvers or dns.upstreams)")
            # the peers' Service name: internal addresses are what it is expected to resolve to
            names = UpstreamResolver(peers.resolvers or self.upstreams, reactor=self.reactor,
                                     timeout=self.config.dns.timeout, policy=AddressPolicy(allow_internal=True),
                                     max_ttl=peers.refresh)
            resolve = names.resolve
        self.peer_set = PeerSet(self.reactor, peers.static, peers.dns_name, peers.listen.port, resolve,
                                peers.refresh)
        holders = Holders()
        listener = PeerResource(self.reactor, self.disk, secret, holders, self.peer_stats, peers.listen.port,
                                running_fill=lambda digest: self.content and self.content.running_fill(digest))
        site = server.Site(listener, requestFactory=PeerRequest, timeout=HTTP_IDLE_TIMEOUT)
        site.protocol = with_header_deadline(http.HTTPChannel)
        site.displayTracebacks = False
        try:
            self.ports.append(self.reactor.listenTCP(peers.listen.port, self._limited("peers", site),
                                                     interface=peers.listen.host))
        except error.CannotListenError as exc:
            raise ListenError(f"peers.listen: cannot listen on {peers.listen}: {_reason(exc)}") from exc
        self.peer_set.start()
        if ipaddress.ip_address(peers.listen.host).is_loopback:
            log.warning("peers.listen is a loopback address: other nodes cannot fetch from this one",
                        extra=fields(event="peers_unreachable", listen=str(peers.listen)))
        # a peer whose body stalls this long is given up and upstream sends the rest
        read_timeout = min(max(5 * peers.timeout, 5.0), self.config.upstream.read_timeout)
        self.peer_client = PeerClient(self.reactor, self.peer_set, holders, secret, peers.lookup, peers.timeout,
                                      read_timeout, self.peer_stats)
        self.peer_client.start_announcing(self.store.digests, self.disk.run)
        log.info("peers listening", extra=fields(peers=str(peers.listen), static=[str(p) for p in peers.static],
                                                 dns_name=peers.dns_name))
        return self.peer_client

    def _load_ca(self):
        """Load and check the CA files (raises :class:`~dnsmirror.ca.CaError`) and pre-generate the leaf key."""
        tls = self.config.tls
        authority, warnings = camod.load_authority(tls.ca_cert, tls.ca_key, self.config.capture)
        for warning in warnings:
            log.warning("%s", warning, extra=fields(event="ca_expiring"))
        return prepare_signing(authority)

    def _start_https(self, signing) -> None:
        tls = self.config.tls
        sni = SniServer(self.matcher, signing, leaf_validity=tls.leaf_validity,
                        cache_size=tls.leaf_cache_size, stats=self.tls_stats)
        site = self.web_site if self.web_site is not None else self._build_front()
        self.site = site
        self.https = HttpsListener(self.reactor, self.config.https.listen, sni, site, self.budget.caps("https"))
        try:
            self.https.start()
            self.limiters["https"] = self.https.limiter
        except HttpsBindError as exc:
            raise ListenError(f"https.listen[{exc.index}]: cannot listen on {exc.address}: "
                              f"{_reason(exc.cause)}") from exc
        self.ca_watcher = CaWatcher(self.reactor, sni, tls.ca_cert, tls.ca_key, self.config.capture,
                                    tls.reload_interval)
        self.ca_watcher.start()

    def _start_metrics(self) -> None:
        collector = StatsCollector(
            lambda: self.dns_stats,
            {"tls": lambda: self.tls_stats, "content": lambda: self.content_stats, "peers": lambda: self.peer_stats},
            {
                "cache_bytes": ("Bytes of committed content in the cache",
                                lambda: self.store.total_size if self.store else 0),
                "cache_max_bytes": ("cache.max_size: the cache is kept below this many bytes",
                                    lambda: self.config.cache.max_size),
                "cache_blobs": ("Blobs in the cache", lambda: self.store.blob_count if self.store else 0),
                "tls_bypassed_registries": ("Registries not captured now because their certificate failed "
                                            "verification", lambda: self.tls_bypass.active),
                "dns_upstreams_down": ("Upstream resolvers skipped now (timed out or refused; probed until they "
                                       "answer)", self._upstreams_down),
            },
            self.ready,
            counters={
                "cache_evictions": ("Blobs evicted since start", lambda: self.store.evictions if self.store else 0),
                "stale_tag_answers": ("Tags answered from the last known digest while upstream was unreachable",
                                      lambda: self.passthrough.stale_answers if self.passthrough else 0),
                "streamed_request_bodies": ("Request bodies (pushes) streamed upstream as they arrived",
                                            lambda: self.passthrough.streamed_bodies if self.passthrough else 0),
                "tls_bypasses": ("Times a registry stopped being captured because its certificate failed "
                                 "verification", lambda: self.tls_bypass.started),
                **{f"{name}_connections_refused": (f"Connections the {name} listener refused at its cap",
                                                   lambda name=name: self._limiter_stat(name, "refused"))
                   for name in ("https", "peers", "metrics")},
                **{f"{name}_connections_evicted": (f"Connections the {name} listener closed to make room for a "
                                                   "client holding fewer",
                                                   lambda name=name: self._limiter_stat(name, "evicted"))
                   for name in ("https", "peers", "metrics")},
            },
            http=lambda: getattr(self.site, "http_metrics", None),
            failure_log=failures.failures,
            extra=(lambda: self.pulls.families() if self.pulls else (),),
        )
        address = self.config.metrics.listen
        if address is None:
            return
        site = metrics_site(collector, self.ready)
        site.protocol = with_header_deadline(http.HTTPChannel)
        site.timeout = HTTP_IDLE_TIMEOUT
        try:
            self.ports.append(self.reactor.listenTCP(address.port, self._limited("metrics", site),
                                                     interface=address.host))
        except error.CannotListenError as exc:
            raise ListenError(f"metrics.listen: cannot listen on {address}: {_reason(exc)}") from exc

    def _limiter_stat(self, name: str, stat: str) -> int:
        limiter = self.limiters.get(name)
        return getattr(limiter.stats, stat) if limiter is not None else 0

    def _upstreams_down(self) -> int:
        if self.dns_process is not None:
            return self.dns_process.upstreams_down
        return len(self.forwarder.table.down())

    def _on_health(self, healthy: bool) -> None:
        if self._health_heard:  # subscribe calls this once with the current state, which is not a change
            self.dns_stats.health_changes += 1
        self._health_heard = True
        self.responder.capture_enabled = healthy

    def start(self) -> None:
        """Bind every listener and start the health probe; raises :class:`ListenError` or
        :class:`~dnsmirror.ca.CaError` (checked before anything is bound)."""
        # DNS-only mode (https.listen: []) serves no TLS, so it needs no CA
        signing = self._load_ca() if self.config.https.listen else None
        try:
            if self._dns_in_child:
                self.dns_process = start_dns_process(self.reactor, self.config, self.upstreams, self.dns_stats,
                                                     self.health, self.tls_bypass, self.responder)
                self.ready = self.dns_process.readiness
            for index, address in enumerate(() if self._dns_in_child else self.config.dns.listen):
                try:
                    self.ports += dnsserver.listen(self.reactor, self.dns, address.host, address.port)
                except error.CannotListenError as exc:
                    raise ListenError(f"dns.listen[{index}]: cannot listen on {address} (UDP/TCP): "
                                      f"{_reason(exc)}") from exc
            if signing is not None:
                self._start_https(signing)
            self._start_metrics()
        except ListenError:
            self.stop()
            raise
        self.health.subscribe(self._on_health)
        self.probe.start()
        log.info("descriptor budget: %s", self.budget.summary(),
                 extra=fields(event="descriptor_budget", **self.budget.describe()))
        if not self.upstreams:
            log.warning("no upstream resolvers: set dns.upstreams; every forwarded query will get SERVFAIL")
        log.info(
            "dnsmirror started", extra=fields(
                version=__version__, dns=[str(a) for a in self.config.dns.listen], upstreams=[str(u) for u in self.upstreams],
                mirror=self.config.mirror.address, patterns=len(self.config.capture), config=self.config.source,
                **({"egress_proxy": str(self.upstream.proxy)} if self.upstream and self.upstream.proxy else {}),
            ),
        )

    def stop(self) -> None:
        """Stop the probe and close every listener; captured names fail open at once."""
        self.probe.stop()
        if self.https is not None:
            # the DNS must stop sending clients here before the HTTPS listener goes away
            self.health.set(False, "HTTPS listener stopped")
            self.https.stop()
            self.https = None
        if self.ca_watcher is not None:
            self.ca_watcher.stop()
            self.ca_watcher = None
        if self.peer_set is not None:
            self.peer_set.stop()
            self.peer_set = None
        if self.peer_client is not None:
            self.peer_client.stop_announcing()
            self.peer_client.close()
            self.peer_client = None
        if self.pulls is not None:
            self.pulls.stop()
            self.pulls = None
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.disk is not None:
            self.disk.stop()
            self.disk = None
        if self.store is not None:
            self.store.close()
            self.store = None
        for port in self.ports:
            port.stopListening()
        self.ports = []
        self.forwarder.stop()
        if self.dns_process is not None:
            self.dns_process.stop()
            self.dns_process = None


def start_dns_process(reactor, config: Config, upstreams, stats: DnsStats, health: HealthState,
                      tls_bypass: TlsBypass, responder: Responder) -> DnsProcess:
    """Bind ``dns.listen`` here (errors name the key) and start the DNS process on those sockets."""
    sockets = []
    try:
        for index, address in enumerate(config.dns.listen):
            try:
                sockets += bind_sockets(address.host, address.port)
            except OSError as exc:
                text = exc.strerror or str(exc)
                if exc.errno == 13:
                    text += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                raise ListenError(f"dns.listen[{index}]: cannot listen on {address} (UDP/TCP): {text}") from exc
    except ListenError:
        for sock in sockets:
            sock.close()
        raise
    health_cfg = config.health
    settings = ChildSettings(
        listen=[(a.host, a.port) for a in config.dns.listen], upstreams=[(u.host, u.port) for u in upstreams],
        timeout=config.dns.timeout, allow=[str(n) for n in config.dns.allow], ttl=config.dns.ttl,
        answer_cache_size=config.dns.answer_cache_size, address=config.mirror.address,
        address6=config.mirror.address6, capture=list(config.capture), skip=list(config.skip),
        log_format=config.log.format, log_level=config.log.level,
        # the parent's word is stale after the probe could have declared the mirror down, and then some
        stale_after=max(3 * health_cfg.interval, health_cfg.interval * health_cfg.failures + health_cfg.timeout) + 1,
    )
    process = DnsProcess(reactor, settings, sockets, stats, health, tls_bypass, health_cfg.interval)
    tls_bypass.on_start = lambda: (responder.forget_answers(), process.tell())
    process.start()
    return process


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
    raise_descriptor_limit()
    services = Services(config, reactor, dns_process=config.dns.own_process)
    try:
        services.start()
    except camod.CaError as exc:
        # the log goes to stderr: one line, not two
        log.error("refusing to start: %s", exc)
        return 2
    except ListenError as exc:
        log.error("%s", exc)
        return 2
    reactor.addSystemEventTrigger("before", "shutdown", _stopping, services)
    reactor.run()
    return 0


def drain_seconds(config: Config) -> float:
    """How long a stopping mirror keeps serving after it stopped capturing: clients may hold a captured
    answer for ``dns.ttl`` seconds, so the listeners stay until those answers expired (at most 30 s)."""
    if not config.https.listen:
        return 0.0
    return min(config.dns.ttl + 1.0, 30.0)


def _stopping(services: Services):
    """Fail open at once, keep serving while captured answers expire, then close everything."""
    delay = drain_seconds(services.config)
    log.info("dnsmirror stopping", extra=fields(drain_seconds=delay))
    services.probe.stop()
    services.health.set(False, "shutting down")
    if delay <= 0:
        services.stop()
        return None
    drain = task.deferLater(services.reactor, delay, services.stop)

    def stop_now(signum, frame) -> None:
        # a second SIGTERM or SIGINT during the drain: stop at once
        services.reactor.callFromThread(drain.cancel)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_now)

    def cancelled(failure):
        failure.trap(defer.CancelledError)
        services.stop()

    return drain.addErrback(cancelled)
