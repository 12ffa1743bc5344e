"""The content chain with its disk thread's calls ordered by hand, for races real threads hit rarely."""

from __future__ import annotations

import hashlib
import os

from fakes import BlobResponse as _Response
from fakes import FakeRequest, ManualDisk, OneBlobUpstream, range_request, registry_target
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dnsmirror import sources
from dnsmirror.authz import ANONYMOUS, Grants
from dnsmirror.content import ContentChain
from dnsmirror.store import Store
from dnsmirror.target import Target

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


def blob_target(digest: str) -> Target:
    return registry_target(f"/v2/team/app/blobs/{digest}", host=ECR)


def read_after_commit(store: Store, data: bytes) -> tuple[ManualDisk, FakeRequest, defer.Deferred]:
    """A GET of a small cold blob whose reader opens the fill's temp file just after the commit renamed it:
    the reader's open and the commit's rename race in two threads, the rename wins, and its outcome
    reaches the reactor only after the open has failed. Returns with the commit reported."""
    disk = ManualDisk(store)
    chain = ContentChain(disk.reactor, disk, OneBlobUpstream(data), Grants(300, 86400), passthrough=None)
    request = FakeRequest()
    served = defer.ensureDeferred(
        chain.serve(request, blob_target("sha256:" + hashlib.sha256(data).hexdigest()))
    )
    disk.step("writer")  # the cache file, created while upstream answers
    disk.step("verify")  # the whole body arrived at once: verified, its write still to come
    commit_reported = disk.run_quietly("_write_and_commit")
    disk.step("open")  # too late: the temp file has been renamed into the cache
    assert not request.channel.transport.aborted
    commit_reported.callback(None)
    return disk, request, served


def test_a_small_blob_committed_before_its_reader_opened_it_is_served_from_the_committed_file(tmp_path):
    data = os.urandom(300)
    with Store.open(tmp_path / "cache", 10 * 2**20) as store:
        disk, request, served = read_after_commit(store, data)
        disk.drain()

        assert served.called and served.result is None
        assert not request.channel.transport.aborted
        # the bytes are the ones this request fetched: the access log says upstream, not a cache hit
        assert request.finished and request.body == data and request.source == "upstream"
        assert "sha256:" + hashlib.sha256(data).hexdigest() in store


def test_a_blob_evicted_between_its_commit_and_its_readers_open_is_fetched_again(tmp_path):
    data = os.urandom(300)
    with Store.open(tmp_path / "cache", 10 * 2**20) as store:
        disk, request, served = read_after_commit(store, data)
        # another fill's commit evicts the blob before this reader opens it in the cache
        assert store.delete("sha256:" + hashlib.sha256(data).hexdigest())
        disk.drain()

        assert served.called and served.result is None
        assert not request.channel.transport.aborted
        assert request.finished and request.body == data and request.source == "upstream"


class _CutResponse(_Response):
    """A peer's 200 whose body breaks off after ``cut`` bytes."""

    def __init__(self, body: bytes, cut: int) -> None:
        super().__init__(body)
        self.cut = cut

    def deliver_body(self, protocol) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self.body[: self.cut])
        protocol.connectionLost(Failure(ConnectionLost("the peer went away")))


class _RangeResponse(_Response):
    code = 206

    def __init__(self, body: bytes, start: int) -> None:
        super().__init__(body[start:])
        self.headers.setRawHeaders(b"content-range", [f"bytes {start}-{len(body) - 1}/{len(body)}".encode()])


