"""In-memory stand-ins shared by the in-process tests: one request, one channel, disks, an upstream, and
one fake per contract of dnsmirror/contracts.py: MemoryUpstream and MemoryAnswer, MemoryStore and
MemoryWriter (held to the real implementations by tests/test_contracts.py), and ScriptedSource.

Test modules take their fakes from here, never from one another.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from dnsmirror import oci
from dnsmirror.authz import ANONYMOUS
from dnsmirror.store import (
    BlobInfo,
    BlobReader,
    DigestMismatch,
    SizeMismatch,
    Store,
    StoreError,
    StoreFull,
    digest_hex,
)
from dnsmirror.streaming import DiskIO
from dnsmirror.target import Target
from dnsmirror.upstream import AGENT_MANAGED, BodyTooLarge, UpstreamUnavailable, end_to_end_headers, origin


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


class _BodyTransport:
    """What a fake answer's body protocol gets as its transport: pausing it holds the next chunk back."""

    def __init__(self, answer: MemoryAnswer) -> None:
        self.answer = answer
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.answer._pump()

    def stopProducing(self) -> None:
        self.stopped = True
        self.answer._pump()


class MemoryAnswer:
    """The in-memory fake of contracts.UpstreamAnswer: a status, headers and a body held in memory,
    delivered in ``chunk``-byte pieces that wait while the receiver pauses (whole at once by default).
    ``tests/test_contracts.py`` runs the same checks against it and the real UpstreamResponse."""

    phrase = b""

    def __init__(
        self,
        code: int,
        body: bytes = b"",
        headers: dict[bytes, list[bytes]] | None = None,
        *,
        method: str = "GET",
        url: str = "https://registry.example/",
        chunk: int | None = None,
        cut: int | None = None,
    ) -> None:
        self.code = code
        self.body = body if method != "HEAD" else b""
        self.method = method
        self.url = url
        self.chunk = chunk or max(1, len(body))
        self.cut = cut  # the body breaks off after this many bytes (its connection lost)
        self.headers = Headers({name: list(values) for name, values in (headers or {}).items()})
        self.length: int | None = len(body)
        if method != "HEAD" and code not in (204, 304):
            self.headers.setRawHeaders(b"content-length", [str(len(body)).encode()])
        self._consumed = False
        self._protocol = None
        self._transport: _BodyTransport | None = None
        self._sent = 0

    @property
    def description(self) -> str:
        return f"{self.method} {self.url.split('?')[0]}"

    def deliver_body(self, protocol) -> None:
        if self._consumed:
            raise RuntimeError(f"{self.description}: body already consumed")
        self._consumed = True
        self._protocol = protocol
        self._transport = _BodyTransport(self)
        protocol.makeConnection(self._transport)
        self._pump()

    def _pump(self) -> None:
        transport, protocol = self._transport, self._protocol
        if protocol is None or transport is None:
            return
        end = len(self.body) if self.cut is None else min(self.cut, len(self.body))
        while not transport.paused and not transport.stopped and self._sent < end:
            piece = self.body[self._sent:min(end, self._sent + self.chunk)]
            self._sent += len(piece)
            protocol.dataReceived(piece)
        if transport.stopped or self._sent >= end:
            self._protocol = None
            done = ResponseDone() if self._sent >= len(self.body) else self._cut_error()
            protocol.connectionLost(Failure(done))

    def _cut_error(self) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"{self.description}: body cut after {self._sent} of {len(self.body)} bytes: connection lost"
        )

    def stream_to(self, consumer) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()

        class Stream:
            transport = None

            def makeConnection(self, transport) -> None:
                self.transport = transport
                consumer.registerProducer(transport, True)

            def dataReceived(self, data: bytes) -> None:
                consumer.write(data)

            def connectionLost(self, reason: Failure) -> None:
                consumer.unregisterProducer()
                if reason.check(ResponseDone):
                    done.callback(len(answer.body))
                else:
                    done.errback(reason)

        answer = self
        self.deliver_body(Stream())
        return done

    def read_body(self, limit: int) -> defer.Deferred:
        if self.length is not None and self.length > limit:
            self._consumed = True
            too_large = BodyTooLarge(f"{self.description}: body of {self.length} bytes exceeds {limit}")
            return defer.fail(too_large)
        self._consumed_check()
        if self.cut is not None and self.cut < len(self.body):
            self._sent = self.cut
            return defer.fail(self._cut_error())
        return defer.succeed(self.body)

    def discard(self, limit: int = 0) -> defer.Deferred:
        self._consumed_check()
        return defer.succeed(None)

    def _consumed_check(self) -> None:
        if self._consumed:
            raise RuntimeError(f"{self.description}: body already consumed")
        self._consumed = True


