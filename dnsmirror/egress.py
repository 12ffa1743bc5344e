"""Reaching upstream registries through an HTTP egress proxy (``upstream.proxy``) with CONNECT tunnels.

Where nodes have no direct route out, each upstream connection is opened as ``CONNECT host:443``
through the proxy, and TLS then runs end to end inside the tunnel: the proxy sees the host name and
encrypted bytes, and the registry's certificate is verified exactly as without a proxy. The proxy
resolves registry names, so ``upstream.resolvers`` and the internal-address check do not apply to
proxied hosts. ``upstream.no_proxy`` lists hosts reached directly (``example.com`` also covers its
subdomains; ``*`` covers every host).
"""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

# the proxy's answer to CONNECT is a status line and a few headers
_REPLY_LIMIT = 16 * 1024


class TunnelError(Exception):
    """The proxy did not open a tunnel (refused, closed, timed out, or answered something else)."""


@dataclass(frozen=True)
class EgressProxy:
    """An HTTP proxy for CONNECT tunnels, and the hosts that bypass it."""

    host: str
    port: int
    authorization: bytes | None = None  # Proxy-Authorization, from credentials in the URL
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def parse(cls, url: str, no_proxy: tuple[str, ...] = ()) -> EgressProxy:
        """``http://[user:password@]host[:port]``; raises ValueError saying what is wrong."""
        parts = urllib.parse.urlsplit(url)
        shown = _redacted(parts)
        if parts.scheme != "http":
            raise ValueError(
                f"expected http://[user:password@]host:port (TLS to the proxy is not supported), "
                f"got {shown!r}"
            )
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"expected http://[user:password@]host:port, got {shown!r}")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ValueError(f"bad port in {shown!r}") from exc
        authorization = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            authorization = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
        entries = tuple(entry.strip().lower().lstrip(".").rstrip(".") for entry in no_proxy if entry.strip())
        return cls(parts.hostname, port, authorization, entries)

    def applies_to(self, host: str) -> bool:
        """Whether connections to ``host`` go through the proxy (not listed in ``no_proxy``)."""
        host = host.lower().rstrip(".")
        return not any(entry == "*" or host == entry or host.endswith("." + entry) for entry in self.no_proxy)

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}"  # never the credentials


def _redacted(parts: urllib.parse.SplitResult) -> str:
    """The URL with its password hidden (config errors are printed and logged)."""
    if parts.password is None:
        return parts.geturl()
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


def redacted_url(url: str) -> str:
    """``url`` with its password, if any, shown as ``***``."""
    return _redacted(urllib.parse.urlsplit(url))


class _TunnelProtocol(Protocol):
    """Asks the proxy for a tunnel; once it is open, hands the connection to the real protocol."""

    transport: ITCPTransport  # a TCP connection to the proxy, from makeConnection on

    def __init__(self, proxy: EgressProxy, target: str, inner_factory, opened: defer.Deferred, clock,
                 timeout: float) -> None:
        self.proxy = proxy
        self.target = target
        self.inner_factory = inner_factory
        self.opened = opened
        self.clock = clock
        self.timeout = timeout
        self.inner: Protocol | None = None
        self._reply = b""
        self._timer = None

    def connectionMade(self) -> None:
        lines = [f"CONNECT {self.target} HTTP/1.1", f"Host: {self.target}"]
        request = "\r\n".join(lines).encode("ascii") + b"\r\n"
        if self.proxy.authorization:
            request += b"Proxy-Authorization: " + self.proxy.authorization + b"\r\n"
        self.transport.write(request + b"\r\n")
        self._timer = self.clock.callLater(self.timeout, self._give_up,
                                           f"no answer to CONNECT {self.target} within {self.timeout:g}s")

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self._reply += data
        end = self._reply.find(b"\r\n\r\n")
        if end < 0:
            if len(self._reply) > _REPLY_LIMIT:
                self._give_up("its answer to CONNECT is too long")
            return
        status_line = self._reply.split(b"\r\n", 1)[0]
        rest = self._reply[end + 4:]
        fields = status_line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].startswith(b"2") \
                or len(fields[1]) != 3:
            self._give_up(f"refused CONNECT {self.target}: {status_line.decode('latin-1')[:200]!r}")
            return
        self._cancel_timer()
        self._reply = b""
        if self.opened.called:  # the caller gave up (cancelled) while the proxy was answering
            self.transport.abortConnection()
            return
        self.inner = self.inner_factory.buildProtocol(self.transport.getPeer())
        self.inner.makeConnection(self.transport)
        self.opened.callback(self.inner)
        if rest:
            self.inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.opened.called:
            self.opened.errback(
                TunnelError(
                    f"proxy {self.proxy} closed the connection before opening a tunnel to {self.target}"
                )
            )

    def _give_up(self, why: str) -> None:
        self._cancel_timer()
        if not self.opened.called:
            self.opened.errback(TunnelError(f"proxy {self.proxy}: {why}"))
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connections to ``host:port`` through a CONNECT tunnel of ``proxy`` (plain TCP inside: wrap it in
    TLS)."""

    def __init__(self, reactor, proxy: EgressProxy, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.timeout = timeout

    def connect(self, protocolFactory) -> defer.Deferred:
        tunnels: list[_TunnelProtocol] = []

        def cancel(_opened: defer.Deferred) -> None:
            connecting.cancel()  # no-op once connected
            for tunnel in tunnels:
                if tunnel.inner is None and tunnel.transport is not None:
                    tunnel.transport.abortConnection()

        opened: defer.Deferred = defer.Deferred(cancel)

        def build() -> _TunnelProtocol:
            tunnel = _TunnelProtocol(
                self.proxy, self.target, protocolFactory, opened, self.reactor, self.timeout
            )
            tunnels.append(tunnel)
            return tunnel

        to_proxy = HostnameEndpoint(self.reactor, self.proxy.host, self.proxy.port, timeout=self.timeout)
        connecting = to_proxy.connect(Factory.forProtocol(build))

        def not_connected(failure: Failure) -> None:
            if not opened.called:
                opened.errback(
                    TunnelError(f"cannot connect to proxy {self.proxy}: {failure.getErrorMessage()}")
                )

        connecting.addErrback(not_connected)
        return opened


@implementer(IAgentEndpointFactory)
class TunnelEndpointFactory:
    """Endpoints for ``twisted.web.client.Agent``: TLS to the URL's host inside a tunnel of ``proxy``."""

    def __init__(self, reactor, proxy: EgressProxy, tls_policy, timeout: float) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.tls_policy = tls_policy
        self.timeout = timeout

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        tunnel = TunnelEndpoint(self.reactor, self.proxy, host, uri.port, self.timeout)
        return wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), tunnel)
