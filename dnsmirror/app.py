"""Wiring of dnsmirror's services from a :class:`~dnsmirror.config.Config`, and ``serve``."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from twisted.application import service
from twisted.internet import defer, error, task
from twisted.web import http, server

from dnsmirror import __version__, allocator, bulk, failures, logs
from dnsmirror import ca as camod
from dnsmirror.access import AccessLogSite
from dnsmirror.authz import Grants
from dnsmirror.bypass import TlsBypass
from dnsmirror.config import Config
from dnsmirror.content import ContentChain, ContentStats
from dnsmirror.dns import priority
from dnsmirror.dns import server as dnsserver
from dnsmirror.dns.child import ChildSettings, DnsProcess, DnsProcesses
from dnsmirror.dns.forwarder import Forwarder
from dnsmirror.dns.packets import Responder
from dnsmirror.dns.resolvconf import default_upstreams
from dnsmirror.dns.stats import DnsStats
from dnsmirror.health import HealthState, ListenerProbe
from dnsmirror.https import HttpsBindError, HttpsListener
from dnsmirror.limits import (
    LISTENERS,
    PEER_CONNECTIONS_BURST,
    PEER_CONNECTIONS_PER_SECOND,
    ConnectionLimiter,
    DescriptorBudget,
    NewConnectionRate,
    current_limit,
    descriptors_in_use,
    plan_budget,
    raise_descriptor_limit,
    with_header_deadline,
)
from dnsmirror.logs import fields
from dnsmirror.metrics import Readiness as ReadinessView
from dnsmirror.metrics import StatsCollector, metrics_site
from dnsmirror.patterns import HostMatcher
from dnsmirror.peer_tls import PeerTLS
from dnsmirror.peers import (
    Holders,
    PeerClient,
    PeerRequest,
    PeerResource,
    PeerSecretError,
    PeerSet,
    PeerStats,
    UploadSlots,
    load_secret,
)
from dnsmirror.proxy import PassThrough
from dnsmirror.pulls import PullReporter
from dnsmirror.resolver import AddressPolicy, UpstreamResolver
from dnsmirror.store import ContainerdContentSource, Store, StoreError
from dnsmirror.streaming import DiskIO
from dnsmirror.swarm_node import SwarmDriver, SwarmStats, node_settings
from dnsmirror.tags import TagMemory
from dnsmirror.tls import CaWatcher, SniServer, TlsStats, prepare_signing
from dnsmirror.uploads import StreamingRequest
from dnsmirror.upstream import UpstreamClient
from dnsmirror.web import RegistryChannel, RegistryResource

log = logging.getLogger("dnsmirror")

HTTP_IDLE_TIMEOUT = 120


class ListenError(Exception):
    """A configured address could not be bound; the message names the key and the reason."""


class _Child(service.Service):
    """One part of the running mirror as a child service: ``start`` binds or starts it (raising before it
    counts as running, so a failed bind is not stopped), ``stop`` closes it."""

    def __init__(self, name: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        self._start()
        super().startService()

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()
        # a Deferred (closing idle pooled connections) is not waited for: exit is not held up by it
        self._stop()


def _stop_listening(ports: list) -> Callable[[], None]:
    def stop() -> None:
        for port in ports:
            port.stopListening()
    return stop


class Services(service.MultiService):
    """All listeners of one dnsmirror process, each a child service: the DNS, HTTPS, peers and metrics
    listeners, and the background services (health probe, CA watcher, peer discovery and announcement,
    pull reporter, disk pool). ``start`` binds everything or raises :class:`ListenError`; ``stopService``
    fails open at once and drains (its Deferred fires when everything is closed); ``stop`` closes at once."""

    def __init__(self, config: Config, reactor=None, web_site=None, dns_process: bool = False) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.matcher = HostMatcher(config.capture, config.skip)
        self.health = HealthState()
        self.dns_stats = DnsStats()
        self.upstreams = config.dns.upstreams or tuple(default_upstreams(config.dns.listen))
        self.tls_bypass = TlsBypass(reactor, config.upstream.tls_failure_bypass)
        # serve runs the DNS in a process of its own (dnsmirror.dns.child), which has its own responder
        # and forwarder; tests may keep the DNS in this process, answered by these
        self.responder: Responder | None = None
        self.dns: dnsserver.DnsController | None = None
        if not dns_process:
            self.responder = Responder(self.matcher, config.mirror.address, config.mirror.address6,
                                       config.dns.ttl, config.dns.answer_cache_size)
            self.tls_bypass.on_start = self.responder.forget_answers
            self.responder.bypassed = self.tls_bypass.bypassed
            forwarder = Forwarder(reactor, self.upstreams, config.dns.timeout)
            self.dns = dnsserver.DnsController(self.responder, forwarder, config.dns.allow, self.dns_stats)
        self.dns_process: DnsProcesses | None = None
        # what /readyz and dnsmirror_mirror_healthy follow (captured names resolve to the mirror): the
        # health state, or the DNS process's word on it
        self.ready: ReadinessView = self.health
        self.probe = ListenerProbe(reactor, self.health, config.health.targets or config.https.listen,
                                   config.health.interval,
                                   config.health.timeout, config.health.failures)
        self.tls_stats = TlsStats()
        self.web_site = web_site  # the twisted.web Site/Resource behind HTTPS; None = 503 placeholder
        self.content_stats = ContentStats()
        self.peer_stats = PeerStats()
        self.swarm_stats = SwarmStats()
        self.upload_slots: UploadSlots | None = None
        listeners = tuple(
            name
            for name, used in (
                ("https", config.https.listen),
                ("peers", config.peers.enabled),
                ("metrics", config.metrics.listen is not None),
            )
            if used
        )
        self.budget: DescriptorBudget = plan_budget(current_limit(), descriptors_in_use(), listeners)
        self.limiters: dict[str, ConnectionLimiter] = {}
        self._health_heard = False
        # set once the registry front is built (HTTPS enabled, no web_site given)
        self.front: Front | None = None
        self.site = None  # the HTTPS listener's Site (its http_metrics feed /metrics)
        self._closed = False

    def _run(self, name: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
        """Add a child service; the parent is running, so it starts now (and raises if it cannot)."""
        _Child(name, start, stop).setServiceParent(self)

    def _listen_tcp(self, name: str, key: str, address, factory,
                    rate: NewConnectionRate | None = None) -> None:
        """A listener child service ``name`` on ``address`` (taking new connections from one address at
        ``rate``, when given); a bind error names config ``key``."""
        ports: list = []

        def bind() -> None:
            try:
                # a deep accept queue, as the HTTPS listener's: a burst (or a flood the limiter refuses) must
                # not make the kernel drop other hosts' connection attempts (each then waits a second)
                port = self.reactor.listenTCP(address.port, self._limited(name, factory, rate),
                                              interface=address.host, backlog=1024)
                ports.append(bulk.gather_writes(port))
            except error.CannotListenError as exc:
                raise ListenError(f"{key}: cannot listen on {address}: {_reason(exc)}") from exc

        self._run(f"{name} listener", bind, _stop_listening(ports))

    def _limited(self, name: str, factory, rate: NewConnectionRate | None = None) -> ConnectionLimiter:
        """``factory`` behind the connection caps the descriptor budget gives listener ``name`` (and
        ``rate``, when given)."""
        limiter = self.limiters[name] = ConnectionLimiter(factory, self.budget.caps(name), name, self.reactor,
                                                          rate)
        return limiter

    def _build_front(self):
        """The registry front: cache store, upstream client, content chain, pass-through."""
        cache = self.config.cache
        try:
            store = Store.open(cache.dir, cache.max_size, direct_writes=cache.direct_writes)
        except (StoreError, OSError) as exc:
            raise ListenError(f"cache.dir: cannot use {cache.dir}: {exc}") from exc
        disk = DiskIO(self.reactor, store)

        def close_disk() -> None:
            disk.stop()
            store.close()

        self._run("disk pool", disk.start, close_disk)
        upstream = UpstreamClient.from_config(self.config, self.reactor, fallback_resolvers=self.upstreams)
        upstream.on_tls_failure = self.tls_bypass.record_failure
        self._run("upstream client", lambda: None, upstream.close)
        grants = Grants(cache.grant_ttl, cache.offline_grant_ttl)
        passthrough = PassThrough(self.reactor, upstream, disk, grants, TagMemory(), cache.stale_tags)
        containerd = ContainerdContentSource(cache.containerd_content) if cache.containerd_content else None
        peer_client, swarm_driver = self._start_peers(store, disk)
        content = ContentChain(self.reactor, disk, upstream, grants, passthrough,
                               self.content_stats, containerd, peer_client, swarm_driver)
        pulls = PullReporter(self.reactor)
        self._run("pull reporter", pulls.start, pulls.stop)
        self.front = Front(store, upstream, passthrough, content, pulls)
        # idle keep-alive connections are closed after this; a request in progress is never timed out
        site = AccessLogSite(
            RegistryResource(self.matcher, content, passthrough, pulls),
            access=self.config.log.access,
            requestFactory=StreamingRequest,
            timeout=HTTP_IDLE_TIMEOUT,
            observers=(pulls.request_ended,),
        )
        site.protocol = with_header_deadline(RegistryChannel)
        site.displayTracebacks = False
        return site

    def _start_peers(self, store: Store, disk: DiskIO) -> tuple[PeerClient | None, SwarmDriver | None]:
        """The peer listener, membership, client and burst coordination, when peers are configured; raises
        :class:`ListenError`."""
        peers = self.config.peers
        if not peers.enabled:
            return None, None
        try:
            secret = load_secret(peers.secret_file)  # type: ignore[arg-type]  # set whenever peers are enabled
        except PeerSecretError as exc:
            raise ListenError(str(exc)) from exc
        # derived from the secret: every node holds the same identity, nothing to hand out
        tls = PeerTLS(secret) if peers.tls else None
        resolve = None
        if peers.dns_name:
            if not (peers.resolvers or self.upstreams):
                raise ListenError("peers.resolvers: no DNS server to resolve peers.dns_name with "
                                  "(set peers.resolvers or dns.upstreams)")
            # the peers' Service name: internal addresses are what it is expected to resolve to
            names = UpstreamResolver(
                peers.resolvers or self.upstreams,
                reactor=self.reactor,
                timeout=self.config.dns.timeout,
                policy=AddressPolicy(allow_internal=True),
                max_ttl=peers.refresh,
            )
            resolve = names.resolve
        peer_set = PeerSet(self.reactor, peers.static, peers.dns_name, peers.listen.port, resolve,
                           peers.refresh)
        holders = Holders()
        self.upload_slots = UploadSlots(self.peer_stats, peers.max_uploads)
        listener = PeerResource(
            self.reactor,
            disk,
            secret,
            holders,
            self.peer_stats,
            peers.listen.port,
            running_fill=lambda digest: (
                self.front.content.running_fill(digest) if self.front is not None else None
            ),
            uploads=self.upload_slots,
        )
        site = server.Site(listener, requestFactory=PeerRequest, timeout=HTTP_IDLE_TIMEOUT)
        # twisted.web declares Site.protocol as a function; any channel type is meant
        site.protocol = with_header_deadline(http.HTTPChannel)  # type: ignore[method-assign]
        site.displayTracebacks = False
        # open to the node network: new connections per address at a bounded rate (a refused peer costs a
        # fetch upstream; a refused local client would be a failed pull, so the other listeners have none)
        rate = NewConnectionRate(PEER_CONNECTIONS_PER_SECOND, PEER_CONNECTIONS_BURST)
        self._listen_tcp("peers", "peers.listen", peers.listen, site if tls is None else tls.listening(site),
                         rate)
        self._run("peer discovery", peer_set.start, peer_set.stop)
        if ipaddress.ip_address(peers.listen.host).is_loopback:
            log.warning("peers.listen is a loopback address: other nodes cannot fetch from this one",
                        extra=fields(event="peers_unreachable", listen=str(peers.listen)))
        # a peer whose body stalls this long is given up and upstream sends the rest
        read_timeout = min(max(5 * peers.timeout, 5.0), self.config.upstream.read_timeout)
        client_tls = None if tls is None else tls.client_creator
        peer_client = PeerClient(self.reactor, peer_set, holders, secret, peers.lookup, peers.timeout,
                                 read_timeout, self.peer_stats, tls=client_tls)
        # this node's address as its peers list it: peers.listen, unless that is a wildcard
        me = None if ipaddress.ip_address(peers.listen.host).is_unspecified else peers.listen
        swarm_driver = SwarmDriver(self.reactor, me, peer_set, secret, node_settings(peers.max_uploads),
                                   peers.timeout, read_timeout, self.swarm_stats, tls=client_tls)
        listener.on_message = swarm_driver.receive
        self.upload_slots.on_start = swarm_driver.upload_started
        self.upload_slots.on_end = swarm_driver.upload_ended
        self._run("burst coordination", swarm_driver.start, swarm_driver.stop)

        def stop_announcing() -> None:
            peer_client.stop_announcing()
            peer_client.close()

        self._run("peer announcement", lambda: peer_client.start_announcing(store.digests, disk.run),
                  stop_announcing)
        log.info(
            "peers listening",
            extra=fields(
                peers=str(peers.listen), static=[str(p) for p in peers.static], dns_name=peers.dns_name,
                # the same on every node of one secret: a node showing another cannot talk to the rest
                tls=tls.identity.fingerprint[:16] if tls is not None else "off",
            ),
        )
        return peer_client, swarm_driver

    def _load_ca(self):
        """Load and check the CA files (raises :class:`~dnsmirror.ca.CaError`) and pre-generate the leaf
        key."""
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
        https = HttpsListener(self.reactor, self.config.https.listen, sni, site, self.budget.caps("https"))

        def bind() -> None:
            try:
                https.start()
            except HttpsBindError as exc:
                raise ListenError(f"https.listen[{exc.index}]: cannot listen on {exc.address}: "
                                  f"{_reason(exc.cause)}") from exc
            if https.limiter is not None:
                self.limiters["https"] = https.limiter

        def stop() -> None:
            # the DNS must stop sending clients here before the HTTPS listener goes away
            self.health.set(False, "HTTPS listener stopped")
            https.stop()

        self._run("https listener", bind, stop)
        ca_watcher = CaWatcher(self.reactor, sni, tls.ca_cert, tls.ca_key, self.config.capture,
                               tls.reload_interval)
        self._run("CA watcher", ca_watcher.start, ca_watcher.stop)

    def _front_value(self, read: Callable[[Front], int]) -> int:
        """A gauge or counter of the registry front; 0 while there is none (DNS-only mode)."""
        return read(self.front) if self.front is not None else 0

    def _start_metrics(self) -> None:
        collector = StatsCollector(
            lambda: self.dns_stats,
            {
                "tls": lambda: self.tls_stats,
                "content": lambda: self.content_stats,
                "peers": lambda: self.peer_stats,
                "swarm": lambda: self.swarm_stats,
            },
            {
                "cache_bytes": (
                    "Bytes of committed content in the cache",
                    lambda: self._front_value(lambda front: front.store.total_size),
                ),
                "cache_max_bytes": (
                    "cache.max_size: the cache is kept below this many bytes",
                    lambda: self.config.cache.max_size,
                ),
                "cache_blobs": (
                    "Blobs in the cache",
                    lambda: self._front_value(lambda front: front.store.blob_count),
                ),
                "tls_bypassed_registries": (
                    "Registries not captured now because their certificate failed verification",
                    lambda: self.tls_bypass.active,
                ),
                "peers_tls": (
                    "1 when traffic with peer nodes is TLS (peers.tls), 0 in the clear or without peers: "
                    "nodes that differ cannot share",
                    lambda: int(self.config.peers.enabled and self.config.peers.tls),
                ),
                "peers_uploads": (
                    "Blob streams this node sends to peers now",
                    lambda: self.upload_slots.total if self.upload_slots is not None else 0,
                ),
                "peers_uploads_per_blob": (
                    "The most concurrent streams of one blob this node sends to peers now (at most "
                    "peers.max_uploads)",
                    lambda: self.upload_slots.busiest if self.upload_slots is not None else 0,
                ),
                "dns_upstreams_down": (
                    "Upstream resolvers skipped now (timed out or refused; probed until they answer)",
                    self._upstreams_down,
                ),
                "dns_priority_gap": (
                    "Nice steps the DNS process runs above the mirror's blob work (dns.cpu_priority; 0 while "
                    "DNS runs in the mirror process)",
                    lambda: (self.dns_process.priority_gap or 0) if self.dns_process is not None else 0,
                ),
                "dns_realtime": (
                    "1 while every DNS process runs at real-time priority (dns.realtime, where allowed, "
                    "while the machine is busy and within their CPU budget), else 0",
                    lambda: int(self.dns_process is not None and self.dns_process.realtime),
                ),
                "dns_processes": (
                    "DNS processes answering now (dns.processes; 0 while DNS runs in the mirror process)",
                    lambda: self.dns_process.running if self.dns_process is not None else 0,
                ),
                **self._per_listener("connections", "Connections the {} listener holds now",
                                     lambda limiter: limiter.table.total),
                **self._per_listener("connections_serving",
                                     "Of the {} listener's connections, those serving a request now (never "
                                     "closed to make room for another client)",
                                     lambda limiter: limiter.table.serving()),
                **self._per_listener("connections_cap",
                                     "Connections the {} listener may hold, from the descriptor budget",
                                     lambda limiter: limiter.table.caps.total),
            },
            self.ready,
            counters={
                "cache_evictions": (
                    "Blobs evicted since start",
                    lambda: self._front_value(lambda front: front.store.evictions),
                ),
                "stale_tag_answers": (
                    "Tags answered from the last known digest while upstream was unreachable",
                    lambda: self._front_value(lambda front: front.passthrough.stale_answers),
                ),
                "streamed_request_bodies": (
                    "Request bodies (pushes) streamed upstream as they arrived",
                    lambda: self._front_value(lambda front: front.passthrough.streamed_bodies),
                ),
                "tls_bypasses": (
                    "Times a registry stopped being captured because its certificate failed verification",
                    lambda: self.tls_bypass.started,
                ),
                **self._per_listener("connections_refused",
                                     "Connections the {} listener refused at its caps (or, for peers, above "
                                     "the new connections an address may open per second)",
                                     lambda limiter: limiter.stats.refused),
                **self._per_listener("connections_evicted",
                                     "Idle connections the {} listener closed to make room for another "
                                     "client",
                                     lambda limiter: limiter.stats.evicted),
            },
            http=lambda: getattr(self.site, "http_metrics", None),
            failure_log=failures.failures,
            extra=(lambda: self.front.pulls.families() if self.front is not None else (),),
        )
        address = self.config.metrics.listen
        if address is None:
            return
        site = metrics_site(collector, self.ready)
        # twisted.web declares Site.protocol as a function; any channel type is meant
        site.protocol = with_header_deadline(http.HTTPChannel)  # type: ignore[method-assign]
        # idle scrape connections are closed like the mirror's (twisted.web's attribute is timeOut)
        site.timeOut = HTTP_IDLE_TIMEOUT
        self._listen_tcp("metrics", "metrics.listen", address, site)

    def _per_listener(
        self, suffix: str, description: str, read: Callable[[ConnectionLimiter], int]
    ) -> dict[str, tuple[str, Callable[[], float]]]:
        """One metric per listener (``<listener>_<suffix>``), read from its limiter; 0 where it is not
        configured. ``description`` has a ``{}`` for the listener's name."""
        return {f"{name}_{suffix}": (description.format(name), partial(self._limiter_value, name, read))
                for name in LISTENERS}

    def _limiter_value(self, name: str, read: Callable[[ConnectionLimiter], int]) -> int:
        limiter = self.limiters.get(name)
        return read(limiter) if limiter is not None else 0

    def _upstreams_down(self) -> int:
        if self.dns_process is not None:
            return self.dns_process.upstreams_down
        return len(self.dns.forwarder.table.down()) if self.dns is not None else 0

    def _on_health(self, healthy: bool) -> None:
        if self._health_heard:  # subscribe calls this once with the current state, which is not a change
            self.dns_stats.health_changes += 1
        self._health_heard = True
        if self.responder is not None:  # the DNS process hears of it through DnsProcess
            self.responder.capture_enabled = healthy

    def _listen_dns(self) -> None:
        dns = self.dns
        if dns is None:
            def start_child() -> None:
                self.dns_process = start_dns_process(
                    self.reactor, self.config, self.upstreams, self.dns_stats, self.health, self.tls_bypass
                )
                self.ready = self.dns_process.readiness

            def stop_child() -> None:
                if self.dns_process is not None:
                    self.dns_process.stop()

            self._run("dns process", start_child, stop_child)
            return
        self._run("dns forwarder", lambda: None, dns.forwarder.stop)
        # the DNS share of the descriptor budget: the forwarder first, the TCP listeners share the rest
        tcp_caps = dnsserver.tcp_caps(self.budget.dns, len(self.upstreams), len(self.config.dns.listen))
        for index, address in enumerate(self.config.dns.listen):
            ports: list = []

            def bind(address=address, index=index, ports=ports) -> None:
                try:
                    ports.extend(dnsserver.listen(self.reactor, dns, address.host, address.port, tcp_caps))
                except error.CannotListenError as exc:
                    raise ListenError(f"dns.listen[{index}]: cannot listen on {address} (UDP/TCP): "
                                      f"{_reason(exc)}") from exc

            self._run(f"dns listener {index}", bind, _stop_listening(ports))

    def start(self) -> None:
        """Bind every listener and start the health probe; raises :class:`ListenError` or
        :class:`~dnsmirror.ca.CaError` (checked before anything is bound)."""
        # DNS-only mode (https.listen: []) serves no TLS, so it needs no CA
        signing = self._load_ca() if self.config.https.listen else None
        # running first: each child added below starts as it is added, in this order (and stops in reverse)
        service.Service.startService(self)
        try:
            self._listen_dns()
            if signing is not None:
                self._start_https(signing)
            self._start_metrics()
        except ListenError:
            self.stop()
            raise
        self.health.subscribe(self._on_health)
        self._run("health probe", self.probe.start, self.probe.stop)
        log.info("descriptor budget: %s", self.budget.summary(),
                 extra=fields(event="descriptor_budget", **self.budget.describe()))
        if not self.upstreams:
            log.warning("no upstream resolvers: set dns.upstreams; every forwarded query will get SERVFAIL")
        proxy = self.front.upstream.proxy if self.front is not None else None
        log.info(
            "dnsmirror started", extra=fields(
                version=__version__, dns=[str(a) for a in self.config.dns.listen],
                upstreams=[str(u) for u in self.upstreams], mirror=self.config.mirror.address,
                patterns=len(self.config.capture), config=self.config.source,
                **({"egress_proxy": str(proxy)} if proxy else {}),
            ),
        )

    def startService(self) -> None:
        """Twisted's start: :meth:`start` (binds everything or raises)."""
        self.start()

    def stop(self) -> None:
        """Stop every child service at once, in reverse order of start: the probe first, then the
        listeners; captured names fail open as soon as the HTTPS listener stops."""
        if self._closed:
            return
        self._closed = True
        service.MultiService.stopService(self)

    def stopService(self) -> defer.Deferred:
        """Fail open at once, keep serving while captured answers expire (:func:`drain_seconds`), then
        close everything. The Deferred fires when all is closed; cancelling it closes everything now."""
        delay = drain_seconds(self.config)
        log.info("dnsmirror stopping", extra=fields(drain_seconds=delay))
        self.probe.stop()
        self.health.set(False, "shutting down")
        if delay <= 0:
            self.stop()
            return defer.succeed(None)
        drain = task.deferLater(self.reactor, delay, self.stop)

        def cancelled(failure):
            failure.trap(defer.CancelledError)
            self.stop()

        return drain.addErrback(cancelled)