class BlobResponse(MemoryAnswer):
    """Upstream's 200 with ``body``, delivered whole as soon as a body protocol is attached."""

    code = 200  # subclasses answer another status by overriding it

    def __init__(self, body: bytes) -> None:
        super().__init__(self.code, body, {b"content-type": [b"application/octet-stream"]})

    def discard(self, *args) -> defer.Deferred:
        return defer.succeed(None)  # tests discard an answer they also read: no single-use check


class MemoryUpstream:
    """The in-memory fake of contracts.Upstream: answers from ``routes`` (URL without query ->
    ``(code, body, headers)``), 404 for other URLs of a known host, no answer for unknown hosts;
    ``received`` records each request as (method, URL, end-to-end headers)."""

    def __init__(self, routes: dict[str, tuple[int, bytes, dict[bytes, list[bytes]]]] | None = None) -> None:
        self.routes = dict(routes or {})
        self.cuts: dict[str, int] = {}  # URL -> bytes of its body sent before the connection is lost
        self.received: list[tuple[str, str, Headers]] = []

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        method = method.decode("ascii") if isinstance(method, bytes) else method
        url = url.decode("ascii") if isinstance(url, bytes) else url
        if origin(url)[0] != "https":
            return defer.fail(ValueError(f"upstream URLs must be https: {url!r}"))
        host = origin(url)[1]
        if not any(origin(known)[1] == host for known in self.routes):
            return defer.fail(UpstreamUnavailable(f"cannot connect to {host}: no such host"))
        self.received.append((method.upper(), url, end_to_end_headers(headers, drop=AGENT_MANAGED)))
        code, body, answer_headers = self.routes.get(url.split("?")[0], (404, b"not found", {}))
        cut = self.cuts.get(url.split("?")[0])
        answer = MemoryAnswer(code, body, answer_headers, method=method.upper(), url=url, cut=cut)
        return defer.succeed(answer)


