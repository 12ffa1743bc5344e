"""One conformance suite per contract of dnsmirror/contracts.py, run against the real implementation and
against its in-memory fake (tests/fakes.py): what passes here for both is what tests on the fake may rely
on. The cache store: the real Store on a temporary directory. The upstream client: the real
UpstreamClient over verified TLS to a twisted.web site on 127.0.0.1, resolved through a loopback DNS
responder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
from fakes import MemoryStore, MemoryUpstream
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import resource, server
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from upstream_support import pki, start_dns

from dnsmirror.contracts import BlobStore, Upstream
from dnsmirror.resolver import AddressPolicy, UpstreamResolver
from dnsmirror.store import DigestMismatch, SizeMismatch, Store, StoreError, StoreFull
from dnsmirror.upstream import UPSTREAM_FAILURES, BodyTooLarge, UpstreamClient, UpstreamTLSPolicy

MAX_SIZE = 1000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the cache store --------------------------------------------------------------------------------------


class StoreUnderTest:
    """A store and a way to damage what it holds, as a failing disk would."""

    def __init__(self, store: BlobStore, damage) -> None:
        self.store = store
        self.damage = damage

    def put(self, data: bytes, content_type: str | None = "application/x-test") -> None:
        writer = self.store.writer(sha(data), content_type=content_type, expected_size=len(data))
        writer.write(data)
        writer.commit()


def _damage_file(store: Store, digest: str) -> None:
    with open(store.blob_path(digest), "r+b") as file:
        first = file.read(1)
        file.seek(0)
        file.write(bytes([first[0] ^ 1]))


@pytest.fixture(params=["real", "fake"])
def subject(request, tmp_path) -> Iterator[StoreUnderTest]:
    if request.param == "fake":
        fake = MemoryStore(MAX_SIZE)
        yield StoreUnderTest(fake, fake.damage)
        return
    with Store.open(tmp_path / "cache", MAX_SIZE) as real:
        yield StoreUnderTest(real, lambda digest: _damage_file(real, digest))


def test_a_committed_blob_is_found_with_its_size_and_type_and_read_back_through_a_descriptor(subject):
    store, data = subject.store, b"committed bytes"
    assert sha(data) not in store and store.stat(sha(data)) is None and store.open_blob(sha(data)) is None
    writer = store.writer(sha(data))
    writer.describe("application/x-test", len(data))
    writer.write(data[:5])
    writer.write(data[5:])
    info = writer.commit()
    assert (info.digest, info.size, info.content_type) == (sha(data), len(data), "application/x-test")
    assert sha(data) in store
    stat = store.stat(sha(data))
    assert (stat.size, stat.content_type) == (len(data), "application/x-test")
    reader = store.open_blob(sha(data))
    try:
        assert reader.verified  # hashed as it was written
        assert (reader.size, reader.info.digest) == (len(data), sha(data))
        assert os.pread(reader.file.fileno(), 100, 0) == data
        reader.seek(10)
        assert reader.read() == data[10:]
    finally:
        reader.close()


def test_a_writer_file_holds_only_accepted_bytes_and_is_gone_once_committed(subject):
    # how the real file grows while a large blob is written: tests/test_store.py (a stage of 1 MiB is more
    # than this suite's cache)
    data = b"x" * 300
    writer = subject.store.writer(sha(data), expected_size=len(data))
    assert writer.room is None or writer.room > 0
    writer.write(data[:100])
    writer.verify([data[100:]])  # checks the bytes still to come, and writes nothing
    writer.write(data[100:])
    in_file = writer.bytes_in_file  # bytes may wait in a stage before they reach the file
    assert 0 <= in_file <= len(data) and writer.failure is None
    with open(writer.temp_path, "rb") as file:
        assert file.read(in_file) == data[:in_file]
    writer.commit()
    assert not os.path.exists(writer.temp_path)
    with subject.store.open_blob(sha(data)) as reader:
        assert reader.file.read() == data


def test_wrong_bytes_fail_verification_and_nothing_is_kept(subject):
    store = subject.store
    writer = store.writer(sha(b"right"))
    writer.write(b"wrong")
    with pytest.raises(DigestMismatch):
        writer.verify()
    assert not os.path.exists(writer.temp_path)
    writer.abort()  # safe after the writer aborted itself
    with pytest.raises(StoreError):
        writer.write(b"more")
    committing = store.writer(sha(b"right"))
    committing.write(b"wrong")
    with pytest.raises(DigestMismatch):
        committing.commit()
    assert sha(b"right") not in store


def test_more_bytes_than_announced_abort_the_writer(subject):
    writer = subject.store.writer(sha(b"abc"), expected_size=2)
    with pytest.raises(SizeMismatch):
        writer.write(b"abc")
    assert not os.path.exists(writer.temp_path)
    assert sha(b"abc") not in subject.store


def test_a_blob_larger_than_the_cache_is_refused_at_once_or_stops_going_to_the_file(subject):
    store, data = subject.store, b"y" * (MAX_SIZE + 1)
    with pytest.raises(StoreFull):
        store.writer(sha(data), expected_size=len(data))
    writer = store.writer(sha(data))  # its length unknown when it started
    writer.write(data)
    assert isinstance(writer.failure, StoreFull)
    writer.verify()  # still hashed: the body was right, only the cache could not take it
    with pytest.raises(StoreFull):
        writer.commit()
    assert sha(data) not in store


def test_make_room_says_whether_a_blob_fits_and_evicts_nothing_for_one_that_never_can(subject):
    subject.put(b"kept")
    assert subject.store.make_room(10)
    assert not subject.store.make_room(2**60)
    assert sha(b"kept") in subject.store


def test_committed_blobs_beyond_the_limit_evict_the_least_recently_used(subject):
    first, second, third = (bytes([n]) * 400 for n in (1, 2, 3))
    subject.put(first)
    subject.put(second)
    subject.store.open_blob(sha(first)).close()  # read: the most recently used now
    subject.put(third)
    assert (sha(first) in subject.store, sha(second) in subject.store, sha(third) in subject.store) == (
        True,
        False,
        True,
    )


def test_an_intact_blob_verifies_and_reads_whole_up_to_a_limit(subject):
    data = b"intact"
    subject.put(data)
    reader = subject.store.open_blob(sha(data))
    try:
        assert subject.store.verify_reader(reader) and reader.verified
        assert subject.store.read_verified(reader, len(data)) == data
        assert subject.store.read_verified(reader, len(data) - 1) is None  # too long: not read
        assert sha(data) in subject.store
    finally:
        reader.close()


@pytest.mark.parametrize("check", ["verify_reader", "read_verified"])
def test_a_damaged_blob_is_found_unverified_and_dropped_when_hashed(subject, check):
    data = b"soon damaged"
    subject.put(data)
    subject.damage(sha(data))
    reader = subject.store.open_blob(sha(data))
    try:
        assert not reader.verified
        if check == "verify_reader":
            assert subject.store.verify_reader(reader) is False
        else:
            assert subject.store.read_verified(reader, 100) is None
        assert not reader.verified
        assert sha(data) not in subject.store
    finally:
        reader.close()


def test_a_blob_marked_verified_opens_verified_and_one_dropped_is_gone(subject):
    data = b"marked"
    subject.put(data)
    subject.damage(sha(data))
    reader = subject.store.open_blob(sha(data))
    subject.store.mark_verified(reader)  # the caller hashed it itself (a streamed check)
    reader.close()
    again = subject.store.open_blob(sha(data))
    assert again.verified
    assert subject.store.drop_damaged(again, "found damaged") is True
    again.close()
    assert sha(data) not in subject.store and subject.store.open_blob(sha(data)) is None


def test_a_name_that_is_not_a_digest_is_refused(subject):
    for call in (subject.store.stat, subject.store.open_blob, subject.store.writer):
        with pytest.raises(ValueError):
            call("sha256:../../etc/passwd")


# --- the upstream client ------------------------------------------------------------------------------------

REGISTRY = "registry.test"
BLOB = b"0123456789" * 30
CUT = 100  # the bytes of BLOB "/v2/team/app/blobs/cut" sends before its connection closes
ROUTES: dict[str, tuple[int, bytes, dict[bytes, list[bytes]]]] = {
    "/v2/team/app/blobs/ok": (200, BLOB, {b"content-type": [b"application/octet-stream"]}),
    "/v2/team/app/blobs/cut": (200, BLOB, {b"content-type": [b"application/octet-stream"]}),
    "/v2/team/app/blobs/private": (
        401,
        b'{"errors":[{"code":"UNAUTHORIZED"}]}',
        {
            b"www-authenticate": [b'Bearer realm="https://auth.test/token"'],
            b"content-type": [b"application/json"],
        },
    ),
}


class _Site(resource.Resource):
    """Answers ``ROUTES`` (404 otherwise); records each request as (method, path, headers)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[str, str, Headers]] = []

    def render(self, request):
        path = request.uri.decode()
        self.received.append((request.method.decode(), path, request.requestHeaders.copy()))
        route = path.split("?")[0]
        code, body, headers = ROUTES.get(route, (404, b"not found", {}))
        request.setResponseCode(code)
        for name, values in headers.items():
            request.responseHeaders.setRawHeaders(name, values)
        if route.endswith("/cut"):
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body[:CUT])
            request.channel.loseConnection()  # the rest never comes
            return server.NOT_DONE_YET
        return body