@dataclass(frozen=True)
class Front:
    """The registry front's parts that outlive its construction: read by metrics and the peer listener."""

    store: Store
    upstream: UpstreamClient
    passthrough: PassThrough
    content: ContentChain
    pulls: PullReporter


def start_dns_process(reactor, config: Config, upstreams, stats: DnsStats, health: HealthState,
                      tls_bypass: TlsBypass) -> DnsProcesses:
    """Bind ``dns.listen`` here (errors name the key) and start the DNS processes on those sockets, each
    pinned to a core of its own."""
    sockets: list[socket.socket] = []
    try:
        for index, address in enumerate(config.dns.listen):
            try:
                sockets += dnsserver.bind_sockets(address.host, address.port)
            except OSError as exc:
                raise ListenError(f"dns.listen[{index}]: cannot listen on {address} (UDP/TCP): "
                                  f"{_describe(exc)}") from exc
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
        stale_after=max(
            3 * health_cfg.interval, health_cfg.interval * health_cfg.failures + health_cfg.timeout
        ) + 1,
        cpu_priority=config.dns.cpu_priority,
        realtime=config.dns.realtime,
    )
    cores = priority.answering_cores(os.sched_getaffinity(0), config.dns.processes)
    processes = DnsProcesses([
        DnsProcess(reactor, dataclasses.replace(settings, processes=len(cores), core=core), sockets, stats,
                   health, tls_bypass, health_cfg.interval)
        for core in cores
    ])
    # the DNS processes forget their captured answers for a bypassed registry when told of the bypass
    tls_bypass.on_start = processes.tell
    processes.start()
    return processes


