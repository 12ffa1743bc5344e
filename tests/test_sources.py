"""The content chain as a chain of sources: order, fall-through, single flight; sources decide, the
responder writes."""

from __future__ import annotations

import hashlib
import os

import pytest
from fakes import (
    BlobResponse,
    FakeRequest,
    ManualDisk,
    MemoryStore,
    MemoryUpstream,
    OneBlobUpstream,
    ScriptedSource,
    registry_target,
)
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from dnsmirror import oci
from dnsmirror.authz import ANONYMOUS, Grants
from dnsmirror.content import ContentChain
from dnsmirror.flight import Flight
from dnsmirror.outcomes import Failed, FromCache, Manifest, NotHere, PassOn, UncachedWanted
from dnsmirror.store import Store
from dnsmirror.target import Target

HOST = "registry.example"


def target_of(digest: str, kind: str = "blobs", method: str = "GET") -> Target:
    return registry_target(f"/v2/team/app/{kind}/{digest}", host=HOST, method=method)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class CountingUpstream(OneBlobUpstream):
    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.gets = 0

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        self.gets += method == "GET"
        return super().request(method, url, headers, body_producer, follow_redirects=follow_redirects)


class RecordingPassThrough:
    def __init__(self) -> None:
        self.forwarded: list[Target] = []

    async def forward(self, request, target) -> None:
        self.forwarded.append(target)
        request.setResponseCode(403)
        request.finish()


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "cache", 10 * 2**20) as opened:
        yield opened


def chain_of(store: Store, body: bytes = b"") -> tuple[ContentChain, ManualDisk, CountingUpstream]:
    disk = ManualDisk(store)
    upstream = CountingUpstream(body)
    grants = Grants(300, 86400)
    grants.grant(ANONYMOUS, HOST, "team/app", [sha(body)], disk.reactor.seconds())
    return ContentChain(disk.reactor, disk, upstream, grants, RecordingPassThrough()), disk, upstream


# --- one result, many waiters -------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=8), st.integers(min_value=0, max_value=8))
def test_every_waiter_of_a_flight_gets_its_one_result_before_or_after_it_settles(before, after):
    flight = Flight()
    early = [flight.wait() for _ in range(before)]
    assert not any(d.called for d in early)
    flight.settle("result")
    late = [flight.wait() for _ in range(after)]
    got: list[str] = []
    for d in early + late:
        d.addCallback(got.append)
    assert got == ["result"] * (before + after)


def test_a_flight_that_failed_fails_every_waiter_and_a_cancelled_waiter_leaves_the_others():
    flight = Flight()
    gone, waiting = flight.wait(), flight.wait()
    gone.cancel()
    gone.addErrback(lambda failure: failure.trap(defer.CancelledError))
    flight.settle(Failure(ValueError("upstream unreachable")))
    failures: list[Failure] = []
    waiting.addErrback(failures.append)
    flight.wait().addErrback(failures.append)
    assert [f.type for f in failures] == [ValueError, ValueError]


# --- the chain tries its sources in order ---------------------------------------------------------------


def test_the_chain_asks_the_next_source_only_when_one_has_nothing(store):
    chain, disk, upstream = chain_of(store)
    asked: list[str] = []
    refusal = Failed(oci.OCIError("UNAVAILABLE", "scripted", status=503))
    chain.local_sources = [
        ScriptedSource("first", NotHere("no"), asked),
        ScriptedSource("second", refusal, asked),
        ScriptedSource("third", NotHere("never asked"), asked),
    ]
    request = FakeRequest()
    defer.ensureDeferred(chain.serve(request, target_of(sha(b"x"))))
    disk.drain()
    assert asked == ["first", "second"] and request.code == 503 and request.finished
    assert b"scripted" in request.body and upstream.gets == 0


def test_a_refusal_from_a_source_is_passed_on_and_nothing_else_is_asked(store):
    chain, disk, upstream = chain_of(store)
    asked: list[str] = []
    chain.local_sources = [
        ScriptedSource("denied", PassOn(), asked),
        ScriptedSource("after", NotHere(), asked),
    ]
    request = FakeRequest()
    defer.ensureDeferred(chain.serve(request, target_of(sha(b"x"))))
    disk.drain()
    assert asked == ["denied"] and chain.passthrough.forwarded and request.code == 403 and upstream.gets == 0