class _Collect(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended: defer.Deferred = defer.Deferred()  # fires with [the reason the body ended]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.ended.callback([reason])


class _Consumer:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer = None
        self.registered = False

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer, self.registered = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)


class UpstreamContract:
    """The checks; a subclass gives ``client`` and ``received`` (what upstream saw) in ``setUp``."""

    client: Upstream
    url_base: str

    def received(self) -> list[tuple[str, str, Headers]]:
        raise NotImplementedError

    def url(self, path: str) -> str:
        return self.url_base + path

    @defer.inlineCallbacks
    def test_a_200_comes_with_its_status_length_headers_and_whole_body(self):
        answer = yield self.client.request("GET", self.url("/v2/team/app/blobs/ok"))
        self.assertEqual((answer.code, answer.length), (200, len(BLOB)))
        self.assertEqual(answer.headers.getRawHeaders(b"content-type"), [b"application/octet-stream"])
        self.assertEqual(answer.headers.getRawHeaders(b"content-length"), [str(len(BLOB)).encode()])
        self.assertIn("/v2/team/app/blobs/ok", answer.description)
        self.assertEqual((yield answer.read_body(len(BLOB))), BLOB)

    @defer.inlineCallbacks
    def test_a_refusal_is_an_answer_with_its_own_headers_not_a_failure(self):
        answer = yield self.client.request("GET", self.url("/v2/team/app/blobs/private"))
        self.assertEqual(answer.code, 401)
        self.assertEqual(answer.headers.getRawHeaders(b"www-authenticate"),
                         [b'Bearer realm="https://auth.test/token"'])
        self.assertIn(b"UNAUTHORIZED", (yield answer.read_body(1024)))
        missing = yield self.client.request("GET", self.url("/v2/team/app/blobs/unknown"))
        self.assertEqual(missing.code, 404)
        yield missing.discard()

    @defer.inlineCallbacks
    def test_a_body_reaches_a_protocol_in_order_and_ends_with_response_done(self):
        answer = yield self.client.request("GET", self.url("/v2/team/app/blobs/ok"))
        body = _Collect()
        answer.deliver_body(body)
        [reason] = yield body.ended
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(b"".join(body.chunks), BLOB)
        for call in ("pauseProducing", "resumeProducing", "stopProducing"):
            self.assertTrue(callable(getattr(body.transport, call)))

    @defer.inlineCallbacks
    def test_a_body_cut_short_ends_in_a_failure_and_reads_of_it_fail_as_upstream_failures(self):
        answer = yield self.client.request("GET", self.url("/v2/team/app/blobs/cut"))
        self.assertEqual((answer.code, answer.length), (200, len(BLOB)))
        body = _Collect()
        answer.deliver_body(body)
        [reason] = yield body.ended
        self.assertFalse(reason.check(ResponseDone))
        self.assertEqual(b"".join(body.chunks), BLOB[:CUT])
        for read in (lambda again: again.read_body(4096), lambda again: again.stream_to(_Consumer())):
            again = yield self.client.request("GET", self.url("/v2/team/app/blobs/cut"))
            failure = yield self.assertFailure(read(again), *UPSTREAM_FAILURES)
            self.assertIn(f"body cut after {CUT} of {len(BLOB)} bytes", str(failure))

    @defer.inlineCallbacks
    def test_a_body_streams_into_a_consumer_registered_as_its_producer(self):
        answer = yield self.client.request("GET", self.url("/v2/team/app/blobs/ok"))
        consumer = _Consumer()
        yield answer.stream_to(consumer)
        self.assertEqual(b"".join(consumer.written), BLOB)
        self.assertTrue(consumer.registered)
        self.assertIsNone(consumer.producer)  # unregistered at the end

    @defer.inlineCallbacks
    def test_a_body_over_the_limit_fails_and_a_body_is_consumed_once(self):
        answer = yield self.client.request("GET", self.url("/v2/team/app/blobs/ok"))
        yield self.assertFailure(answer.read_body(len(BLOB) - 1), BodyTooLarge)
        again = yield self.client.request("GET", self.url("/v2/team/app/blobs/ok"))
        yield again.discard()
        self.assertRaises(RuntimeError, again.deliver_body, _Collect())

    @defer.inlineCallbacks
    def test_a_head_answers_status_and_headers_without_a_body(self):
        answer = yield self.client.request("HEAD", self.url("/v2/team/app/blobs/ok"))
        self.assertEqual(answer.code, 200)
        self.assertEqual((yield answer.read_body(1024)), b"")

    @defer.inlineCallbacks
    def test_the_clients_end_to_end_headers_reach_upstream_and_hop_by_hop_ones_do_not(self):
        headers = [
            ("Authorization", "Bearer team-token"),
            ("Accept", "application/vnd.oci.image.manifest.v1+json"),
            ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
            ("Connection", "x-hop"),
            ("X-Hop", "1"),
        ]
        answer = yield self.client.request("GET", self.url("/v2/team/app/blobs/ok"), headers)
        yield answer.discard()
        method, path, seen = self.received()[-1]
        self.assertEqual((method, path.removeprefix(self.url_base)), ("GET", "/v2/team/app/blobs/ok"))
        self.assertEqual(seen.getRawHeaders(b"authorization"), [b"Bearer team-token"])
        self.assertEqual(len(seen.getRawHeaders(b"accept")), 2)
        self.assertFalse(seen.hasHeader(b"x-hop"))

    @defer.inlineCallbacks
    def test_no_answer_is_one_of_the_upstream_failures_and_plain_http_is_refused(self):
        failure = yield self.assertFailure(
            self.client.request("GET", "https://nowhere.test/v2/"), *UPSTREAM_FAILURES
        )
        self.assertIn("nowhere.test", str(failure))
        yield self.assertFailure(self.client.request("GET", "http://registry.test/v2/"), ValueError)


class RealUpstreamTests(UpstreamContract, TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.site = _Site()
        web = server.Site(self.site)
        web.noisy = False
        port = reactor.listenSSL(0, web, pki().server_options(REGISTRY), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        _, dns = start_dns(self, {REGISTRY: [("A", "127.0.0.1")]})
        resolver = UpstreamResolver(
            [dns], reactor=reactor, timeout=1.0, policy=AddressPolicy(allow_internal=True)
        )
        client = UpstreamClient(
            resolver, reactor=reactor, tls_policy=UpstreamTLSPolicy.from_bundle(pki().ca_path)
        )
        self.addCleanup(client.close)
        self.client = client
        self.url_base = f"https://{REGISTRY}:{port.getHost().port}"

    def received(self) -> list[tuple[str, str, Headers]]:
        return self.site.received


class FakeUpstreamTests(UpstreamContract, TestCase):
    def setUp(self) -> None:
        self.url_base = f"https://{REGISTRY}"
        self.fake = MemoryUpstream({self.url_base + path: answer for path, answer in ROUTES.items()})
        self.fake.cuts[self.url_base + "/v2/team/app/blobs/cut"] = CUT
        self.client = self.fake

    def received(self) -> list[tuple[str, str, Headers]]:
        return self.fake.received