def _reason(exc: error.CannotListenError) -> str:
    return _describe(exc.socketError)


def _describe(reason: BaseException) -> str:
    """Why a bind failed, with the way out when a low port needs privileges."""
    text = getattr(reason, "strerror", None) or str(reason)
    if getattr(reason, "errno", None) == errno.EACCES:
        text += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return text


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    from twisted.internet import reactor

    logs.setup(config.log.format, config.log.level)
    raise_descriptor_limit()
    allocator.keep_freed_memory()
    bulk.install()
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
    # a shell starts a background job with SIGINT ignored, and Twisted leaves it so: it stops us anyway
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reactor.run()
    return 0


def drain_seconds(config: Config) -> float:
    """How long a stopping mirror keeps serving after it stopped capturing: clients may hold a captured
    answer for ``dns.ttl`` seconds, so the listeners stay until those answers expired (at most 30 s)."""
    if not config.https.listen:
        return 0.0
    return min(config.dns.ttl + 1.0, 30.0)


def _stopping(services: Services) -> defer.Deferred:
    """The reactor's shutdown: the services' drain; a second SIGTERM or SIGINT during it stops at once."""
    drain = services.stopService()
    if drain.called:  # nothing to drain (DNS-only mode): closed already
        return drain

    def stop_now(signum, frame) -> None:
        services.reactor.callFromThread(drain.cancel)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_now)
    return drain