def test_when_no_source_has_it_upstream_fills_and_joiners_share_that_one_fill(store):
    data = os.urandom(200_000)
    chain, disk, upstream = chain_of(store, data)
    requests = [FakeRequest() for _ in range(3)]
    served = [defer.ensureDeferred(chain.serve(request, target_of(sha(data)))) for request in requests]
    for _ in range(50):
        disk.drain()
        for request in requests:
            if request.producer is not None:
                request.producer.resumeProducing()
        if all(d.called for d in served):
            break
    assert all(d.called for d in served)
    assert upstream.gets == 1 and chain.stats.fills_started == 1 and chain.stats.fills_joined == 2
    assert all(request.body == data and request.code == 200 for request in requests)
    assert [request.source for request in requests] == ["upstream", "fill", "fill"]
    assert sha(data) in store and not chain.slots


def test_on_the_in_memory_store_and_upstream_a_cold_read_fills_and_the_next_is_a_cache_hit():
    data = os.urandom(50_000)
    store = MemoryStore(10 * 2**20)
    disk = ManualDisk(store)
    url = f"https://{HOST}/v2/team/app/blobs/{sha(data)}"
    upstream = MemoryUpstream({url: (200, data, {b"content-type": [b"application/octet-stream"]})})
    grants = Grants(300, 86400)
    grants.grant(ANONYMOUS, HOST, "team/app", [sha(data)], disk.reactor.seconds())
    chain = ContentChain(disk.reactor, disk, upstream, grants, RecordingPassThrough())
    cold, warm = FakeRequest(), FakeRequest()
    served = [defer.ensureDeferred(chain.serve(cold, target_of(sha(data))))]
    pump(disk, [cold], served)
    served.append(defer.ensureDeferred(chain.serve(warm, target_of(sha(data)))))
    pump(disk, [warm], served)
    assert all(d.called for d in served)
    assert (cold.body, cold.source, warm.body, warm.source) == (data, "upstream", data, "cache")
    assert [(method, sent) for method, sent, _ in upstream.received] == [("GET", url)]
    assert sha(data) in store and chain.stats.cache_hits == 1


# --- sources decide, they never write -----------------------------------------------------------------


def test_the_cache_source_answers_an_outcome_and_writes_nothing(store):
    blob, manifest = os.urandom(5000), b'{"schemaVersion":2}'
    for data in (blob, manifest):
        writer = store.writer(sha(data), content_type="application/vnd.oci.image.manifest.v1+json")
        writer.write(data)
        writer.commit()
    chain, disk, _ = chain_of(store)
    chain.grants.grant(ANONYMOUS, HOST, "team/app", [sha(blob), sha(manifest)], disk.reactor.seconds())
    found = []
    for data, kind in ((blob, "blobs"), (manifest, "manifests")):
        request = FakeRequest()
        defer.ensureDeferred(chain.cache.resolve(request, target_of(sha(data), kind))).addCallback(
            found.append
        )
        disk.drain()
        assert request.written == [] and request.headers == {} and not request.finished
    assert isinstance(found[0], FromCache) and isinstance(found[1], Manifest) and found[1].body == manifest
    found[0].finished(None)  # the responder's part: close the reader it never streamed
    disk.drain()
    missing = FakeRequest()
    defer.ensureDeferred(chain.cache.resolve(missing, target_of(sha(b"absent")))).addCallback(found.append)
    disk.drain()
    assert isinstance(found[2], NotHere) and missing.written == []


# --- the chain's promises, in-process ------------------------------------------------------------------


def pump(
    disk: ManualDisk, requests: list[FakeRequest], served: list[defer.Deferred], rounds: int = 50
) -> None:
    """Run queued disk calls and let paused streamers go on until every request was served."""
    for _ in range(rounds):
        disk.drain()
        for request in requests:
            if request.producer is not None:
                request.producer.resumeProducing()
        if all(d.called for d in served):
            return


