"""The access log, over a real loopback HTTP server: finished and abandoned requests."""

from __future__ import annotations

import logging

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from dnsmirror.access import AccessLogSite
from dnsmirror.uploads import StreamingRequest


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict] = []
        self.arrived = defer.Deferred()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.fields)
        if not self.arrived.called:
            self.arrived.callback(None)


class Answers(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hanging = defer.Deferred()

    def render_GET(self, request):
        if request.path == b"/hang":
            self.hanging.callback(request)
            return server.NOT_DONE_YET
        request.source = "cache"
        return b"hello"


class Raw(protocol.Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.closed = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)


class AccessLogTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.recorder = Recorder()
        logger = logging.getLogger("dnsmirror.access")
        self.previous_level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self.recorder)
        self.addCleanup(logger.removeHandler, self.recorder)
        self.addCleanup(logger.setLevel, self.previous_level)
        self.answers = Answers()
        self.site = AccessLogSite(self.answers, requestFactory=StreamingRequest)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def connect(self, payload: bytes) -> defer.Deferred:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        return connectProtocol(endpoint, Raw(payload))

    @defer.inlineCallbacks
    def test_a_finished_request_is_logged_without_its_query_or_headers(self):
        client = yield self.connect(
            b"GET /v2/app/tags/list?n=10&token=secret HTTP/1.1\r\nHost: registry.test\r\n"
            b"Authorization: Basic c2VjcmV0\r\nConnection: close\r\n\r\n"
        )
        yield client.closed
        self.assertIn(b"hello", client.received)
        (line,) = self.recorder.lines
        self.assertEqual(
            {key: line[key] for key in ("event", "method", "host", "path", "status", "bytes", "source")},
            {
                "event": "access",
                "method": "GET",
                "host": "registry.test",
                "path": "/v2/app/tags/list",
                "status": 200,
                "bytes": 5,
                "source": "cache",
            },
        )
        self.assertEqual(line["client"], "127.0.0.1")
        self.assertGreaterEqual(line["ms"], 0)
        self.assertNotIn("outcome", line)
        self.assertNotIn("secret", repr(line))
        self.assertNotIn("c2VjcmV0", repr(line))

    @defer.inlineCallbacks
    def test_a_request_whose_client_left_is_logged_as_aborted(self):
        client = yield self.connect(b"GET /hang HTTP/1.1\r\nHost: registry.test\r\n\r\n")
        yield self.answers.hanging
        client.transport.loseConnection()
        yield self.recorder.arrived
        (line,) = self.recorder.lines
        self.assertEqual((line["path"], line["outcome"], line["bytes"]), ("/hang", "aborted", 0))

    @defer.inlineCallbacks
    def test_switched_off(self):
        self.site.access = False
        client = yield self.connect(b"GET /x HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\n\r\n")
        yield client.closed
        self.assertEqual(self.recorder.lines, [])