class OneBlobUpstream:
    """Answers every GET with ``body``, delivered as soon as a body protocol is attached."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        return defer.succeed(BlobResponse(self.body))


class ScriptedSource:
    """The fake of contracts.Source: answers ``outcome`` and records in ``asked`` that it was asked."""

    def __init__(self, name: str, outcome, asked: list[str]) -> None:
        self.name, self.outcome, self.asked = name, outcome, asked

    async def resolve(self, request, target):
        self.asked.append(self.name)
        return self.outcome


# --- the disk -----------------------------------------------------------------------------------------


def _memory_file(data: bytes = b""):
    """An unbuffered binary file held in memory, with a real descriptor (streamers pread from it)."""
    fd = os.memfd_create("dnsmirror-test-blob", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return os.fdopen(fd, "r+b", buffering=0)


class MemoryWriter:
    """The in-memory fake of contracts.BlobWriter: bytes go to a memory file named by ``temp_path``
    (readable while written, gone once committed or aborted), hashed as they come."""

    def __init__(self, store: MemoryStore, digest: str, content_type: str | None, expected_size: int | None):
        self.store = store
        self.digest = digest
        self.content_type = content_type
        self.expected_size = expected_size
        self.bytes_written = 0
        self.bytes_in_file = 0
        self.failure: BaseException | None = None
        self.room: int | None = store.capacity - store.total_size
        self._hasher = hashlib.sha256()
        self._file = _memory_file()
        self.temp_path = Path(f"/proc/self/fd/{self._file.fileno()}")
        self._done = False

    def describe(self, content_type: str | None, expected_size: int | None) -> None:
        self.content_type, self.expected_size = content_type, expected_size

    def write(self, data) -> None:
        if self._done:
            raise StoreError("writer already committed or aborted")
        data = bytes(data)
        size = self.bytes_written + len(data)
        if self.expected_size is not None and size > self.expected_size:
            self.abort()
            raise SizeMismatch(self.digest, self.expected_size, size)
        self._hasher.update(data)
        self.bytes_written = size
        if size > self.store.max_size and self.failure is None:
            self.failure = StoreFull(f"blob is larger than the cache ({self.store.max_size} bytes)")
            self._close()
        if self.failure is None:
            self._file.write(data)
            self.bytes_in_file = size

    def verify(self, rest=()) -> None:
        if self._done:
            raise StoreError("writer already committed or aborted")
        hasher, size = self._hasher.copy(), self.bytes_written
        for chunk in rest:
            hasher.update(chunk)
            size += len(chunk)
        try:
            self._check(hasher, size)
        except DigestMismatch:
            self.abort()
            raise

    def _check(self, hasher, size: int) -> None:
        actual = "sha256:" + hasher.hexdigest()
        if actual != self.digest:
            raise DigestMismatch(self.digest, actual, size)
        if self.expected_size is not None and size != self.expected_size:
            raise SizeMismatch(self.digest, self.expected_size, size)

    def commit(self) -> BlobInfo:
        if self.failure is not None:
            failure = self.failure
            self.abort()
            raise failure
        try:
            self._check(self._hasher, self.bytes_written)
        except BaseException:
            self.abort()
            raise
        self._file.seek(0)
        data = self._file.read()
        self.abort()
        return self.store._commit(self.digest, data, self.content_type)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._close()

    def _close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()


class MemoryStore:
    """The in-memory fake of contracts.BlobStore: committed blobs are bytes in a dict (oldest read
    first evicted past ``max_size``), readers memory files; ``capacity`` is the disk's size.
    ``damage(digest)`` changes a stored blob's bytes, as a failing disk would."""

    def __init__(self, max_size: int, capacity: int | None = None) -> None:
        self.max_size = max_size
        self.capacity = capacity if capacity is not None else 4 * max_size
        self.blobs: OrderedDict[str, tuple[bytes, str | None]] = OrderedDict()
        self.verified: set[str] = set()

    @property
    def total_size(self) -> int:
        return sum(len(data) for data, _ in self.blobs.values())

    def __contains__(self, digest: object) -> bool:
        return str(digest) in self.blobs

    def _info(self, digest: str) -> BlobInfo:
        data, content_type = self.blobs[digest]
        return BlobInfo(digest, len(data), content_type, 0.0)

    def stat(self, digest: object) -> BlobInfo | None:
        digest_hex(digest)
        return self._info(str(digest)) if str(digest) in self.blobs else None

    def open_blob(self, digest: object) -> BlobReader | None:
        digest_hex(digest)
        if str(digest) not in self.blobs:
            return None
        self.blobs.move_to_end(str(digest))
        data, _ = self.blobs[str(digest)]
        return BlobReader(_memory_file(data), self._info(str(digest)), verified=str(digest) in self.verified)

    def _content(self, reader: BlobReader) -> bytes:
        return os.pread(reader.file.fileno(), reader.size + 1, 0)

    def verify_reader(self, reader: BlobReader) -> bool:
        data = self._content(reader)
        if "sha256:" + hashlib.sha256(data).hexdigest() == reader.info.digest and len(data) == reader.size:
            self.mark_verified(reader)
            return True
        self.drop_damaged(reader, "blob content does not match its digest")
        return False

    def read_verified(self, reader: BlobReader, limit: int) -> bytes | None:
        if reader.size > limit:
            return None
        return self._content(reader) if self.verify_reader(reader) else None

    def mark_verified(self, reader: BlobReader) -> None:
        if reader.info.digest in self.blobs:
            self.verified.add(reader.info.digest)
        reader.verified = True

    def drop_damaged(self, reader: BlobReader, reason: str) -> bool:
        reader.verified = False
        self.verified.discard(reader.info.digest)
        return self.blobs.pop(reader.info.digest, None) is not None

    def make_room(self, size: int) -> bool:
        if self.capacity < size:
            return False  # not even an empty disk would hold it: nothing is evicted for it
        while self.blobs and self.capacity - self.total_size < size:
            self.blobs.popitem(last=False)
        return self.capacity - self.total_size >= size

    def writer(self, digest: object, *, content_type: str | None = None, expected_size: int | None = None):
        digest_hex(digest)
        if expected_size is not None and expected_size > self.max_size:
            raise StoreFull(f"blob of {expected_size} bytes is larger than the cache ({self.max_size} bytes)")
        if expected_size is not None and not self.make_room(expected_size):
            raise StoreFull(f"no room for a blob of {expected_size} bytes on the cache's filesystem")
        return MemoryWriter(self, str(digest), content_type, expected_size)

    def _commit(self, digest: str, data: bytes, content_type: str | None) -> BlobInfo:
        self.blobs.pop(digest, None)
        self.blobs[digest] = (data, content_type)
        self.verified.add(digest)
        while self.total_size > self.max_size:
            oldest = next(iter(self.blobs))
            del self.blobs[oldest]
            self.verified.discard(oldest)
        return self._info(digest)

    def damage(self, digest: str) -> None:
        data, content_type = self.blobs[digest]
        self.blobs[digest] = (bytes([data[0] ^ 1]) + data[1:], content_type)
        self.verified.discard(digest)


@defer.inlineCallbacks
def task_until(condition, timeout: float = 5.0):
    """Wait on the reactor until ``condition()`` is true (bounded)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        yield task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met in time")