class SplitResponse(BlobResponse):
    """Upstream's 200 whose body arrives in parts: all but the last ``tail`` bytes in two pieces (a reader
    keeping up sends the first while the newest waits for the next), then the rest on ``finish()``."""

    def __init__(self, body: bytes, tail: int) -> None:
        super().__init__(body)
        self.tail, self.protocol = tail, None

    def deliver_body(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(None)
        middle = (len(self.body) - self.tail) // 2
        protocol.dataReceived(self.body[:middle])
        protocol.dataReceived(self.body[middle: -self.tail])

    def finish(self) -> None:
        self.protocol.dataReceived(self.body[-self.tail :])
        self.protocol.connectionLost(Failure(ResponseDone()))


class SplitUpstream(CountingUpstream):
    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        self.gets += method == "GET"
        self.response = SplitResponse(self.body, 1000)
        return defer.succeed(self.response)


def test_wrong_bytes_from_upstream_cut_every_reader_before_its_last_byte_and_nothing_is_cached(store):
    data = os.urandom(200_000)
    claimed = sha(b"what the client asked for")
    disk = ManualDisk(store)
    upstream = SplitUpstream(data)
    grants = Grants(300, 86400)
    grants.grant(ANONYMOUS, HOST, "team/app", [claimed], disk.reactor.seconds())
    chain = ContentChain(disk.reactor, disk, upstream, grants, RecordingPassThrough())
    requests = [FakeRequest() for _ in range(2)]
    served = [defer.ensureDeferred(chain.serve(request, target_of(claimed))) for request in requests]
    pump(disk, requests, served, rounds=5)
    assert all(request.producer is not None for request in requests)  # both stream the growing fill
    upstream.response.finish()
    pump(disk, requests, served)
    assert all(d.called for d in served)
    assert upstream.gets == 1 and chain.stats.digest_mismatches == 1 and claimed not in store
    assert all(
        request.channel.transport.aborted and 0 < len(request.body) < len(data) for request in requests
    )


def test_a_range_joining_a_running_fill_gets_its_bytes_from_the_growing_file(store):
    data = os.urandom(300_000)
    chain, disk, upstream = chain_of(store, data)
    whole, ranged = FakeRequest(), FakeRequest({b"range": b"bytes=1000-1999"})
    served = [defer.ensureDeferred(chain.serve(whole, target_of(sha(data))))]
    disk.step("writer")  # the cache file is created as upstream answers: the fill runs, not yet committed
    assert sha(data) in chain.slots
    served.append(defer.ensureDeferred(chain.serve(ranged, target_of(sha(data)))))
    pump(disk, [whole, ranged], served)
    assert upstream.gets == 1 and chain.stats.fills_joined == 1
    assert ranged.code == 206 and ranged.body == data[1000:2000]
    assert ranged.headers[b"content-range"] == f"bytes 1000-1999/{len(data)}".encode()
    assert whole.body == data and sha(data) in store


class RefusingUpstream(CountingUpstream):
    """Answers HEAD (an access check) with ``status``; GETs with the blob."""

    def __init__(self, body: bytes, status: int) -> None:
        super().__init__(body)
        self.status, self.heads = status, 0

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        if method == "HEAD":
            self.heads += 1
            response = BlobResponse(b"")
            response.code = self.status
            return defer.succeed(response)
        return super().request(method, url, headers, body_producer, follow_redirects=follow_redirects)


@pytest.mark.parametrize(("status", "answer"), [(403, 403), (401, 403), (404, 403), (503, 502)])
def test_cached_bytes_reach_only_a_credential_upstream_allows(store, status, answer):
    data = os.urandom(5000)
    writer = store.writer(sha(data))
    writer.write(data)
    writer.commit()
    disk = ManualDisk(store)
    upstream = RefusingUpstream(data, status)
    chain = ContentChain(disk.reactor, disk, upstream, Grants(300, 86400), RecordingPassThrough())
    request = FakeRequest()
    other_team = registry_target(
        f"/v2/team/app/blobs/{sha(data)}", host=HOST, credential="sha256:team-b", authorization=[b"Bearer b"]
    )
    served = defer.ensureDeferred(chain.serve(request, other_team))
    pump(disk, [request], [served])
    assert served.called and upstream.heads == 1 and upstream.gets == 0
    assert (
        request.code == answer and data not in request.body
    )  # refused (passed on) or unavailable: never the bytes
    assert bool(chain.passthrough.forwarded) == (answer == 403)


class RefusedResponse(BlobResponse):
    """Upstream's 404 for a blob, with its own error body and header."""

    code, phrase = 404, b"Not Found"

    def __init__(self) -> None:
        super().__init__(b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
        self.headers = Headers({b"x-upstream": [b"refused"]})

    async def stream_to(self, request) -> None:
        request.write(self.body)


class RefusingGets:
    """Answers every GET with a 404."""

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        return defer.succeed(RefusedResponse())


def test_a_refusal_of_an_uncached_fetch_reaches_the_client_as_sent_and_is_logged_as_upstreams(store):
    # a joiner of a fill whose disk failed asks upstream itself; upstream refuses it
    chain, disk, _ = chain_of(store)
    chain.upstream = RefusingGets()
    request = FakeRequest()
    served = defer.ensureDeferred(chain.respond.render(request, target_of(sha(b"gone")), UncachedWanted()))
    pump(disk, [request], [served])
    assert served.called and request.finished and request.code == 404
    assert request.body == RefusedResponse().body
    assert request.responseHeaders.getRawHeaders(b"x-upstream") == [b"refused"]
    assert request.source == "upstream" and sha(b"gone") not in store
