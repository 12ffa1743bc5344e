"""The upstream HTTP client against real local HTTPS servers, resolved through a loopback DNS responder.

Two twisted.web HTTPS servers listen on 127.0.0.1 with certificates from a CA made here:
``registry.test`` and ``cdn.test``; the DNS responder maps both (and ``wrong.test``) to 127.0.0.1, so
every connection goes name -> configured resolver -> address -> verified TLS, as in production.
"""

from __future__ import annotations

import json
import os
from io import BytesIO

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from upstream_support import pki, start_dns
from zope.interface import implementer

from dnsmirror import config, failures
from dnsmirror.config import ConfigError
from dnsmirror.resolver import AddressPolicy, AddressRefused, UpstreamResolver
from dnsmirror.upstream import (
    BodyTooLarge,
    RedirectRefused,
    TooManyRedirects,
    UpstreamClient,
    UpstreamSettings,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamTLSPolicy,
    UpstreamUnavailable,
    end_to_end_headers,
    header_pairs,
    redirect_target,
)

MiB = 1024 * 1024

# --- pure helpers -------------------------------------------------------------------------------------


class HeaderTests(SynchronousTestCase):
    def test_hop_by_hop_and_connection_named_headers_removed(self):
        headers = end_to_end_headers(
            [
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "5"),
                ("TE", "trailers"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic x"),
                ("Trailer", "X"),
                ("Proxy-Connection", "keep-alive"),
                ("Authorization", "Bearer t"),
                ("X-Other", "y"),
            ]
        )
        self.assertEqual(header_pairs(headers), [(b"authorization", b"Bearer t"), (b"x-other", b"y")])

    def test_repeated_headers_stay_separate_values(self):
        headers = end_to_end_headers([("Accept", f"type/{n}") for n in range(6)])
        self.assertEqual(len(headers.getRawHeaders(b"accept")), 6)

    def test_accepts_headers_and_mappings(self):
        twisted_headers = Headers({b"Accept": [b"a", b"b"]})
        self.assertEqual(
            header_pairs(end_to_end_headers(twisted_headers)), [(b"accept", b"a"), (b"accept", b"b")]
        )
        self.assertEqual(
            header_pairs({"X-A": ["1", "2"], "X-B": "3"}), [(b"x-a", b"1"), (b"x-a", b"2"), (b"x-b", b"3")]
        )


class RedirectTargetTests(SynchronousTestCase):
    base = "https://registry.test/v2/r/blobs/sha256:aa"

    def test_redirect_codes_with_location(self):
        for code in (301, 302, 303, 307, 308):
            self.assertEqual(redirect_target(code, [("Location", "https://cdn.test/x?sig=1")], self.base),
                             "https://cdn.test/x?sig=1")

    def test_relative_location_resolved(self):
        self.assertEqual(redirect_target(302, [("Location", "/other/path")], self.base), "https://registry.test/other/path")
        self.assertEqual(redirect_target(302, [("Location", "//cdn.test/x")], self.base), "https://cdn.test/x")

    def test_loggable_url_hides_signatures_and_userinfo(self):
        from dnsmirror.upstream import loggable_url

        self.assertEqual(loggable_url("https://u:p@cdn.test:8443/b/x?X-Amz-Signature=s#f"), "https://cdn.test:8443/b/x?...")
        self.assertEqual(loggable_url("https://registry.test/v2/"), "https://registry.test/v2/")

    def test_not_redirects(self):
        self.assertIsNone(redirect_target(200, [("Location", "https://x.test/")], self.base))
        self.assertIsNone(redirect_target(304, [("Location", "https://x.test/")], self.base))
        self.assertIsNone(redirect_target(302, [], self.base))
        self.assertIsNone(
            redirect_target(
                302, [("Location", "https://a.test/"), ("Location", "https://b.test/")], self.base
            )
        )