class RangeUpstream:
    """Answers a GET with a Range header with 206 and the rest of ``body``; records the requests."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.requests: list[dict] = []

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        self.requests.append(dict(headers or {}))
        start = int(headers[b"range"][0].decode().removeprefix("bytes=").rstrip("-"))
        return defer.succeed(_RangeResponse(self.body, start))


class BreakingPeer:
    """A peer client whose only peer sends the first ``cut`` bytes and goes away."""

    def __init__(self, body: bytes, cut: int) -> None:
        self.body, self.cut = body, cut
        self.broken: list[str] = []
        self.asked = 0

    def available(self) -> bool:
        return True

    async def fetch(self, digest):
        self.asked += 1
        return "10.0.0.7:5001", _CutResponse(self.body, self.cut)

    def failed(self, peer, digest, reason) -> None:
        self.broken.append(reason)

    def announce(self, digest) -> None:
        pass


def granted_chain(disk: ManualDisk, upstream, digest: str, passthrough=None, peers=None) -> ContentChain:
    """A chain whose anonymous client was just allowed ``digest`` (so no access check goes upstream)."""
    grants = Grants(300, 86400)
    grants.grant(ANONYMOUS, ECR, "team/app", [digest], disk.reactor.seconds())
    return ContentChain(disk.reactor, disk, upstream, grants, passthrough, peers=peers)


def test_a_peer_that_breaks_off_mid_blob_is_finished_from_upstream(tmp_path):
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with Store.open(tmp_path / "cache", 10 * 2**20) as store:
        disk = ManualDisk(store)
        upstream, peer = RangeUpstream(data), BreakingPeer(data, cut=123_456)
        chain = granted_chain(disk, upstream, digest, peers=peer)
        request = FakeRequest()
        served = defer.ensureDeferred(chain.serve(request, blob_target(digest)))
        disk.drain()

        assert served.called and served.result is None
        assert not request.channel.transport.aborted
        assert request.finished and request.body == data and request.source == "peer"
        assert [r[b"range"] for r in upstream.requests] == [[b"bytes=123456-"]]
        assert len(peer.broken) == 1 and "123456" in peer.broken[0]
        assert digest in store and chain.stats.peer_resumes == 1


def test_peers_are_not_asked_while_the_cache_disk_was_full_recently(tmp_path):
    data = os.urandom(50_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with Store.open(tmp_path / "cache", 10 * 2**20) as store:
        disk = ManualDisk(store)
        peer = BreakingPeer(data, cut=100)
        chain = granted_chain(disk, OneBlobUpstream(data), digest, peers=peer)
        chain.pause_caching()  # the cache disk failed a moment ago
        request = FakeRequest()
        served = defer.ensureDeferred(chain.serve(request, blob_target(digest)))
        disk.drain()

        assert served.called and served.result is None
        assert request.finished and request.body == data and request.source == "relay"
        assert peer.asked == 0 and digest not in store


# --- a damaged cache, a failing disk -------------------------------------------------------------------


class RecordingPassThrough:
    """Stands for upstream answering a request itself (the client's own headers, Range included)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.forwarded: list[bytes | None] = []

    async def forward(self, request, target) -> None:
        self.forwarded.append(request.getHeader(b"range"))
        first, last = map(int, request.getHeader(b"range").decode().removeprefix("bytes=").split("-"))
        request.setResponseCode(206)
        request.write(self.body[first : last + 1])
        request.finish()


def cached(store: Store, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with store.writer(digest) as writer:
        writer.write(data)
        writer.commit()
    return digest


def damage(store: Store, digest: str, offset: int) -> None:
    with open(store.blob_path(digest), "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x80]))


def serve(chain: ContentChain, disk: ManualDisk, request, target: Target) -> None:
    served = defer.ensureDeferred(chain.serve(request, target))
    disk.drain(1000)
    assert served.called and served.result is None


def test_a_damaged_cached_blob_is_cut_before_its_last_bytes_dropped_and_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "VERIFY_BEFORE_SERVING", 2**20)  # a big blob: hashed as it streams
    data = os.urandom(3 * 2**20 + 5)
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        digest = cached(store, data)
        damage(store, digest, len(data) - 2)  # in the last bytes: everything before them is sent
        disk = ManualDisk(store)
        chain = granted_chain(disk, OneBlobUpstream(data), digest)
        first = FakeRequest()
        serve(chain, disk, first, blob_target(digest))
        assert first.channel.transport.aborted and not first.finished
        assert len(first.body) < len(data) and digest not in store and chain.stats.damaged_entries == 1

        again = FakeRequest()
        serve(chain, disk, again, blob_target(digest))
        assert again.finished and again.body == data and again.source == "upstream"
        assert store.open_blob(digest).verified  # the new copy was hashed as it was written


def test_a_small_damaged_cached_blob_is_replaced_before_a_byte_is_sent(tmp_path):
    data = os.urandom(2**20)
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        digest = cached(store, data)
        damage(store, digest, 5)
        disk = ManualDisk(store)
        chain = granted_chain(disk, OneBlobUpstream(data), digest)
        request = FakeRequest()
        serve(chain, disk, request, blob_target(digest))
        assert request.finished and request.body == data and request.source == "upstream"
        assert not request.channel.transport.aborted and chain.stats.damaged_entries == 1


def test_a_range_of_a_damaged_cached_blob_is_answered_with_the_right_bytes(tmp_path):
    data = os.urandom(2 * 2**20)
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        digest = cached(store, data)
        damage(store, digest, 1000)
        disk = ManualDisk(store)
        chain = granted_chain(disk, OneBlobUpstream(data), digest)
        request = range_request(900, 1100)
        serve(chain, disk, request, blob_target(digest))
        # the whole copy is checked before any range of it is served: the range comes from a new fill
        assert request.code == 206 and request.finished and request.body == data[900:1101]
        assert request.source == "upstream" and chain.stats.damaged_entries == 1
        assert store.open_blob(digest).verified


def test_a_cached_blob_found_at_start_is_hashed_once_and_then_served_without_hashing(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "VERIFY_BEFORE_SERVING", 2**20)
    data = os.urandom(2**20 + 7)
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        digest = cached(store, data)
        reader = store.open_blob(digest)
        assert reader.verified  # hashed as it was written
        reader.close()
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        disk = ManualDisk(store)
        chain = granted_chain(disk, OneBlobUpstream(b"unused"), digest)
        calls: list[str] = []
        run = disk.run
        disk.run = lambda function, *a, **k: (
            calls.append(getattr(function, "__name__", "")) or run(function, *a, **k)
        )
        for _ in range(2):
            request = FakeRequest()
            serve(chain, disk, request, blob_target(digest))
            assert request.finished and request.body == data and request.source == "cache"
        first, second = calls[: len(calls) // 2], calls[len(calls) // 2 :]
        assert "_read_hashed" in first and "_read_hashed" not in second
        request = range_request(5, 10)
        serve(chain, disk, request, blob_target(digest))
        assert request.body == data[5:11] and "verify_reader" not in calls  # remembered as intact


def test_a_damaged_cached_manifest_is_fetched_again_before_a_byte_is_sent(tmp_path):
    manifest = (
        b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}'
    )
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        digest = cached(store, manifest)
        damage(store, digest, 10)
        disk = ManualDisk(store)
        chain = granted_chain(disk, OneBlobUpstream(manifest), digest)
        target = registry_target(f"/v2/team/app/manifests/{digest}", host=ECR)
        request = FakeRequest()
        serve(chain, disk, request, target)
        assert request.finished and request.body == manifest and request.source == "upstream"
        assert not request.channel.transport.aborted and chain.stats.damaged_entries == 1
        assert store.open_blob(digest).verified


def failing_disk(monkeypatch, errno_: int) -> None:
    """Every cache write fails as a full, read-only or failing disk makes it fail."""
    from dnsmirror.store import Writer

    def fail(self, view):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(Writer, "_write_all", fail)


def test_a_disk_failing_mid_fill_does_not_cut_the_client_and_later_fills_stay_off_it(tmp_path, monkeypatch):
    import errno

    for errno_ in (errno.ENOSPC, errno.EIO):
        data = os.urandom(2 * 2**20 + 1)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with Store.open(tmp_path / f"cache-{errno_}", 64 * 2**20) as store:
            failing_disk(monkeypatch, errno_)
            disk = ManualDisk(store)
            chain = granted_chain(disk, OneBlobUpstream(data), digest, passthrough=RecordingPassThrough(data))
            request = FakeRequest()
            serve(chain, disk, request, blob_target(digest))
            assert not request.channel.transport.aborted
            assert request.finished and request.body == data and digest not in store
            assert os.listdir(tmp_path / f"cache-{errno_}" / "tmp") == []
            assert chain.caching_paused()  # later fills know
            # while it stays off the disk, a range is answered by upstream itself, not ignored
            ranged = range_request(10, 20)
            serve(chain, disk, ranged, blob_target(digest))
            assert ranged.code == 206 and ranged.body == data[10:21]
            assert chain.passthrough.forwarded == [b"bytes=10-20"]
            monkeypatch.undo()


def test_a_blob_larger_than_the_free_space_streams_uncached_and_a_range_of_it_goes_upstream(
    tmp_path, monkeypatch
):
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        monkeypatch.setattr(store, "free_space", lambda: 100_000)
        disk = ManualDisk(store)
        chain = granted_chain(disk, OneBlobUpstream(data), digest, passthrough=RecordingPassThrough(data))
        request = FakeRequest()
        serve(chain, disk, request, blob_target(digest))
        assert request.finished and request.body == data and request.source == "relay" and digest not in store
        ranged = range_request(0, 99)
        serve(chain, disk, ranged, blob_target(digest))
        assert (
            ranged.code == 206
            and ranged.body == data[:100]
            and chain.passthrough.forwarded == [b"bytes=0-99"]
        )


class _StagedResponse(_Response):
    """A 200 whose body the test feeds by hand."""

    def deliver_body(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(None)


class StagedThenWholeUpstream:
    """The first GET's body is fed by the test; later GETs get the whole body at once."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.first: _StagedResponse | None = None

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        if self.first is None:
            self.first = _StagedResponse(self.body)
            return defer.succeed(self.first)
        return defer.succeed(_Response(self.body))


def test_a_reader_joining_just_as_the_disk_fails_under_the_fill_is_served_from_upstream(
    tmp_path, monkeypatch, one_mib_blocks
):
    import errno

    data = os.urandom(3 * 2**20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with Store.open(tmp_path / "cache", 64 * 2**20) as store:
        disk = ManualDisk(store)
        upstream = StagedThenWholeUpstream(data)
        chain = granted_chain(disk, upstream, digest)
        first = FakeRequest()
        first_served = defer.ensureDeferred(chain.serve(first, blob_target(digest)))
        disk.step("writer")
        disk.step("open")
        body = upstream.first.protocol
        body.dataReceived(data[: 2**21])
        failing_disk(monkeypatch, errno.ENOSPC)
        # the disk fails in the thread (the first block's write, seen when the second goes out); the reactor
        # hears later
        wrote = disk.run_quietly("_write_chunks")
        assert chain.slots[digest].fill.writer.failure is not None and not chain.slots[digest].fill.uncached
        joiner = FakeRequest()
        joined = defer.ensureDeferred(chain.serve(joiner, blob_target(digest)))
        disk.step("open")  # the temp file is gone already
        disk.drain()
        assert joined.called and joiner.finished and joiner.body == data and joiner.source == "relay"
        wrote.callback(None)
        body.dataReceived(data[2**21 :])
        body.connectionLost(Failure(ResponseDone()))
        disk.drain()
        assert first_served.called and first.finished and first.body == data
        assert not first.channel.transport.aborted and digest not in store
