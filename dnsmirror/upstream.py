"""HTTP client to the real upstream registries: own resolver, verified TLS, pooled, streamed.

:class:`UpstreamClient` is a thin layer over :class:`twisted.web.client.Agent`:

- names are resolved by :class:`~dnsmirror.resolver.UpstreamResolver` (the configured upstream
  resolvers, never the node's), swapped in through :class:`ResolvingReactor`;
- TLS is verified against the platform trust store plus ``upstream.ca_bundle``
  (:class:`UpstreamTLSPolicy`), with host name verification;
- connections are kept alive in one :class:`HTTPConnectionPool`;
- connect, first-byte and idle (read) timeouts end a stuck exchange with :class:`UpstreamTimeout`;
- the caller's headers go upstream as given (repeated headers stay separate lines) minus hop-by-hop
  headers; the response body is never buffered: :meth:`UpstreamResponse.deliver_body` and
  :meth:`UpstreamResponse.stream_to` pass bytes on as they arrive and pause the upstream socket
  while the consumer is slow;
- with ``follow_redirects=True`` (blob GETs), redirects to object storage or a CDN are followed
  server-side: https only, at most ``max_redirects``, Authorization and Cookie dropped once the
  origin changes.

Pure helpers (:func:`end_to_end_headers`, :func:`redirect_target`, :func:`origin`) carry the
decisions and are tested without a reactor.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet._sslverify import ClientTLSOptions, IOpenSSLTrustRoot
from twisted.internet.interfaces import (
    IConsumer,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IPushProducer,
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from dnsmirror import failures
from dnsmirror.config import Config, ConfigError, HostPort
from dnsmirror.egress import EgressProxy, TunnelEndpointFactory, TunnelError
from dnsmirror.logs import fields
from dnsmirror.resolver import AddressPolicy, ResolutionError, UpstreamResolver

log = logging.getLogger("dnsmirror.upstream")

# RFC 9110 7.6.1 (plus the legacy Keep-Alive/Proxy-Connection and the proxy credentials of RFC 9110 11.7)
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Agent writes these itself, from the URL and the body producer; a second copy would corrupt the request
AGENT_MANAGED = frozenset({b"host", b"content-length"})
# credentials that must not follow a redirect to another origin (RFC 9110 15.4)
CROSS_ORIGIN_SENSITIVE = frozenset({b"authorization", b"cookie", b"proxy-authorization"})
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
REDIRECT_BODY_LIMIT = 64 * 1024
_CREATOR_CACHE_SIZE = 256


class UpstreamError(Exception):
    """An exchange with an upstream registry failed; the message says where and why."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, or the connection broke."""


class UpstreamTLSError(UpstreamError):
    """The upstream's certificate was not trusted or not valid for its name, or the handshake failed.

    ``untrusted`` is True when the certificate itself was refused (not a handshake cut short)."""

    def __init__(self, message: str, untrusted: bool = False) -> None:
        super().__init__(message)
        self.untrusted = untrusted


class UpstreamTimeout(UpstreamError):
    """Connect, first-byte or idle (read) timeout."""


class RedirectRefused(UpstreamError):
    """A redirect pointed somewhere dnsmirror will not go (not https, unparsable)."""


class TooManyRedirects(UpstreamError):
    """More than ``max_redirects`` redirects in a row."""


class BodyTooLarge(UpstreamError):
    """A body read with a size limit exceeded it."""


# Everything an upstream exchange may fail with for reasons outside dnsmirror: trap these to fall back.
UPSTREAM_FAILURES = (UpstreamError, ResolutionError)


# --- pure helpers ----------------------------------------------------------------------------------

HeaderInput = Headers | Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def header_pairs(headers: HeaderInput) -> list[tuple[bytes, bytes]]:
    """``(lower-case name, value)`` pairs in order, one per header line, from any header form.

    Accepts :class:`Headers`, a mapping of name to a value or a list of values, or pairs.
    """
    if headers is None:
        return []
    pairs: list[tuple[bytes, bytes]] = []
    if isinstance(headers, Headers):
        for name, values in headers.getAllRawHeaders():
            pairs.extend((_bytes(name).lower(), _bytes(v)) for v in values)
        return pairs
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        values = value if isinstance(value, list | tuple) else [value]
        pairs.extend((_bytes(name).lower(), _bytes(v)) for v in values)
    return pairs