class ConfigTests(SynchronousTestCase):
    def test_upstream_keys_parse(self):
        parsed = config.parse_document(
            {
                "upstream": {
                    "first_byte_timeout": "5s",
                    "read_timeout": "500ms",
                    "pool_per_host": 4,
                    "pool_idle_timeout": "20s",
                    "allow_internal": True,
                }
            }
        )
        settings = UpstreamSettings.from_config(parsed)
        self.assertEqual((settings.first_byte_timeout, settings.read_timeout, settings.pool_per_host,
                          settings.pool_idle_timeout), (5.0, 0.5, 4, 20.0))
        self.assertTrue(parsed.upstream.allow_internal)
        self.assertFalse(config.load().upstream.allow_internal)

    def test_bad_values_name_their_key(self):
        with self.assertRaises(ConfigError) as caught:
            config.parse_document({"upstream": {"allow_internal": "yes", "first_byte_timeout": "soon"}})
        paths = [path for path, _ in caught.exception.problems]
        self.assertIn("upstream.allow_internal", paths)
        self.assertIn("upstream.first_byte_timeout", paths)

    def test_from_config_uses_upstream_resolvers_and_reads_the_bundle(self):
        parsed = config.parse_document(
            {"upstream": {"resolvers": ["127.0.0.1:5399"], "ca_bundle": str(pki().ca_path)}}
        )
        client = UpstreamClient.from_config(parsed, reactor)
        self.assertEqual([str(s) for s in client.resolver.servers], ["127.0.0.1:5399"])
        self.assertEqual(len(client.tls_policy.trust.extra), 1)
        self.assertIsNotNone(client.resolver.policy.refusal("127.0.0.1", 8443))  # dnsmirror's own listener

    def test_missing_bundle_is_a_config_error(self):
        parsed = config.parse_document(
            {"upstream": {"resolvers": ["127.0.0.1:5399"], "ca_bundle": "/nonexistent/ca.pem"}}
        )
        with self.assertRaises(ConfigError) as caught:
            UpstreamClient.from_config(parsed, reactor)
        self.assertEqual(caught.exception.problems[0][0], "upstream.ca_bundle")


# --- local HTTPS servers ------------------------------------------------------------------------------------


@implementer(IPushProducer)
class _Streamer:
    """Writes ``size`` bytes into a request, honouring the transport's back-pressure."""

    def __init__(self, request, size: int) -> None:
        self.request = request
        self.remaining = size
        self.paused = False
        self.stopped = False
        self.chunk = b"x" * (256 * 1024)

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True

    def pump(self) -> None:
        for _ in range(64):  # bounded per call; the rest comes back through resumeProducing/callLater
            if self.paused or self.stopped:
                return
            if self.remaining <= 0:
                self.request.unregisterProducer()
                self.request.finish()
                self.stopped = True
                return
            piece = self.chunk[: min(len(self.chunk), self.remaining)]
            self.remaining -= len(piece)
            self.request.write(piece)
        reactor.callLater(0, self.pump)


class _Recorder(resource.Resource):
    """Every request recorded as (host name, method, path, [(name, value) lines], client port)."""

    isLeaf = True

    def __init__(self, name: str, servers: LocalServers) -> None:
        super().__init__()
        self.name = name
        self.servers = servers

    def render(self, request):
        path = request.uri.decode()
        lines = [
            (n.decode().lower(), v.decode())
            for n, vs in request.requestHeaders.getAllRawHeaders()
            for v in vs
        ]
        body = request.content.read()
        self.servers.connections.add(request.transport)
        self.servers.log.append(
            (self.name, request.method.decode(), path, lines, request.getClientAddress().port, len(body))
        )
        route = path.split("?")[0]
        if route == "/echo":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"headers": lines, "body_length": len(body)}).encode()
        if route.startswith("/redirect/"):
            request.setResponseCode(int(route.split("/")[2]))
            location = path.split("/", 3)[3].replace("PORT_CDN", str(self.servers.ports["cdn.test"]))
            request.setHeader(b"location", location.encode())
            return b"moved"
        if route == "/loop":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/loop")
            return b""
        if route == "/hang":
            self.servers.hanging.append(request)
            return server.NOT_DONE_YET
        if route == "/stall":
            request.setHeader(b"content-length", b"1000")
            request.write(b"y" * 10)
            self.servers.hanging.append(request)
            return server.NOT_DONE_YET
        if route == "/big":
            size = int(path.split("size=")[1])
            request.setHeader(b"content-length", str(size).encode())
            if request.method == b"HEAD":
                return b""
            streamer = _Streamer(request, size)
            request.registerProducer(streamer, True)
            streamer.pump()
            return server.NOT_DONE_YET
        if route == "/blob":
            return b"blob-bytes"
        if route.startswith("/status/"):
            request.setResponseCode(int(route.split("/")[2]))
            return b"answered"
        request.setResponseCode(404)
        return b"not found"


