"""In-memory stand-ins shared by the in-process tests: one request, one channel, disks, an upstream.

Test modules take their fakes from here, never from one another.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from dnsmirror import oci
from dnsmirror.authz import ANONYMOUS
from dnsmirror.store import Store
from dnsmirror.streaming import DiskIO
from dnsmirror.target import Target


def registry_target(
    path: str,
    *,
    host: str,
    method: str = "GET",
    credential: str = ANONYMOUS,
    authorization: list[bytes] | None = None,
) -> Target:
    """The Target of a request for ``path`` at registry ``host`` (its own upstream), with ``credential``."""
    uri = path.encode()
    return Target(
        host=host,
        upstream_host=host,
        uri=uri,
        method=method,
        path=oci.parse_path(uri),
        credential=credential,
        authorization=authorization or [],
    )


class InlineDisk(DiskIO):
    """Runs disk calls at once on the calling thread, so tests need no reactor."""

    def __init__(self, store):
        self.store = store
        self.reactor = task.Clock()  # the fill's pacing timers; advanced by hand

    def run(self, function, *args, **kwargs):
        return defer.maybeDeferred(function, *args, **kwargs)


class ManualDisk(DiskIO):
    """Queues every disk call; the test runs them one by one, and may run one now and report it later."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reactor = task.Clock()
        self.queue: list[tuple[object, tuple, dict, defer.Deferred]] = []

    def run(self, function, *args, **kwargs) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.queue.append((function, args, kwargs, d))
        return d

    def _take(self, name: str):
        for index, (function, args, kwargs, d) in enumerate(self.queue):
            if getattr(function, "__name__", "") == name:
                del self.queue[index]
                return function, args, kwargs, d
        raise AssertionError(
            f"no queued {name} call in {[getattr(f, '__name__', f) for f, *_ in self.queue]}"
        )

    def step(self, name: str) -> None:
        """Run the queued call of ``name`` and report its outcome at once."""
        function, args, kwargs, d = self._take(name)
        defer.maybeDeferred(function, *args, **kwargs).chainDeferred(d)

    def run_quietly(self, name: str) -> defer.Deferred:
        """Run the queued call of ``name`` now; its outcome reaches the caller when the result is fired."""
        function, args, kwargs, d = self._take(name)
        outcome = defer.maybeDeferred(function, *args, **kwargs)
        held: defer.Deferred = defer.Deferred()
        held.addCallback(lambda _: outcome.chainDeferred(d))
        return held

    def drain(self, limit: int = 100) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            function, args, kwargs, d = self.queue.pop(0)
            defer.maybeDeferred(function, *args, **kwargs).chainDeferred(d)
        raise AssertionError("disk calls did not settle")


class _TLSHandle:
    def __init__(self, sni: str | None) -> None:
        self.sni = sni

    def get_servername(self):
        return self.sni.encode() if self.sni else None


class FakeTransport:
    """A connection's transport: records aborts and producer calls; ``sni`` is its TLS server name."""

    def __init__(self, sni: str | None = None):
        self.handle = _TLSHandle(sni)
        self.aborted = False
        self.paused = 0
        self.resumed = 0
        self.stopped = False

    def abortConnection(self):
        self.aborted = True

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1

    def stopProducing(self):
        self.stopped = True

    def getHandle(self):
        return self.handle


class FakeChannel:
    def __init__(self, sni: str | None = None):
        self.transport = FakeTransport(sni)


class FakeRequest:
    """Enough of twisted.web's Request for the content path: status, headers, writes, finish, a producer,
    a channel; ``headers`` are the request's own (a Range, an Accept)."""

    content = None
    # the fields dnsmirror's own request type (uploads.StreamingRequest) declares
    early_answer = None
    early_response = None

    def __init__(
        self,
        headers: dict[bytes, bytes | list[bytes]] | None = None,
        *,
        uri: bytes = b"/",
        method: bytes = b"GET",
        sni: str | None = None,
    ) -> None:
        self.uri = uri
        self.method = method
        self.written: list[bytes] = []
        self.finished = False
        self.producer = None
        self.channel = FakeChannel(sni)
        self.transport = self.channel.transport
        self._finish = defer.Deferred()
        self.requestHeaders = Headers(
            {name: value if isinstance(value, list) else [value] for name, value in (headers or {}).items()}
        )
        self.headers: dict[bytes, bytes] = {}  # the response's
        self.responseHeaders = Headers()
        self.code = 200
        self.source = None

    @property
    def body(self) -> bytes:
        return b"".join(self.written)

    @property
    def startedWriting(self):
        return bool(self.written)

    def getHeader(self, name):
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def setHeader(self, name, value):
        self.headers[name.lower()] = value

    def setResponseCode(self, code, message=None):
        self.code = code

    def write(self, data):
        assert not self.finished
        self.written.append(data)

    def finish(self):
        self.finished = True

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self._finish


def range_request(first: int, last: int) -> FakeRequest:
    """A GET with a Range header."""
    return FakeRequest({b"range": f"bytes={first}-{last}".encode()})


class BlobResponse:
    """Upstream's 200 with ``body``, delivered whole as soon as a body protocol is attached."""

    code = 200

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)
        self.headers = Headers({b"content-type": [b"application/octet-stream"]})

    def deliver_body(self, protocol) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def discard(self, *args) -> defer.Deferred:
        return defer.succeed(None)


class OneBlobUpstream:
    """Answers every GET with ``body``, delivered as soon as a body protocol is attached."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        return defer.succeed(BlobResponse(self.body))
