"""Upstream through an HTTP egress proxy: CONNECT tunnels, TLS verified end to end, no_proxy, errors."""

from __future__ import annotations

import pytest
from fakes import task_until
from test_upstream import LocalServers
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from upstream_support import pki, start_dns

from dnsmirror.egress import EgressProxy, TunnelEndpoint
from dnsmirror.resolver import AddressPolicy, UpstreamResolver
from dnsmirror.upstream import (
    UpstreamClient,
    UpstreamSettings,
    UpstreamTLSError,
    UpstreamTLSPolicy,
    UpstreamUnavailable,
)

# --- the proxy URL and no_proxy --------------------------------------------------------------------------


def test_a_proxy_url_with_credentials_gives_a_basic_proxy_authorization():
    proxy = EgressProxy.parse("http://ci%40corp:s3cr%3At@proxy.corp.example:3128")
    assert (proxy.host, proxy.port) == ("proxy.corp.example", 3128)
    assert proxy.authorization == b"Basic Y2lAY29ycDpzM2NyOnQ="  # ci@corp:s3cr:t
    assert str(proxy) == "http://proxy.corp.example:3128"  # never the credentials


@pytest.mark.parametrize("url", ["https://proxy:3128", "socks5://proxy:1080", "http://:3128", "http://proxy:3128/x",
                                 "http://proxy:99999", "proxy:3128"])
def test_bad_proxy_urls_are_refused_without_showing_a_password(url):
    with pytest.raises(ValueError) as error:
        EgressProxy.parse(url.replace("//", "//user:hunter2@", 1) if "//" in url else url)
    assert "hunter2" not in str(error.value)


def test_no_proxy_covers_a_domain_and_its_subdomains_or_everything():
    proxy = EgressProxy.parse("http://10.0.0.1:3128", ("corp.example", ".internal.example"))
    assert proxy.port == 3128
    assert not proxy.applies_to("corp.example") and not proxy.applies_to("registry.corp.example.")
    assert not proxy.applies_to("harbor.internal.example")
    assert proxy.applies_to("123456789012.dkr.ecr.us-east-1.amazonaws.com")
    assert proxy.applies_to("notcorp.example")
    assert not EgressProxy.parse("http://p", ("*",)).applies_to("anything.example")
    assert EgressProxy.parse("http://p").port == 80


# --- through a local CONNECT proxy -------------------------------------------------------------------------


class _Splice(Protocol):
    def __init__(self, other: Protocol) -> None:
        self.other = other

    def dataReceived(self, data):
        self.other.transport.write(data)

    def connectionLost(self, reason):
        self.other.transport.loseConnection()


class _ConnectProxy(Protocol):
    """A minimal CONNECT proxy: every name is 127.0.0.1; records what it was asked; may refuse."""

    def __init__(self, proxy: LocalProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.upstream: Protocol | None = None

    def dataReceived(self, data):
        if self.upstream is not None:
            self.upstream.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        method, target, _version = lines[0].split()
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        self.proxy.requests.append((method, target.decode(), headers.get(b"Proxy-Authorization")))
        if self.proxy.refuse:
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            self.transport.loseConnection()
            return
        port = int(target.rsplit(b":", 1)[1])
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)

        def connected(upstream):
            self.upstream = upstream
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.transport.write(rest)
            self.transport.resumeProducing()

        endpoint.connect(Factory.forProtocol(lambda: _Splice(self))).addCallbacks(
            connected, lambda _: self.transport.loseConnection())

    def connectionLost(self, reason):
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


PROXY_PASSWORD = "pr0xy-secret"  # user:pr0xy-secret is Basic dXNlcjpwcjB4eS1zZWNyZXQ=


class LocalProxy:
    def __init__(self, test: TestCase, refuse: bool = False) -> None:
        self.requests: list[tuple[bytes, str, bytes | None]] = []
        self.refuse = refuse
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _ConnectProxy(self)), interface="127.0.0.1"
        )
        test.addCleanup(self.port.stopListening)

    @property
    def url(self) -> str:
        return f"http://user:{PROXY_PASSWORD}@127.0.0.1:{self.port.getHost().port}"


class EgressProxyTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.servers = LocalServers(self)
        # the mirror's own resolvers know none of the registry names: only the proxy can reach them
        self.dns, self.dns_server = start_dns(self, {"proxy.test": [("A", "127.0.0.1")]})

    def client(
        self, proxy: LocalProxy, no_proxy: tuple[str, ...] = (), url: str | None = None
    ) -> UpstreamClient:
        resolver = UpstreamResolver([self.dns_server], reactor=reactor, timeout=1.0,
                                    policy=AddressPolicy(allow_internal=True))
        client = UpstreamClient(
            resolver,
            reactor=reactor,
            tls_policy=UpstreamTLSPolicy.from_bundle(pki().ca_path),
            settings=UpstreamSettings(connect_timeout=5),
            proxy=EgressProxy.parse(url or proxy.url, no_proxy),
        )
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_requests_go_through_a_connect_tunnel_with_tls_to_the_registry(self):
        proxy = LocalProxy(self)
        client = self.client(proxy)
        for _ in range(2):  # the second request reuses the pooled tunnel
            response = yield client.request("GET", self.servers.url("registry.test", "/blob"))
            self.assertEqual((response.code, (yield response.read_body(1024))), (200, b"blob-bytes"))
        port = self.servers.ports["registry.test"]
        self.assertEqual(
            proxy.requests, [(b"CONNECT", f"registry.test:{port}", b"Basic dXNlcjpwcjB4eS1zZWNyZXQ=")]
        )
        self.assertEqual(self.dns.queries, [])  # the proxy resolved the name, not the mirror
        self.assertEqual(len(self.servers.requests_to("registry.test")), 2)

    @defer.inlineCallbacks
    def test_a_proxy_named_by_host_name_is_resolved_by_the_mirrors_resolvers(self):
        proxy = LocalProxy(self)
        client = self.client(proxy, url=proxy.url.replace("127.0.0.1", "proxy.test"))
        response = yield client.request("GET", self.servers.url("registry.test", "/blob"))
        yield response.discard()
        self.assertEqual(response.code, 200)
        self.assertEqual({name for name, _type in self.dns.queries}, {"proxy.test"})
        self.assertEqual(len(proxy.requests), 1)

    @defer.inlineCallbacks
    def test_the_registry_certificate_is_still_verified_inside_the_tunnel(self):
        proxy = LocalProxy(self)
        request = self.client(proxy).request(
            "GET", self.servers.url("wrong.test", "/blob", port_of="registry.test")
        )
        yield self.assertFailure(request, UpstreamTLSError)
        self.assertEqual(self.servers.log, [])

    @defer.inlineCallbacks
    def test_a_refused_tunnel_is_a_clear_upstream_failure(self):
        proxy = LocalProxy(self, refuse=True)
        error = yield self.assertFailure(
            self.client(proxy).request("GET", self.servers.url("registry.test", "/blob")), UpstreamUnavailable
        )
        self.assertIn("refused CONNECT", str(error))
        self.assertIn("403 Forbidden", str(error))
        self.assertNotIn(PROXY_PASSWORD, str(error))

    @defer.inlineCallbacks
    def test_a_proxy_that_never_answers_fails_the_request_after_the_connect_timeout(self):
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        resolver = UpstreamResolver([self.dns_server], reactor=reactor, timeout=1.0)
        client = UpstreamClient(
            resolver,
            reactor=reactor,
            tls_policy=UpstreamTLSPolicy.from_bundle(pki().ca_path),
            settings=UpstreamSettings(connect_timeout=0.5),
            proxy=EgressProxy.parse(f"http://127.0.0.1:{silent.getHost().port}"),
        )
        self.addCleanup(client.close)
        error = yield self.assertFailure(client.request("GET", self.servers.url("registry.test", "/blob")),
                                         UpstreamUnavailable)
        self.assertIn("no answer to CONNECT", str(error))

    @defer.inlineCallbacks
    def test_a_cancelled_request_drops_the_tunnel_being_opened(self):
        silent_connections = []

        class Silent(Protocol):
            def connectionMade(self):
                silent_connections.append(self)

        silent = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)

        endpoint = TunnelEndpoint(reactor, EgressProxy.parse(f"http://127.0.0.1:{silent.getHost().port}"),
                                  "registry.test", 443, timeout=30)
        opening = endpoint.connect(Factory.forProtocol(Protocol))
        yield task_until(lambda: silent_connections)
        opening.cancel()
        yield self.assertFailure(opening, defer.CancelledError)
        yield task_until(lambda: not silent_connections[0].transport.connected)

    @defer.inlineCallbacks
    def test_no_proxy_hosts_are_reached_directly_through_the_mirrors_resolvers(self):
        proxy = LocalProxy(self)
        client = self.client(proxy, no_proxy=("test",))
        request = client.request("GET", self.servers.url("registry.test", "/blob"))
        yield self.assertFailure(request, Exception)  # direct: the mirror's resolvers do not know the name
        self.assertEqual(proxy.requests, [])
        self.assertIn(("registry.test", "A"), self.dns.queries)