class LocalServers:
    """``registry.test`` and ``cdn.test`` over HTTPS on 127.0.0.1, torn down with every connection."""

    def __init__(self, test: TestCase) -> None:
        self.log: list[tuple] = []
        self.hanging: list = []
        self.connections: set = set()
        self.ports: dict[str, int] = {}
        for name in ("registry.test", "cdn.test"):
            site = server.Site(_Recorder(name, self))
            site.noisy = False
            listening = reactor.listenSSL(0, site, pki().server_options(name), interface="127.0.0.1")
            self.ports[name] = listening.getHost().port
            test.addCleanup(listening.stopListening)
        test.addCleanup(self.close_connections)

    def url(self, host: str, path: str, port_of: str | None = None) -> str:
        return f"https://{host}:{self.ports[port_of or host]}{path}"

    def requests_to(self, name: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == name]

    def close_connections(self) -> defer.Deferred:
        for connection in self.connections:
            if connection.connected and not connection.disconnecting:
                connection.abortConnection()
        return task.deferLater(reactor, 0.05, lambda: None)


# --- client tests ------------------------------------------------------------------------------------------


class UpstreamClientTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.servers = LocalServers(self)
        self.dns, self.dns_server = start_dns(self, {
            name: [("A", "127.0.0.1")] for name in ("registry.test", "cdn.test", "wrong.test")
        })

    def client(
        self, *, bundle: bool = True, policy: AddressPolicy | None = None, **settings
    ) -> UpstreamClient:
        resolver = UpstreamResolver([self.dns_server], reactor=reactor, timeout=1.0,
                                    policy=policy or AddressPolicy(allow_internal=True))
        tls = UpstreamTLSPolicy.from_bundle(pki().ca_path if bundle else None)
        client = UpstreamClient(
            resolver, reactor=reactor, tls_policy=tls, settings=UpstreamSettings(**settings)
        )
        self.addCleanup(client.close)
        return client

    def url(self, path: str, host: str = "registry.test", port_of: str | None = None) -> str:
        return self.servers.url(host, path, port_of)

    # TLS

    @defer.inlineCallbacks
    def test_verified_with_the_extra_ca_bundle(self):
        response = yield self.client().request("GET", self.url("/blob"))
        self.assertEqual((response.code, (yield response.read_body(1024))), (200, b"blob-bytes"))
        self.assertIn(("registry.test", "A"), self.dns.queries)  # resolved through the configured resolver

    @defer.inlineCallbacks
    def test_untrusted_without_the_bundle(self):
        client = self.client(bundle=False)
        failures = []
        client.on_tls_failure = lambda host, reason: failures.append((host, reason))
        error = yield self.assertFailure(client.request("GET", self.url("/blob")), UpstreamTLSError)
        self.assertIn("registry.test", str(error))
        self.assertEqual(self.servers.log, [])
        self.assertEqual(failures, [("registry.test", str(error))])

    @defer.inlineCallbacks
    def test_a_tls_failure_after_a_redirect_is_reported_for_the_host_the_request_named(self):
        client = self.client()
        failures = []
        client.on_tls_failure = lambda host, reason: failures.append(host)
        # the redirect's target answers with a certificate for another name
        request = client.request("GET", self.url("/redirect/302/https://wrong.test:PORT_CDN/blob"),
                                 follow_redirects=True)
        yield self.assertFailure(request, UpstreamTLSError)
        self.assertEqual(failures, ["registry.test"])

    @defer.inlineCallbacks
    def test_a_handshake_with_something_that_is_not_tls_is_not_a_refused_certificate(self):
        class NotTLS(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                self.transport.loseConnection()

        port = reactor.listenTCP(0, Factory.forProtocol(NotTLS), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = self.client()
        failures = []
        client.on_tls_failure = lambda host, reason: failures.append(host)
        error = yield self.assertFailure(
            client.request("GET", f"https://registry.test:{port.getHost().port}/blob"), UpstreamTLSError)
        self.assertFalse(error.untrusted)
        self.assertEqual(failures, [])

    @defer.inlineCallbacks
    def test_other_failures_are_not_reported_as_tls_failures(self):
        client = self.client(connect_timeout=2)
        failures = []
        client.on_tls_failure = lambda host, reason: failures.append(host)
        response = yield client.request("GET", self.url("/missing"))
        yield response.discard()
        self.assertEqual((response.code, failures), (404, []))

    @defer.inlineCallbacks
    def test_platform_trust_honours_ssl_cert_file(self):
        previous = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = str(pki().ca_path)
        try:
            response = yield self.client(bundle=False).request("GET", self.url("/blob"))
            yield response.discard()
        finally:
            if previous is None:
                del os.environ["SSL_CERT_FILE"]
            else:
                os.environ["SSL_CERT_FILE"] = previous
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_hostname_mismatch_fails(self):
        request = self.client().request("GET", self.url("/blob", host="wrong.test", port_of="registry.test"))
        yield self.assertFailure(request, UpstreamTLSError)
        self.assertEqual(self.servers.log, [])

    @defer.inlineCallbacks
    def test_each_host_is_verified_although_hosts_share_one_context(self):
        client = self.client()
        response = yield client.request("GET", self.url("/blob"))
        yield response.discard()
        request = client.request("GET", self.url("/blob", host="wrong.test", port_of="registry.test"))
        yield self.assertFailure(request, UpstreamTLSError)
        self.assertEqual(len(self.servers.log), 1)

    def test_plain_http_url_refused(self):
        return self.assertFailure(self.client().request("GET", "http://registry.test/v2/"), ValueError)

    @defer.inlineCallbacks
    def test_internal_address_refused_by_default(self):
        yield self.assertFailure(
            self.client(policy=AddressPolicy()).request("GET", self.url("/blob")), AddressRefused
        )
        self.assertEqual(self.servers.log, [])

    # headers

    @defer.inlineCallbacks
    def test_headers_pass_through_with_repeats_and_without_hop_by_hop(self):
        accepts = [f"application/vnd.type{n}+json" for n in range(6)]
        headers = [("Accept", a) for a in accepts] + [
            ("Authorization", "Bearer team-a"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic p"),
            ("Host", "evil.test"),
            ("User-Agent", "skopeo/1.9"),
        ]
        response = yield self.client().request("GET", self.url("/echo"), headers)
        received = [tuple(line) for line in json.loads((yield response.read_body(MiB)))["headers"]]
        self.assertEqual([v for n, v in received if n == "accept"], accepts)
        names = {n for n, _ in received}
        for hop in ("x-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
            self.assertNotIn(hop, names)
        self.assertNotIn("close", [v for n, v in received if n == "connection"])
        self.assertIn(("authorization", "Bearer team-a"), received)
        self.assertIn(("user-agent", "skopeo/1.9"), received)
        self.assertEqual(
            [v for n, v in received if n == "host"], [f"registry.test:{self.servers.ports['registry.test']}"]
        )
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

    @defer.inlineCallbacks
    def test_head_keeps_content_length(self):
        response = yield self.client().request("HEAD", self.url("/big?size=1234"))
        yield response.discard()
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"1234"])

    @defer.inlineCallbacks
    def test_request_bodies_sized_and_chunked(self):
        client = self.client()
        sized = FileBodyProducer(BytesIO(b"z" * 5000))
        response = yield client.request("PUT", self.url("/echo"), [("Content-Length", "999")], sized)
        echoed = json.loads((yield response.read_body(MiB)))
        self.assertEqual(echoed["body_length"], 5000)
        self.assertEqual([v for n, v in echoed["headers"] if n == "content-length"], ["5000"])
        chunked = FileBodyProducer(BytesIO(b"q" * 7000))
        chunked.length = UNKNOWN_LENGTH
        response = yield client.request(
            "PATCH", self.url("/echo"), [("Transfer-Encoding", "chunked")], chunked
        )
        echoed = json.loads((yield response.read_body(MiB)))
        self.assertEqual(echoed["body_length"], 7000)
        self.assertEqual([v for n, v in echoed["headers"] if n == "transfer-encoding"], ["chunked"])

    # redirects

    @defer.inlineCallbacks
    def test_redirect_to_another_host_drops_authorization_and_cookie(self):
        target = "https://cdn.test:PORT_CDN/blob?sig=abc"
        headers = [("Authorization", "Bearer secret"), ("Cookie", "session=1"), ("Accept", "*/*")]
        response = yield self.client().request(
            "GET", self.url(f"/redirect/307/{target}"), headers, follow_redirects=True
        )
        self.assertEqual((yield response.read_body(MiB)), b"blob-bytes")
        self.assertEqual(response.url, self.servers.url("cdn.test", "/blob?sig=abc"))
        self.assertEqual(len(response.redirects), 1)
        [first] = self.servers.requests_to("registry.test")
        [second] = self.servers.requests_to("cdn.test")
        self.assertIn(("authorization", "Bearer secret"), first[3])
        second_names = {n for n, _ in second[3]}
        self.assertNotIn("authorization", second_names)
        self.assertNotIn("cookie", second_names)
        self.assertIn(("accept", "*/*"), second[3])

    @defer.inlineCallbacks
    def test_same_origin_relative_redirect_keeps_authorization(self):
        response = yield self.client().request(
            "GET", self.url("/redirect/302//blob"), [("Authorization", "Bearer a")], follow_redirects=True
        )
        yield response.discard()
        self.assertEqual(response.code, 200)
        self.assertEqual([("authorization", "Bearer a") in e[3] for e in self.servers.log], [True, True])

    @defer.inlineCallbacks
    def test_redirect_to_http_refused(self):
        request = self.client().request("GET", self.url("/redirect/302/http://cdn.test:PORT_CDN/blob?sig=secret"),
                                        follow_redirects=True)
        error = yield self.assertFailure(request, RedirectRefused)
        self.assertIn("https only", str(error))
        self.assertNotIn("secret", str(error))
        self.assertEqual(self.servers.requests_to("cdn.test"), [])

    @defer.inlineCallbacks
    def test_redirect_to_a_refused_address_is_not_followed(self):
        policy = AddressPolicy(
            allow_internal=True, refused_endpoints=frozenset({("127.0.0.1", self.servers.ports["cdn.test"])})
        )
        request = self.client(policy=policy).request("GET", self.url("/redirect/302/https://cdn.test:PORT_CDN/blob"),
                                                     follow_redirects=True)
        yield self.assertFailure(request, AddressRefused)
        self.assertEqual(self.servers.requests_to("cdn.test"), [])

    @defer.inlineCallbacks
    def test_redirect_count_is_bounded(self):
        yield self.assertFailure(
            self.client(max_redirects=3).request("GET", self.url("/loop"), follow_redirects=True),
            TooManyRedirects,
        )
        self.assertEqual(len(self.servers.log), 4)

    @defer.inlineCallbacks
    def test_redirect_returned_when_not_following(self):
        response = yield self.client().request("GET", self.url("/redirect/307/https://cdn.test/x"))
        yield response.discard()
        self.assertEqual((response.code, response.headers.getRawHeaders(b"location")), (307, [b"https://cdn.test/x"]))

    # timeouts

    @defer.inlineCallbacks
    def test_first_byte_timeout(self):
        started = reactor.seconds()
        error = yield self.assertFailure(
            self.client(first_byte_timeout=0.5).request("GET", self.url("/hang")), UpstreamTimeout
        )
        elapsed = reactor.seconds() - started
        self.assertTrue(0.45 <= elapsed < 3, elapsed)
        self.assertIn("no response headers", str(error))

    @defer.inlineCallbacks
    def test_first_byte_timeout_counts_from_the_end_of_the_request_body(self):
        body = FileBodyProducer(BytesIO(b"z" * 5000))
        request = self.client(first_byte_timeout=0.5).request("PUT", self.url("/hang"), None, body)
        yield self.assertFailure(request, UpstreamTimeout)
        [(_name, method, _path, _lines, _port, length)] = self.servers.log
        self.assertEqual((method, length), ("PUT", 5000))

    @defer.inlineCallbacks
    def test_idle_read_timeout(self):
        stalls = failures.failures.count("upstream", "read_timeout")
        response = yield self.client(read_timeout=0.5).request("GET", self.url("/stall"))
        started = reactor.seconds()
        error = yield self.assertFailure(response.read_body(MiB), UpstreamTimeout)
        self.assertTrue(0.45 <= reactor.seconds() - started < 3)
        self.assertIn("no body bytes", str(error))
        # reported once, by the upstream client, for the operator
        self.assertEqual(failures.failures.count("upstream", "read_timeout"), stalls + 1)

    @defer.inlineCallbacks
    def test_a_cut_body_is_reported_with_how_far_it_got(self):
        reported = []
        self.patch(failures, "report", lambda _, kind, reason, **_where: reported.append((kind, reason)))
        response = yield self.client(read_timeout=10).request("GET", self.url("/stall"))
        reading = response.read_body(MiB)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.servers.hanging[0].transport.abortConnection()
        error = yield self.assertFailure(reading, UpstreamUnavailable)
        self.assertIn("body cut after 10 of 1000 bytes", str(error))
        # the operator's log says the same, once
        [(kind, reason)] = reported
        self.assertEqual(kind, "body_cut")
        self.assertIn("body cut after 10 of 1000 bytes", reason)

    @defer.inlineCallbacks
    def test_read_body_limit(self):
        cuts = sum(failures.failures.count("upstream", kind) for kind in failures.UPSTREAM_KINDS)
        response = yield self.client().request("GET", self.url("/big?size=100000"))
        yield self.assertFailure(response.read_body(1000), BodyTooLarge)
        # the mirror stopped reading: not upstream's failure
        self.assertEqual(
            sum(failures.failures.count("upstream", kind) for kind in failures.UPSTREAM_KINDS), cuts
        )

    @defer.inlineCallbacks
    def test_an_upstream_5xx_is_counted(self):
        answered = failures.failures.count("upstream", "status_5xx")
        response = yield self.client().request("GET", self.url("/status/503"))
        yield response.discard()
        self.assertEqual(response.code, 503)
        self.assertEqual(failures.failures.count("upstream", "status_5xx"), answered + 1)

    # streaming and pooling

    @defer.inlineCallbacks
    def test_large_body_streams_with_back_pressure(self):
        size = 100 * MiB
        consumer = SlowConsumer(high=2 * MiB, low=512 * 1024, drain=MiB, tick=0.002)
        response = yield self.client(read_timeout=5).request("GET", self.url(f"/big?size={size}"))
        self.assertEqual(response.length, size)
        total = yield response.stream_to(consumer)
        self.assertEqual((total, consumer.total), (size, size))
        # after a pause only what one socket read held can still arrive: memory stays flat
        self.assertLess(consumer.max_buffered, 2 * MiB + 512 * 1024)
        self.assertGreater(consumer.pauses, 5)
        self.assertGreater(response.watch.watched.pauses, 5)  # the pauses reached the upstream transport

    @defer.inlineCallbacks
    def test_a_paused_reader_is_not_an_idle_upstream(self):
        consumer = SlowConsumer(high=64 * 1024, low=0, drain=0, tick=0.05)
        response = yield self.client(read_timeout=0.3).request("GET", self.url(f"/big?size={4 * MiB}"))
        done = response.stream_to(consumer)
        yield task.deferLater(reactor, 1.0, lambda: None)  # paused for longer than the read timeout
        self.assertTrue(consumer.paused)
        self.assertFalse(done.called)
        consumer.drain = 4 * MiB
        self.assertEqual((yield done), 4 * MiB)

    @defer.inlineCallbacks
    def test_connections_are_reused(self):
        client = self.client()
        for _ in range(3):
            response = yield client.request("GET", self.url("/echo"))
            yield response.read_body(MiB)
        ports = {entry[4] for entry in self.servers.log}
        self.assertEqual((len(self.servers.log), len(ports)), (3, 1))


@implementer(IConsumer)
class SlowConsumer:
    """A consumer that pauses its producer above ``high`` buffered bytes and, only while paused, drains
    ``drain`` bytes every ``tick`` seconds, resuming below ``low``: every ``high - low`` bytes make one
    pause, however fast the producer is (a drain while running made the count depend on the machine)."""

    def __init__(self, high: int, low: int, drain: int, tick: float) -> None:
        self.high, self.low, self.drain = high, low, drain
        self.buffered = self.total = self.max_buffered = self.pauses = 0
        self.paused = False
        self.producer = None
        self.loop = task.LoopingCall(self._tick)
        self.tick = tick

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming
        self.producer = producer
        self.loop.start(self.tick, now=False)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.loop.stop()

    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        self.total += len(data)
        self.max_buffered = max(self.max_buffered, self.buffered)
        if self.buffered > self.high and not self.paused:
            self.paused = True
            self.pauses += 1
            self.producer.pauseProducing()

    def _tick(self) -> None:
        if not self.paused:
            return
        self.buffered = max(0, self.buffered - self.drain)
        if self.paused and self.buffered <= self.low and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()