def connection_tokens(pairs: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection`` headers (they are hop-by-hop too, RFC 9110 7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in pairs:
        if name == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return tokens


def end_to_end_headers(headers: HeaderInput, drop: Iterable[bytes] = ()) -> Headers:
    """A copy of ``headers`` without hop-by-hop headers (and without names in ``drop``).

    Repeated headers stay separate values, so they are written as separate lines.
    """
    pairs = header_pairs(headers)
    removed = HOP_BY_HOP | connection_tokens(pairs) | {name.lower() for name in drop}
    result = Headers()
    for name, value in pairs:
        if name not in removed:
            result.addRawHeader(name, value)
    return result


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an absolute URL, default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower().rstrip("."), port


def redirect_target(status: int, headers: HeaderInput, request_url: str) -> str | None:
    """The absolute URL a response redirects to, or ``None`` if it is not a redirect to follow.

    301/302/303/307/308 with a ``Location``; a relative Location is resolved against ``request_url``.
    """
    if status not in REDIRECT_CODES:
        return None
    locations = [value for name, value in header_pairs(headers) if name == b"location"]
    if len(locations) != 1 or not locations[0].strip():
        return None
    target = urljoin(request_url, locations[0].strip().decode("latin-1"))
    return target.split("#", 1)[0]


def loggable_url(url: str) -> str:
    """``url`` without its query and fragment: pre-signed object-storage URLs carry signatures there."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + ("?..." if parts.query else "")


def check_redirect(target: str) -> None:
    """Raise :class:`RedirectRefused` unless ``target`` is an https URL with a host."""
    scheme, host, _port = origin(target)
    if scheme != "https":
        raise RedirectRefused(
            f"refusing redirect to {scheme or 'a relative'} URL {loggable_url(target)}: https only"
        )
    if not host:
        raise RedirectRefused(f"refusing redirect without a host: {loggable_url(target)}")


# --- TLS -----------------------------------------------------------------------------------------------


def load_pem_certificates(path: str | Path) -> list[crypto.X509]:
    """The certificates of a PEM bundle file; :class:`ConfigError` (``upstream.ca_bundle``) if unusable."""
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("upstream.ca_bundle", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError("upstream.ca_bundle", f"{path} holds no valid PEM certificate: {exc}") from exc
    return [crypto.X509.from_cryptography(certificate) for certificate in certificates]


@implementer(IOpenSSLTrustRoot)
class CombinedTrustRoot:
    """Trust the platform's store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured) plus extra roots."""

    def __init__(self, extra: Iterable[crypto.X509] = (), include_platform: bool = True) -> None:
        self.extra = tuple(extra)
        self.include_platform = include_platform

    def _addCACertsToContext(self, context) -> None:
        # IOpenSSLTrustRoot's (private) hook, called once per context: at creator creation, per host name
        if self.include_platform:
            context.set_default_verify_paths()
        store = context.get_cert_store()
        for certificate in self.extra:
            store.add_cert(certificate)


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """Verifying TLS connection creators, one per host name, built once and kept (bounded LRU).

    Every host shares one OpenSSL context, built here: the trust store is read once at start-up, not
    on the reactor at each new registry's first connection. Each connection still verifies the
    chain and its own host name (``ClientTLSOptions`` sets a per-connection verify callback).
    """

    def __init__(self, trust: IOpenSSLTrustRoot, cache_size: int = _CREATOR_CACHE_SIZE) -> None:
        self.trust = trust
        self.cache_size = cache_size
        self._creators: OrderedDict[str, IOpenSSLClientConnectionCreator] = OrderedDict()
        self._options = CertificateOptions(trustRoot=trust)
        self._options.getContext()

    @classmethod
    def from_bundle(cls, ca_bundle: str | Path | None, include_platform: bool = True) -> UpstreamTLSPolicy:
        """Platform trust plus the PEM file ``ca_bundle`` (read now: call at start-up, not on the reactor)."""
        extra = load_pem_certificates(ca_bundle) if ca_bundle else []
        return cls(CombinedTrustRoot(extra, include_platform=include_platform))

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """:class:`IPolicyForHTTPS`: verify the certificate chain and that it names ``hostname``."""
        name = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        creator = self._creators.get(name)
        if creator is None:
            creator = ClientTLSOptions(self._options._makeTLSConnection, name)
            self._creators[name] = creator
            while len(self._creators) > self.cache_size:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end(name)
        return creator


# --- reactor and pool plumbing -------------------------------------------------------------------------


@implementer(IReactorCore, IReactorTime, IReactorTCP, IReactorPluggableNameResolver)
class ResolvingReactor:
    """The real reactor with only its name resolver replaced (Synapse's BlocklistingReactorWrapper idea).

    ``HostnameEndpoint`` asks ``reactor.nameResolver``; here that is the upstream resolver, so no
    connection made through this reactor ever looks a name up through the node's DNS.
    """

    def __init__(self, reactor, resolver: UpstreamResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver):
        raise RuntimeError("the upstream name resolver is fixed")

    def resolve(self, name: str, timeout=None) -> defer.Deferred:
        """Legacy single-address lookup, through the upstream resolver too."""
        return self.nameResolver.resolve(name).addCallback(lambda addresses: addresses[0])

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)


class _Exchange:
    """Timers and state of one request/response exchange (one hop)."""

    def __init__(self, clock, first_byte_timeout: float, description: str) -> None:
        self.clock = clock
        self.first_byte_timeout = first_byte_timeout
        self.description = description
        self.request_deferred: defer.Deferred | None = None
        self.timer = None
        self.timed_out = False
        self.finished = False

    def connected(self, connection):
        self._start_first_byte_timer()
        return connection

    def body_started(self) -> None:
        # the body's pace is the caller's: no first-byte deadline while it is being sent
        self._stop_timer()

    def body_sent(self, result):
        self._start_first_byte_timer()
        return result

    def response_received(self, result):
        self.finished = True
        self._stop_timer()
        return result

    def _start_first_byte_timer(self) -> None:
        self._stop_timer()
        if not self.finished:
            self.timer = self.clock.callLater(self.first_byte_timeout, self._expire)

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _expire(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.request_deferred is not None:
            self.request_deferred.cancel()


class _NotifyingPool:
    """Per-request view of the shared pool that tells the exchange when its connection is ready."""

    def __init__(self, pool: HTTPConnectionPool, exchange: _Exchange) -> None:
        self._pool = pool
        self._exchange = exchange

    def getConnection(self, key, endpoint) -> defer.Deferred:
        return self._pool.getConnection(key, endpoint).addCallback(self._exchange.connected)

    def __getattr__(self, name: str):
        return getattr(self._pool, name)


@implementer(IBodyProducer)
class _ObservedBodyProducer:
    """Wraps the caller's body producer to suspend the first-byte deadline while the body is sent."""

    def __init__(self, inner: IBodyProducer, exchange: _Exchange) -> None:
        self._inner = inner
        self._exchange = exchange
        self.length = inner.length

    def startProducing(self, consumer) -> defer.Deferred:
        self._exchange.body_started()
        return self._inner.startProducing(consumer).addCallback(self._exchange.body_sent)

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


# --- response bodies -------------------------------------------------------------------------------------


@implementer(IPushProducer)
class _WatchedTransport:
    """The body transport handed to the caller's protocol: pausing it also suspends the idle timer."""

    def __init__(self, transport, watch: _IdleWatch) -> None:
        self._transport = transport
        self._watch = watch
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self._watch.suspend()
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._watch.resume()
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._watch.suspend()
        if not self._watch._timed_out:
            self._watch.stopped_here = True  # our reader stopped the body: not upstream's failure
        self._transport.stopProducing()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


@implementer(IProtocol)
class _IdleWatch(Protocol):
    """Passes a response body to ``inner``; ends it with :class:`UpstreamTimeout` after ``timeout``
    seconds without bytes while the reader is not paused."""

    # a response body's transport: an ITransport that is also an IPushProducer
    transport: Any

    def __init__(self, inner: IProtocol, clock, timeout: float, description: str, url: str = "",
                 expected: int | None = None) -> None:
        self.inner = inner
        self.url = url
        self.expected = expected
        self.received = 0  # for the failure log: how far a cut body got
        self.clock = clock
        self.timeout = timeout
        self.description = description
        self.watched: _WatchedTransport | None = None
        self._timer = None
        self._last = 0.0
        self._timed_out = False
        self._done = False
        self.stopped_here = False

    def makeConnection(self, transport) -> None:
        self.watched = _WatchedTransport(transport, self)
        self.transport = self.watched
        self.resume()
        self.inner.makeConnection(self.watched)  # type: ignore[arg-type]  # it stands in for the transport

    def dataReceived(self, data: bytes) -> None:
        # a timestamp per chunk; the timer is rescheduled only when it fires (cheap on hot paths)
        self._last = self.clock.seconds()
        self.received += len(data)
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._done = True
        self.suspend()
        if self._timed_out:
            reason = Failure(UpstreamTimeout(f"{self.description}: no body bytes for {self.timeout:g}s"))
        if not self.stopped_here and not reason.check(ResponseDone, PotentialDataLoss):
            # not ResponseDone: a Failure
            cut = cast(Failure, _body_outcome(reason, self.description, self.received, self.expected))
            _report(failures.upstream_kind(cut.value), str(cut.value), self.url)
        self.inner.connectionLost(reason)

    def suspend(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def resume(self) -> None:
        if self._done:
            return
        self.suspend()
        self._last = self.clock.seconds()
        self._timer = self.clock.callLater(self.timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        remaining = self._last + self.timeout - self.clock.seconds()
        if remaining > 0:
            self._timer = self.clock.callLater(remaining, self._check)
            return
        self._timed_out = True
        log.warning("upstream body stalled", extra=fields(exchange=self.description, timeout=self.timeout))
        cast(_WatchedTransport, self.watched).stopProducing()


def _body_outcome(reason: Failure, description: str, received: int, expected: int | None) -> Failure | None:
    """``None`` if ``reason`` means the body ended completely, else the failure to report."""
    if reason.check(ResponseDone):
        return None
    if reason.check(PotentialDataLoss) and expected is None:
        return None  # a body delimited by connection close ends this way
    if reason.check(UpstreamError):
        return reason
    total = f" of {expected}" if expected is not None else ""
    return Failure(
        UpstreamUnavailable(f"{description}: body cut after {received}{total} bytes: {_describe(reason)}")
    )


@implementer(IPushProducer)
class _ConsumerStream(Protocol):
    """Writes a response body into an :class:`IConsumer`, registered as its streaming producer."""

    # a response body's transport: an ITransport that is also an IPushProducer
    transport: Any

    def __init__(
        self, consumer: IConsumer, done: defer.Deferred, description: str, expected: int | None
    ) -> None:
        self.consumer = consumer
        self.done = done
        self.description = description
        self.expected = expected
        self.received = 0

    def connectionMade(self) -> None:
        self.consumer.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.consumer.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.consumer.unregisterProducer()
        failure = _body_outcome(reason, self.description, self.received, self.expected)
        if failure is None:
            self.done.callback(self.received)
        else:
            self.done.errback(failure)

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # our consumer went away (the client disconnected): stop reading upstream
        self.transport.stopProducing()


class _Collector(Protocol):
    """Collects a body up to ``limit`` bytes; beyond that, stops reading and fails (or just drops)."""

    # a response body's transport: an ITransport that is also an IPushProducer
    transport: Any

    def __init__(
        self, done: defer.Deferred, limit: int, description: str, expected: int | None, keep: bool
    ) -> None:
        self.done = done
        self.limit = limit
        self.description = description
        self.expected = expected
        self.keep = keep
        self.chunks: list[bytes] = []
        self.received = 0
        self.too_large = False

    def dataReceived(self, data: bytes) -> None:
        if self.too_large:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.too_large = True
            self.chunks = []
            self.transport.stopProducing()
            return
        if self.keep:
            self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.too_large:
            self.done.errback(BodyTooLarge(f"{self.description}: body larger than {self.limit} bytes"))
            return
        failure = _body_outcome(reason, self.description, self.received, self.expected)
        if failure is None:
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(failure)


class UpstreamResponse:
    """Status, end-to-end headers and a streamed body of an upstream response.

    ``url`` is the URL that produced this response (after redirects); ``redirects`` the URLs followed.
    ``length`` is the body length, or ``None`` when upstream did not say. The body can be consumed
    once, with one of :meth:`deliver_body`, :meth:`stream_to`, :meth:`read_body` or :meth:`discard`.
    """

    def __init__(
        self, response, url: str, method: str, redirects: tuple[str, ...], clock, read_timeout: float
    ) -> None:
        self._response = response
        self.url = url
        self.method = method
        self.redirects = redirects
        self.code: int = response.code
        self.phrase: bytes = response.phrase
        self.length: int | None = None if response.length is UNKNOWN_LENGTH else response.length
        self.headers = end_to_end_headers(response.headers)
        if self.length is not None and not self.headers.hasHeader(b"content-length") and method != "HEAD" \
                and self.code not in (204, 304):
            # Agent keeps Content-Length out of the headers; the client we relay to needs it
            self.headers.setRawHeaders(b"content-length", [str(self.length).encode()])
        self._clock = clock
        self._read_timeout = read_timeout
        self._consumed = False
        self.watch: _IdleWatch | None = None

    @property
    def description(self) -> str:
        return f"{self.method} {loggable_url(self.url)}"

    def deliver_body(self, protocol: IProtocol) -> None:
        """Deliver the body to ``protocol`` as it arrives (``makeConnection``, ``dataReceived``,
        ``connectionLost`` with ResponseDone on success).

        Pausing the transport ``protocol`` receives pauses the upstream socket (back-pressure) and the
        idle timeout; a stall of ``read_timeout`` while not paused ends it with :class:`UpstreamTimeout`.
        """
        if self._consumed:
            raise RuntimeError(f"{self.description}: body already consumed")
        self._consumed = True
        self.watch = _IdleWatch(protocol, self._clock, self._read_timeout, self.description, self.url,
                                self.length)
        self._response.deliverBody(self.watch)

    def stream_to(self, consumer: IConsumer) -> defer.Deferred:
        """Write the body into ``consumer`` (e.g. a ``twisted.web`` request), registered as a streaming
        producer so the consumer's pauses reach upstream. Fires with the byte count, or fails."""
        done: defer.Deferred = defer.Deferred()
        self.deliver_body(_ConsumerStream(consumer, done, self.description, self.length))
        return done

    def read_body(self, limit: int) -> defer.Deferred:
        """The whole body as bytes, for small documents (manifests, error bodies); :class:`BodyTooLarge`
        beyond ``limit`` bytes."""
        if self.length is not None and self.length > limit:
            # announced too large: do not read it at all (the connection closes)
            self.discard(limit=0)
            return defer.fail(
                BodyTooLarge(f"{self.description}: body of {self.length} bytes exceeds {limit}")
            )
        done: defer.Deferred = defer.Deferred()
        self.deliver_body(_Collector(done, limit, self.description, self.length, keep=True))
        return done

    def discard(self, limit: int = REDIRECT_BODY_LIMIT) -> defer.Deferred:
        """Read and drop the body so the connection can go back to the pool; a body over ``limit``
        closes the connection instead. Never fails."""
        done: defer.Deferred = defer.Deferred()
        self.deliver_body(_Collector(done, limit, self.description, self.length, keep=False))
        return done.addErrback(lambda _: None)


# --- the client ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamSettings:
    """Timeouts and limits of :class:`UpstreamClient` (seconds, counts)."""

    connect_timeout: float = 10.0
    first_byte_timeout: float = 30.0
    read_timeout: float = 60.0
    pool_per_host: int = 16
    pool_idle_timeout: float = 50.0
    max_redirects: int = 5

    @classmethod
    def from_config(cls, config: Config) -> UpstreamSettings:
        upstream = config.upstream
        return cls(
            connect_timeout=upstream.connect_timeout,
            first_byte_timeout=upstream.first_byte_timeout,
            read_timeout=upstream.read_timeout,
            pool_per_host=upstream.pool_per_host,
            pool_idle_timeout=upstream.pool_idle_timeout,
        )


class UpstreamClient:
    """Requests to upstream registries over verified, pooled HTTPS, resolved by ``resolver``."""

    def __init__(self, resolver: UpstreamResolver, *, reactor, tls_policy: IPolicyForHTTPS,
                 settings: UpstreamSettings | None = None, proxy: EgressProxy | None = None) -> None:
        self.resolver = resolver
        self.settings = settings or UpstreamSettings()
        self.tls_policy = tls_policy
        self.proxy = proxy
        self._clock = reactor
        self._reactor = ResolvingReactor(reactor, resolver)
        if proxy is not None:
            # the proxy is the operator's own choice: its address is not held to the internal-address rule
            proxy_resolver = UpstreamResolver(resolver.servers, reactor=reactor, timeout=resolver.timeout,
                                              policy=AddressPolicy(allow_internal=True))
            self._tunnels = TunnelEndpointFactory(
                ResolvingReactor(reactor, proxy_resolver), proxy, tls_policy, self.settings.connect_timeout
            )
        self.pool = HTTPConnectionPool(self._reactor, persistent=True)
        self.pool.maxPersistentPerHost = self.settings.pool_per_host
        # Twisted declares an int; any number of seconds works
        self.pool.cachedConnectionTimeout = self.settings.pool_idle_timeout  # type: ignore[assignment]
        self.pool.retryAutomatically = True
        # told (host, reason) when the certificate of the host a request named (or of a redirect's hop)
        # is refused; a handshake merely cut short is not reported
        self.on_tls_failure: Callable[[str, str], None] | None = None

    @classmethod
    def from_config(
        cls, config: Config, reactor, fallback_resolvers: Iterable[HostPort] = ()
    ) -> UpstreamClient:
        """Client as configured: ``upstream.resolvers``, else ``dns.upstreams``, else ``fallback_resolvers``
        (the app's resolv.conf-derived list). Refuses dnsmirror's own HTTPS listeners as upstreams.
        Reads ``upstream.ca_bundle`` now (start-up, off the serving path)."""
        servers = config.upstream.resolvers or config.dns.upstreams or tuple(fallback_resolvers)
        policy = AddressPolicy.guarding(
            config.upstream.allow_internal,
            config.https.listen,
            (config.mirror.address, config.mirror.address6),
        )
        resolver = UpstreamResolver(servers, reactor=reactor, timeout=config.dns.timeout, policy=policy)
        tls_policy = UpstreamTLSPolicy.from_bundle(config.upstream.ca_bundle)
        proxy = (
            EgressProxy.parse(config.upstream.proxy, config.upstream.no_proxy)
            if config.upstream.proxy
            else None
        )
        return cls(
            resolver,
            reactor=reactor,
            tls_policy=tls_policy,
            settings=UpstreamSettings.from_config(config),
            proxy=proxy,
        )

    def request(
        self,
        method: str | bytes,
        url: str | bytes,
        headers: HeaderInput = None,
        body_producer: IBodyProducer | None = None,
        *,
        follow_redirects: bool = False,
    ) -> defer.Deferred:
        """Send one request upstream; fires with an :class:`UpstreamResponse` once its headers arrived.

        ``headers`` go upstream as given (repeated headers as separate lines) minus hop-by-hop headers,
        ``Host`` and ``Content-Length`` (Agent derives those from ``url`` and ``body_producer.length``;
        ``UNKNOWN_LENGTH`` sends the body chunked). With ``follow_redirects`` (GET/HEAD without a body)
        redirects are followed as described in the module docstring. Fails with one of
        :data:`UPSTREAM_FAILURES`.
        """
        method_text = method.decode("ascii") if isinstance(method, bytes) else method
        url_text = url.decode("ascii") if isinstance(url, bytes) else url
        if origin(url_text)[0] != "https":
            return defer.fail(ValueError(f"upstream URLs must be https: {url_text!r}"))
        outgoing = end_to_end_headers(headers, drop=AGENT_MANAGED)
        follow = follow_redirects and body_producer is None and method_text.upper() in ("GET", "HEAD")
        d = defer.ensureDeferred(
            self._request(method_text.upper(), url_text, outgoing, body_producer, follow)
        )
        return d.addCallbacks(_report_status, _report_failure, errbackArgs=(url_text,))

    def close(self) -> defer.Deferred:
        """Close the pooled idle connections (at shutdown)."""
        return self.pool.closeCachedConnections()

    async def _request(self, method: str, url: str, headers: Headers, body: IBodyProducer | None,
                       follow: bool) -> UpstreamResponse:
        first_origin = origin(url)
        followed: list[str] = []
        for _hop in range(self.settings.max_redirects + 1):
            try:
                response = await self._exchange(method, url, headers, body, tuple(followed))
            except UpstreamTLSError as exc:
                if exc.untrusted and self.on_tls_failure is not None:
                    self.on_tls_failure(first_origin[1], str(exc))
                raise
            target = redirect_target(response.code, response.headers, url) if follow else None
            if target is None:
                return response
            await response.discard()
            if len(followed) >= self.settings.max_redirects:
                break
            check_redirect(target)
            if origin(target) != first_origin:
                headers = end_to_end_headers(headers, drop=CROSS_ORIGIN_SENSITIVE)
            if response.code == 303 and method != "HEAD":
                method = "GET"
            log.debug(
                "following upstream redirect",
                extra=fields(code=response.code, source=url, target=origin(target)[1]),
            )
            followed.append(url)
            url = target
        raise TooManyRedirects(
            f"{method} {loggable_url(followed[0] if followed else url)}: more than "
            f"{self.settings.max_redirects} redirects"
        )

    async def _exchange(self, method: str, url: str, headers: Headers, body: IBodyProducer | None,
                        redirects: tuple[str, ...]) -> UpstreamResponse:
        description = f"{method} {loggable_url(url)}"
        _scheme, host, port = origin(url)
        exchange = _Exchange(self._clock, self.settings.first_byte_timeout, description)
        pool = _NotifyingPool(self.pool, exchange)
        if self.proxy is not None and self.proxy.applies_to(host):
            # the proxy resolves the name; TLS to the registry runs inside its tunnel
            agent = Agent.usingEndpointFactory(self._reactor, self._tunnels, pool=pool)
        else:
            # resolve first: clear errors (NXDOMAIN, timeout, refused address), and HostnameEndpoint hits the
            # cache
            await self.resolver.resolve(host, port)
            agent = Agent(
                self._reactor,
                contextFactory=self.tls_policy,
                connectTimeout=self.settings.connect_timeout,
                pool=pool,
            )
        producer = _ObservedBodyProducer(body, exchange) if body is not None else None
        d = agent.request(method.encode("ascii"), url.encode("ascii"), headers.copy(), producer)
        exchange.request_deferred = d
        d.addBoth(exchange.response_received)
        try:
            raw = await d
        except Exception as exc:
            raise self._explain(exc, exchange, description) from exc
        return UpstreamResponse(raw, url, method, redirects, self._clock, self.settings.read_timeout)

    def _explain(self, exc: Exception, exchange: _Exchange, description: str) -> Exception:
        if isinstance(exc, UPSTREAM_FAILURES):
            return exc
        if exchange.timed_out:
            return UpstreamTimeout(
                f"{description}: no response headers within {self.settings.first_byte_timeout:g}s"
            )
        reasons = _reasons(exc)
        tunnel = next((r for r in reasons if isinstance(r, TunnelError)), None)
        if tunnel is not None:
            return UpstreamUnavailable(f"{description}: {tunnel}")
        if any(isinstance(r, internet_error.TimeoutError) for r in reasons):
            return UpstreamTimeout(
                f"{description}: connect timed out after {self.settings.connect_timeout:g}s"
            )
        if any(_is_tls_error(r) for r in reasons):
            return UpstreamTLSError(f"{description}: TLS failed: {_describe_exception(exc)}",
                                    untrusted=any(_is_refused_certificate(r) for r in reasons))
        return UpstreamUnavailable(f"{description}: {_describe_exception(exc)}")


def _report(kind: str, reason: str, url: str) -> None:
    """Report a failure of the upstream exchange with ``url`` (:mod:`dnsmirror.failures`)."""
    failures.report("upstream", kind, reason, host=origin(url)[1], repository=failures.repository_of(url))


def _report_status(response: UpstreamResponse) -> UpstreamResponse:
    if response.code >= 500 or response.code == 429:
        _report("status_429" if response.code == 429 else "status_5xx",
                f"{response.description}: upstream answered {response.code}", response.url)
    return response


def _report_failure(failure: Failure, url: str) -> Failure:
    if failure.check(*UPSTREAM_FAILURES):
        _report(failures.upstream_kind(failure.value), str(failure.value), url)
    return failure


def _reasons(exc: BaseException) -> list[BaseException]:
    """The exception and the ones Twisted wraps inside it (ResponseNeverReceived, ResponseFailed...)."""
    found = [exc]
    for failure in getattr(exc, "reasons", None) or []:
        if isinstance(failure, Failure):
            found.extend(_reasons(failure.value))
    return found


def _is_tls_error(exc: BaseException) -> bool:
    return isinstance(exc, SSL.Error | VerificationError)


def _is_refused_certificate(exc: BaseException) -> bool:
    # a name mismatch (service_identity), or OpenSSL's chain verification saying no
    return isinstance(exc, VerificationError) or (
        isinstance(exc, SSL.Error) and "certificate verify failed" in str(exc)
    )


def _describe_exception(exc: BaseException) -> str:
    inner = [r for r in _reasons(exc) if r is not exc]
    parts = inner or [exc]
    return "; ".join(f"{type(r).__name__}: {r}" for r in parts)


def _describe(reason: Failure) -> str:
    return _describe_exception(reason.value)
