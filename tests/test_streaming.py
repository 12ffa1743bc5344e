"""Fills, blob streaming and verified relays, with a real store and in-memory requests."""

from __future__ import annotations

import hashlib
import os

import pytest
from fakes import FakeRequest, FakeTransport, InlineDisk, ManualDisk
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dnsmirror.bulk import PLAIN_BUFFER
from dnsmirror.store import DigestMismatch, Store
from dnsmirror.streaming import (
    READ_CHUNK,
    READER_LAG_HIGH,
    READER_LAG_LOW,
    READER_STALL,
    RECENT_WINDOW,
    BlobStreamer,
    Fill,
    VerifiedRelay,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# these tests count a writer's blocks in MiB (where a disk fails, what is in the file when)
pytestmark = pytest.mark.usefixtures("one_mib_blocks")


@pytest.fixture(params=[True, False], ids=["direct", "buffered"])
def store(tmp_path, request):
    # readers of a growing fill read its temp file whether the writer bypasses the page cache or not
    with Store.open(tmp_path / "cache", 10 * 2**20, direct_writes=request.param) as opened:
        yield opened


def start_fill(store, data: bytes, digest: str | None = None):
    digest = digest or sha(data)
    disk = InlineDisk(store)
    fill = Fill(
        disk, store.writer(digest, expected_size=len(data)), digest, len(data), "application/octet-stream"
    )
    protocol = fill.body_protocol()
    transport = FakeTransport()
    protocol.makeConnection(transport)
    return disk, fill, protocol, transport


def test_fill_commits_verified_content_and_holds_back_the_last_byte(store):
    data = os.urandom(300_000)
    disk, fill, protocol, _ = start_fill(store, data)
    protocol.dataReceived(data[:100_000])
    assert fill.received == 100_000 and fill.readable() == 99_999 and not fill.verified
    protocol.dataReceived(data[100_000:])
    assert fill.readable() == len(data) - 1
    protocol.connectionLost(Failure(ResponseDone()))
    assert fill.verified and fill.readable() == len(data)
    with store.open_blob(sha(data)) as reader:
        assert reader.read() == data


def test_fill_with_wrong_bytes_fails_and_keeps_nothing(store, tmp_path):
    data = os.urandom(50_000)
    disk, fill, protocol, _ = start_fill(store, data, digest=sha(b"something else"))
    waited = fill.wait()
    outcome = []
    fill.done.addBoth(outcome.append)
    protocol.dataReceived(data)
    protocol.connectionLost(Failure(ResponseDone()))
    assert fill.failure is not None and not fill.verified
    assert waited.called
    assert sha(b"something else") not in store
    assert not any((tmp_path / "cache" / "tmp").iterdir())
    assert isinstance(outcome[0], Failure) and isinstance(outcome[0].value.__cause__, DigestMismatch)


def test_fill_cut_short_fails(store):
    data = os.urandom(10_000)
    _, fill, protocol, transport = start_fill(store, data)
    protocol.dataReceived(data[:5000])
    protocol.connectionLost(Failure(ResponseDone()))
    assert fill.failure is not None and "5000 of 10000" in str(fill.failure)


def stream(disk, request, fill, data_len, start=0, end=None):
    fd = os.open(fill.temp_path, os.O_RDONLY)
    streamer = BlobStreamer(disk, request, fd, start, end, fill=fill, on_close=lambda: os.close(fd))
    return streamer, streamer.start()


def test_waiters_stream_a_growing_fill_and_only_finish_after_verification(store):
    data = os.urandom(3 * 1024 * 1024 + 17)
    disk, fill, protocol, _ = start_fill(store, data)
    protocol.dataReceived(data[:1000])
    whole, partial = FakeRequest(), FakeRequest()
    _, whole_done = stream(disk, whole, fill, len(data))
    _, partial_done = stream(disk, partial, fill, len(data), start=500, end=2 * 1024 * 1024)
    # the newest piece waits for the next one (or verification) and is then sent whole: its last byte
    # would otherwise be the last received, which waits for verification
    assert whole.body == b""
    protocol.dataReceived(data[1000:])
    # a piece as large as the readers' pacing window is not held back: all but its last byte goes now
    assert whole.written[0] == data[:1000] and whole.body == data[:-1]
    # a range's last byte waits for verification too: no complete response of unverified bytes
    assert not partial.finished and partial.body == data[500:2 * 1024 * 1024 - 1]
    assert not whole.finished and whole.body == data[:-1]
    protocol.connectionLost(Failure(ResponseDone()))
    assert partial.finished and partial.body == data[500:2 * 1024 * 1024]
    assert whole.finished and whole.body == data
    assert whole_done.result is True and partial_done.result is True


@pytest.mark.parametrize("sizes", [(300_000, 260_000, 1, 200_000),
                                   # socket reads of 1 MiB: a piece may be a little over (a record left over)
                                   (1_047_000, 1_060_000, 1_048_576, 1, 1_048_576, 200_000)])
def test_a_reader_keeping_up_sends_each_received_piece_itself_not_a_copy(store, sizes):
    # a socket read's piece, even with a record left over from the read before, is below the window: it waits
    assert PLAIN_BUFFER < READER_LAG_LOW < READER_LAG_HIGH <= RECENT_WINDOW
    pieces = [os.urandom(size) for size in sizes]
    data = b"".join(pieces)
    disk, fill, protocol, _ = start_fill(store, data)
    request = FakeRequest()
    stream(disk, request, fill, len(data))
    for piece in pieces:
        protocol.dataReceived(piece)
    protocol.connectionLost(Failure(ResponseDone()))
    assert request.finished and request.body == data
    assert [id(sent) for sent in request.written] == [id(piece) for piece in pieces]


def test_waiters_are_aborted_when_the_digest_does_not_match(store):
    data = os.urandom(100_000)
    disk, fill, protocol, _ = start_fill(store, data, digest=sha(b"other"))
    request = FakeRequest()
    _, done = stream(disk, request, fill, len(data))
    protocol.dataReceived(data)
    protocol.connectionLost(Failure(ResponseDone()))
    assert request.transport.aborted and not request.finished
    assert len(request.body) < len(data)
    assert done.result is False


def test_a_paused_client_pauses_reads_and_a_leaving_client_does_not_stop_the_fill(store):
    data = os.urandom(4 * 1024 * 1024)
    disk, fill, protocol, _ = start_fill(store, data)
    slow, leaving = FakeRequest(), FakeRequest()
    slow_streamer, _ = stream(disk, slow, fill, len(data))
    leaving_streamer, left = stream(disk, leaving, fill, len(data))
    slow_streamer.pauseProducing()
    protocol.dataReceived(data[:2 * 1024 * 1024])
    assert slow.body == b"" and len(leaving.body) == 2 * 1024 * 1024 - 1
    leaving._finish.errback(Failure(ConnectionError("client went away")))
    assert left.result is False
    protocol.dataReceived(data[2 * 1024 * 1024:])
    protocol.connectionLost(Failure(ResponseDone()))
    assert fill.verified
    slow_streamer.resumeProducing()
    assert slow.finished and slow.body == data


def test_fill_pauses_upstream_while_the_disk_lags():
    class SlowDisk(InlineDisk):
        def __init__(self, store):
            super().__init__(store)
            self.pending = []

        def run(self, function, *args, **kwargs):
            d = defer.Deferred()
            self.pending.append((d, function, args, kwargs))
            return d

        def drain(self):
            while self.pending:
                d, function, args, kwargs = self.pending.pop(0)
                d.callback(function(*args, **kwargs))

    import tempfile

    with tempfile.TemporaryDirectory() as tmp, Store.open(tmp, 100 * 2**20) as store:
        data = os.urandom(20 * 1024 * 1024)
        disk = SlowDisk(store)
        fill = Fill(disk, store.writer(sha(data), expected_size=len(data)), sha(data), len(data), None)
        protocol = fill.body_protocol()
        transport = FakeTransport()
        protocol.makeConnection(transport)
        for offset in range(0, len(data), 1024 * 1024):
            protocol.dataReceived(data[offset:offset + 1024 * 1024])
        assert transport.paused == 1  # 8 MiB waiting for the disk
        disk.drain()
        assert transport.resumed == 1
        protocol.connectionLost(Failure(ResponseDone()))
        disk.drain()
        assert fill.verified


@pytest.mark.parametrize("good", [True, False])
def test_verified_relay_holds_back_the_last_chunk(good):
    data = [b"a" * 1000, b"b" * 1000, b"c" * 10]
    request = FakeRequest()
    relay = VerifiedRelay(request, sha(b"".join(data)) if good else sha(b"nope"))
    relay.makeConnection(FakeTransport())
    for chunk in data:
        relay.dataReceived(chunk)
    assert request.body == b"".join(data[:2])
    relay.connectionLost(Failure(ResponseDone()))
    if good:
        assert request.finished and request.body == b"".join(data)
    else:
        assert request.transport.aborted and not request.finished and request.body == b"".join(data[:2])
    assert relay.done.result is good


def test_readers_keeping_up_are_served_from_memory_and_laggards_from_disk(store, monkeypatch):
    import dnsmirror.streaming as streaming

    monkeypatch.setattr(streaming, "RECENT_WINDOW", 1536 * 1024)
    data = os.urandom(4 * 1024 * 1024)
    disk, fill, protocol, _, reads = paced_fill(store, data)
    live = FakeRequest()
    stream(disk, live, fill, len(data))
    for offset in range(0, len(data), 64 * 1024):
        protocol.dataReceived(data[offset:offset + 64 * 1024])
    # never read back from disk; the newest piece waits for verification to be sent whole
    assert live.body == data[:-64 * 1024] and reads == []
    assert fill.from_memory(0, 10) is None  # the oldest bytes left memory once on disk
    assert fill.from_memory(len(data) - 100, 1000) == data[-100:]
    late = FakeRequest()
    stream(disk, late, fill, len(data))
    assert late.body == data[:-64 * 1024] and reads  # a late reader reads the start from disk
    protocol.connectionLost(Failure(ResponseDone()))
    assert live.finished and late.finished and live.body == late.body == data


def test_the_last_byte_is_released_once_verified_before_the_last_write_and_the_durable_commit(store):
    class CommitLater(InlineDisk):
        held = None

        def run(self, function, *args, **kwargs):
            if getattr(function, "__name__", "") == "_write_and_commit":
                self.held = (function, args, kwargs)
                return defer.Deferred()
            return super().run(function, *args, **kwargs)

    data = os.urandom(200_000)
    disk = CommitLater(store)
    fill = Fill(disk, store.writer(sha(data), expected_size=len(data)), sha(data), len(data), None)
    protocol = fill.body_protocol()
    protocol.makeConnection(FakeTransport())
    request = FakeRequest()
    fd = os.open(fill.temp_path, os.O_RDONLY)
    BlobStreamer(disk, request, fd, 0, None, fill=fill, on_close=lambda: os.close(fd)).start()
    outcome = []
    fill.done.addBoth(outcome.append)
    protocol.dataReceived(data)
    protocol.connectionLost(Failure(ResponseDone()))
    assert request.finished and request.body == data  # verified: served in full, from memory
    # the last batch (here the whole body), fsync and rename still to come
    assert disk.held is not None and fill.written == 0 and outcome == [] and sha(data) not in store
    function, args, kwargs = disk.held
    fill._committed(function(*args, **kwargs))
    assert outcome and sha(data) in store and fill.written == len(data)


def paced_fill(store, data):
    """A fill of ``data`` on a disk that records its ``pread`` calls, fed by a fake upstream."""
    reads = []

    class CountingDisk(InlineDisk):
        def run(self, function, *args, **kwargs):
            if function is os.pread:
                reads.append(args[1:])
            return super().run(function, *args, **kwargs)

    disk = CountingDisk(store)
    fill = Fill(disk, store.writer(sha(data), expected_size=len(data)), sha(data), len(data), None)
    protocol = fill.body_protocol()
    upstream = FakeTransport()
    protocol.makeConnection(upstream)
    return disk, fill, protocol, upstream, reads


def feed(protocol, data, start, end, step=64 * 1024):
    for offset in range(start, end, step):
        protocol.dataReceived(data[offset:min(end, offset + step)])


def test_the_fill_waits_for_its_fastest_reader_which_stays_in_memory(store):
    data = os.urandom(9 * 1024 * 1024)
    disk, fill, protocol, upstream, reads = paced_fill(store, data)
    request = FakeRequest()
    streamer, done = stream(disk, request, fill, len(data))
    streamer.pauseProducing()  # the client's socket is full
    feed(protocol, data, 0, READER_LAG_HIGH + 64 * 1024)
    assert upstream.paused == 1 and upstream.resumed == 0
    streamer.resumeProducing()  # the client drains: the fill goes on
    assert upstream.resumed == 1
    feed(protocol, data, READER_LAG_HIGH + 64 * 1024, len(data))
    protocol.connectionLost(Failure(ResponseDone()))
    assert request.finished and request.body == data and done.result is True
    # the paced reader never fell back to the disk, not even for the byte held back until verification
    assert reads == []


def held_by_a_paused_reader(store):
    """A fill of 8 MiB whose only reader stopped taking bytes: upstream is paused for it."""
    data = os.urandom(8 * 1024 * 1024)
    disk, fill, protocol, upstream, _ = paced_fill(store, data)
    request = FakeRequest()
    streamer, done = stream(disk, request, fill, len(data))
    streamer.pauseProducing()
    feed(protocol, data, 0, READER_LAG_HIGH)
    assert upstream.paused == 1
    return data, disk, fill, protocol, upstream, request, streamer, done


def test_a_stalled_reader_stops_holding_the_fill_back(store):
    data, disk, fill, protocol, upstream, stalled, streamer, _ = held_by_a_paused_reader(store)
    disk.reactor.advance(READER_STALL - 1)
    assert upstream.resumed == 0  # still waiting for the client
    disk.reactor.advance(1)
    assert upstream.resumed == 1  # upstream must not idle out for a stuck client
    feed(protocol, data, READER_LAG_HIGH, len(data))
    assert upstream.paused == 1  # and the fill no longer waits for it
    protocol.connectionLost(Failure(ResponseDone()))
    assert fill.verified
    streamer.resumeProducing()
    assert stalled.finished and stalled.body == data


def test_the_last_reader_leaving_releases_the_fill_and_no_reader_means_no_pacing(store):
    data, _, fill, protocol, upstream, leaving, _, left = held_by_a_paused_reader(store)
    leaving._finish.errback(Failure(ConnectionError("client went away")))
    assert left.result is False and upstream.resumed == 1
    feed(protocol, data, READER_LAG_HIGH, len(data))  # nobody reads: upstream's pace
    assert upstream.paused == 1
    protocol.connectionLost(Failure(ResponseDone()))
    assert fill.verified and fill.done.called


def test_a_short_range_waiting_for_verification_does_not_hold_the_fill(store):
    data = os.urandom(4 * 1024 * 1024)
    disk, fill, protocol, upstream, _ = paced_fill(store, data)
    first_byte = FakeRequest()
    _, done = stream(disk, first_byte, fill, len(data), start=0, end=1)
    feed(protocol, data, 0, READER_LAG_HIGH + 256 * 1024)
    assert upstream.paused == 0 and first_byte.body == b""  # its only byte waits for the digest
    feed(protocol, data, READER_LAG_HIGH + 256 * 1024, len(data))
    protocol.connectionLost(Failure(ResponseDone()))
    assert first_byte.finished and first_byte.body == data[:1] and done.result is True


def test_a_body_that_ends_while_readers_hold_it_leaves_no_timer(store):
    data, disk, fill, protocol, upstream, request, streamer, done = held_by_a_paused_reader(store)
    assert disk.reactor.getDelayedCalls()  # the stall check is armed while upstream waits
    feed(protocol, data, READER_LAG_HIGH, len(data))  # what was already in flight still arrives
    protocol.connectionLost(Failure(ResponseDone()))
    assert fill.verified and disk.reactor.getDelayedCalls() == []
    assert upstream.resumed == 0  # nothing to resume once the body is over
    streamer.resumeProducing()
    assert request.finished and request.body == data and done.result is True


def test_a_client_gone_before_its_stream_starts_releases_the_descriptor(store):
    data = os.urandom(10_000)
    disk, fill, protocol, _ = start_fill(store, data)
    protocol.dataReceived(data[:5000])
    request = FakeRequest()
    request.channel = None  # twisted.web drops the channel when the connection is lost
    closed = []
    fd = os.open(fill.temp_path, os.O_RDONLY)
    streamer = BlobStreamer(
        disk, request, fd, 0, None, fill=fill, on_close=lambda: closed.append(os.close(fd))
    )
    done = streamer.start()
    assert done.called and done.result is False
    assert closed and request.written == [] and request.producer is None
    assert streamer not in fill._readers  # it holds the fill back for nobody


# --- a disk that fails under a fill ---------------------------------------------------------------------


def feed_while_flowing(protocol, upstream, data, start, end, step=64 * 1024) -> int:
    """Feed like a socket does: nothing while paused. Returns where it stopped."""
    offset = start
    while offset < end and upstream.paused == upstream.resumed:
        protocol.dataReceived(data[offset:min(end, offset + step)])
        offset = min(end, offset + step)
    return offset


@pytest.fixture
def roomy(tmp_path):
    with Store.open(tmp_path / "roomy", 256 * 2**20) as opened:
        yield opened


def disk_fails_after(monkeypatch, blocks: int, errno_: int = 28) -> None:
    """Cache writes succeed for ``blocks`` staged blocks, then fail as a full (or failing) disk makes them."""
    from dnsmirror.store import Writer

    real = Writer._write_all
    left = [blocks]

    def write_all(self, view):
        if left[0] <= 0:
            raise OSError(errno_, os.strerror(errno_))
        left[0] -= 1
        return real(self, view)

    monkeypatch.setattr(Writer, "_write_all", write_all)


def test_a_fill_whose_disk_fails_streams_on_from_memory_to_every_reader(roomy, monkeypatch):
    store = roomy
    from dnsmirror.store import StoreFull
    from dnsmirror.streaming import UNCACHED_HIGH_WATER

    disk_fails_after(monkeypatch, blocks=3)
    data = os.urandom(40 * 1024 * 1024)
    disk, fill, protocol, upstream, _ = paced_fill(store, data)
    causes = []
    fill.done.addErrback(lambda failure: causes.append(failure.value.__cause__))
    fast, slow, ranged = FakeRequest(), FakeRequest(), FakeRequest()
    stream(disk, fast, fill, len(data))
    slow_streamer, _ = stream(disk, slow, fill, len(data))
    stream(disk, ranged, fill, len(data), start=2 * 1024 * 1024, end=5 * 1024 * 1024)
    slow_streamer.pauseProducing()
    feed(protocol, data, 0, 6 * 1024 * 1024)
    assert fill.uncached and fill.written == 3 * 1024 * 1024 and os.listdir(store.root / "tmp") == []
    disk.reactor.advance(READER_STALL)  # the paused reader no longer paces the fill...
    stopped = feed_while_flowing(protocol, upstream, data, 6 * 1024 * 1024, len(data))
    # ...but memory keeps what it has not sent, up to a bound: then upstream waits for it
    assert stopped < len(data) and upstream.paused > upstream.resumed
    assert UNCACHED_HIGH_WATER <= fill._recent_bytes <= UNCACHED_HIGH_WATER + 3 * 1024 * 1024
    slow_streamer.resumeProducing()
    assert upstream.paused == upstream.resumed
    feed(protocol, data, stopped, len(data))
    protocol.connectionLost(Failure(ResponseDone()))
    assert fast.finished and fast.body == data and not fast.transport.aborted
    assert slow.finished and slow.body == data
    assert ranged.finished and ranged.body == data[2 * 1024 * 1024:5 * 1024 * 1024]
    assert len(causes) == 1 and isinstance(causes[0], StoreFull) and sha(data) not in store


def test_a_fill_whose_disk_failed_still_cuts_its_readers_on_a_wrong_digest(store, monkeypatch):
    disk_fails_after(monkeypatch, blocks=1, errno_=5)
    data = os.urandom(3 * 1024 * 1024)
    disk, fill, protocol, _ = start_fill(store, data, digest=sha(b"other"))
    request = FakeRequest()
    _, done = stream(disk, request, fill, len(data))
    feed(protocol, data, 0, len(data))
    assert fill.uncached
    protocol.connectionLost(Failure(ResponseDone()))
    assert request.transport.aborted and not request.finished and done.result is False


def test_a_reader_that_stalls_a_fill_without_a_disk_is_cut_and_the_others_go_on(roomy, monkeypatch):
    store = roomy
    disk_fails_after(monkeypatch, blocks=0)
    data = os.urandom(30 * 1024 * 1024)
    disk, fill, protocol, upstream, _ = paced_fill(store, data)
    fast, stuck = FakeRequest(), FakeRequest()
    stream(disk, fast, fill, len(data))
    stuck_streamer, stuck_done = stream(disk, stuck, fill, len(data))
    stuck_streamer.pauseProducing()
    feed(protocol, data, 0, 4 * 1024 * 1024)
    disk.reactor.advance(READER_STALL)  # pacing gives up on it
    stopped = feed_while_flowing(protocol, upstream, data, 4 * 1024 * 1024, len(data))
    assert stopped < len(data) and upstream.paused > upstream.resumed  # memory holds what it has not taken
    disk.reactor.advance(READER_STALL)
    # it would hold every other reader (and upstream, which would time out) for ever: it is cut
    assert stuck.transport.aborted and stuck_done.result is False
    assert upstream.paused == upstream.resumed and fill._recent_bytes < 4 * 1024 * 1024
    feed(protocol, data, stopped, len(data))
    protocol.connectionLost(Failure(ResponseDone()))
    assert fast.finished and fast.body == data
    fill.done.addErrback(lambda _: None)


def test_each_reader_that_stalls_a_fill_without_a_disk_is_cut_in_turn(roomy, monkeypatch):
    store = roomy
    disk_fails_after(monkeypatch, blocks=0)
    data = os.urandom(30 * 1024 * 1024)
    disk, fill, protocol, upstream, _ = paced_fill(store, data)
    fast, first, second = FakeRequest(), FakeRequest(), FakeRequest()
    stream(disk, fast, fill, len(data))
    first_streamer, first_done = stream(disk, first, fill, len(data))
    second_streamer, second_done = stream(disk, second, fill, len(data))
    first_streamer.pauseProducing()
    feed(protocol, data, 0, 4 * 1024 * 1024)
    second_streamer.pauseProducing()  # stalls too, 4 MiB further on
    disk.reactor.advance(READER_STALL)
    stopped = feed_while_flowing(protocol, upstream, data, 4 * 1024 * 1024, len(data))
    assert stopped < len(data) and upstream.paused > upstream.resumed
    disk.reactor.advance(READER_STALL)
    assert first.transport.aborted and first_done.result is False
    # what the second one has not taken still fills memory: upstream waits for it, but not for ever
    assert upstream.paused > upstream.resumed and not second.transport.aborted
    disk.reactor.advance(READER_STALL)
    assert second.transport.aborted and second_done.result is False
    assert upstream.paused == upstream.resumed
    feed(protocol, data, stopped, len(data))
    protocol.connectionLost(Failure(ResponseDone()))
    assert fast.finished and fast.body == data
    fill.done.addErrback(lambda _: None)


def test_a_fill_whose_disk_failed_stops_when_its_last_reader_leaves(store, monkeypatch):
    disk_fails_after(monkeypatch, blocks=0)
    data = os.urandom(3 * 1024 * 1024)
    disk, fill, protocol, upstream = start_fill(store, data)
    request = FakeRequest()
    _, done = stream(disk, request, fill, len(data))
    feed(protocol, data, 0, 2 * 1024 * 1024)
    assert fill.uncached and not fill.can_serve(0)  # a newcomer would need bytes no longer kept
    request._finish.errback(Failure(ConnectionError("client went away")))
    assert done.result is False and fill.failure is not None and upstream.stopped
    assert fill._recent_bytes == 0
    fill.done.addErrback(lambda _: None)


def test_a_fill_whose_disk_fails_with_no_reader_stops_at_once(store, monkeypatch):
    disk_fails_after(monkeypatch, blocks=1)
    data = os.urandom(4 * 1024 * 1024)
    disk, fill, protocol, upstream = start_fill(store, data)  # its client left before the disk failed
    feed(protocol, data, 0, 3 * 1024 * 1024)
    assert fill.uncached and fill.failure is not None and upstream.stopped
    assert fill._recent_bytes == 0 and os.listdir(store.root / "tmp") == []
    fill.done.addErrback(lambda _: None)


def test_a_whole_cached_blob_is_hashed_as_it_streams_and_its_last_bytes_wait_for_the_digest(store):
    data = os.urandom(3 * 1024 * 1024 + 3)
    digest = sha(data)
    with store.writer(digest) as writer:
        writer.write(data)
        writer.commit()
    for damaged in (False, True):
        if damaged:
            with open(store.blob_path(digest), "r+b") as file:
                file.seek(len(data) - 1)
                file.write(b"\0" if data[-1] else b"\1")
        reader = store.open_blob(digest)
        request = FakeRequest()
        outcome = []
        streamer = BlobStreamer(InlineDisk(store), request, reader.file.fileno(), 0, len(data),
                                on_close=reader.close, verify=digest.split(":")[1],
                                on_damaged=lambda seen=outcome: seen.append("damaged"),
                                on_intact=lambda seen=outcome: seen.append("ok"))
        done = streamer.start()
        if damaged:
            assert outcome == ["damaged"] and request.transport.aborted and not request.finished
            assert request.body == data[:3 * 1024 * 1024]  # the last read (3 bytes) was never sent
            assert done.result is False
        else:
            assert outcome == ["ok"] and request.finished and request.body == data and done.result is True
    with pytest.raises(ValueError):
        BlobStreamer(InlineDisk(store), FakeRequest(), 0, 10, len(data), verify="00")


def test_a_fill_paces_on_the_clock_it_is_given_not_the_disk_pools(store):
    data = os.urandom(8 * 1024 * 1024)
    disk, clock = InlineDisk(store), task.Clock()
    writer = store.writer(sha(data), expected_size=len(data))
    fill = Fill(disk, writer, sha(data), len(data), None, clock=clock)
    protocol = fill.body_protocol()
    upstream = FakeTransport()
    protocol.makeConnection(upstream)
    streamer, _ = stream(disk, FakeRequest(), fill, len(data))
    streamer.pauseProducing()
    feed(protocol, data, 0, READER_LAG_HIGH)
    assert upstream.paused == 1
    disk.reactor.advance(READER_STALL)
    assert upstream.resumed == 0  # the disk pool's clock is not the fill's
    clock.advance(READER_STALL)
    assert upstream.resumed == 1


def committed(store, data: bytes) -> int:
    digest = sha(data)
    with store.writer(digest, expected_size=len(data)) as writer:
        writer.write(data)
        writer.commit()
    return os.open(store.blob_path(digest), os.O_RDONLY)


def full_client_streamer(store, fd: int, size: int, **options):
    """(disk, request, streamer, closed) for a BlobStreamer of ``fd`` on a ManualDisk to a client whose
    connection is full after every write, as a fast sender's socket buffer is; ``closed`` gets an entry when
    the streamer closes the descriptor."""
    disk = ManualDisk(store)
    request = FakeRequest()
    closed: list[None] = []
    streamer = BlobStreamer(disk, request, fd, 0, size, on_close=lambda: closed.append(os.close(fd)),
                            **options)
    request.write = lambda chunk: (request.written.append(chunk), streamer.pauseProducing())
    return disk, request, streamer, closed


def test_a_cached_file_is_read_ahead_while_the_client_drains_and_arrives_in_order(store):
    data = os.urandom(3 * READ_CHUNK + 5)
    disk, request, streamer, closed = full_client_streamer(store, committed(store, data), len(data))
    done = streamer.start()
    disk.step("pread")
    assert request.body == data[:READ_CHUNK]
    # paused, yet the next piece is being read already
    disk.step("pread")
    assert request.body == data[:READ_CHUNK] and disk.queue == []  # one piece ahead, no more
    streamer.resumeProducing()
    assert request.body == data[:2 * READ_CHUNK]
    disk.step("pread")
    streamer.resumeProducing()
    disk.step("pread")
    streamer.resumeProducing()
    assert request.body == data and not done.called  # finished once the last write has drained
    streamer.resumeProducing()
    assert done.result is True and closed and request.finished


def test_a_client_that_leaves_while_a_piece_is_read_ahead_releases_the_descriptor_after_the_read(store):
    data = os.urandom(2 * READ_CHUNK)
    disk, request, streamer, closed = full_client_streamer(store, committed(store, data), len(data))
    done = streamer.start()
    disk.step("pread")
    assert len(disk.queue) == 1  # the read ahead is in flight
    streamer.stopProducing()
    assert done.result is False and not closed  # its thread may still use the descriptor
    disk.step("pread")
    assert closed and request.body == data[:READ_CHUNK]


def test_a_damaged_cached_file_read_ahead_is_cut_before_its_last_piece(store):
    data = os.urandom(2 * READ_CHUNK)
    fd = committed(store, data)
    damage = os.open(store.blob_path(sha(data)), os.O_WRONLY)
    os.pwrite(damage, b"X", 10)
    os.close(damage)
    damaged = []
    disk, request, streamer, _ = full_client_streamer(store, fd, len(data), verify=sha(data).split(":", 1)[1],
                                                      on_damaged=lambda: damaged.append(True))
    done = streamer.start()
    disk.step("_read_hashed")
    disk.step("_read_hashed")  # read ahead: the last piece, whose digest is wrong
    assert damaged and request.transport.aborted and done.result is False
    assert request.body == data[:READ_CHUNK][:10] + b"X" + data[11:READ_CHUNK]


def test_an_unexpected_error_at_the_last_write_leaves_no_temp_file_and_readers_whole(store, monkeypatch):
    from dnsmirror.store import Writer

    data = os.urandom(9 * 1024 * 1024 + 1000)
    disk, fill, protocol, upstream, reads = paced_fill(store, data)
    real = Writer.write

    def write(self, chunk):
        if self.bytes_written + len(chunk) == len(data):  # the last batch, after the digest was checked
            raise RuntimeError("the last write broke")
        return real(self, chunk)

    monkeypatch.setattr(Writer, "write", write)
    causes = []
    fill.done.addErrback(lambda failure: causes.append(failure.value.__cause__))
    request = FakeRequest()
    stream(disk, request, fill, len(data))
    feed(protocol, data, 0, len(data))
    protocol.connectionLost(Failure(ResponseDone()))
    assert request.finished and request.body == data and not request.transport.aborted
    assert len(causes) == 1 and isinstance(causes[0], RuntimeError) and sha(data) not in store
    assert list(store._tmp_dir.iterdir()) == []  # the writer was aborted: no temp file is left


def test_a_disk_that_fails_at_the_last_write_still_gives_every_reader_the_whole_body(roomy, monkeypatch):
    # the digest is checked before the last batch is written: that write fails after the readers were released
    from dnsmirror.store import StoreFull

    store = roomy
    disk_fails_after(monkeypatch, blocks=9)
    data = os.urandom(9 * 1024 * 1024 + 1000)
    disk, fill, protocol, upstream, reads = paced_fill(store, data)
    causes = []
    fill.done.addErrback(lambda failure: causes.append(failure.value.__cause__))
    fast, slow = FakeRequest(), FakeRequest()
    stream(disk, fast, fill, len(data))
    slow_streamer, _ = stream(disk, slow, fill, len(data))
    slow_streamer.pauseProducing()  # far behind: what it needs first is on the disk only
    feed(protocol, data, 0, len(data))
    protocol.connectionLost(Failure(ResponseDone()))
    assert fast.finished and fast.body == data and not fast.transport.aborted
    assert len(causes) == 1 and isinstance(causes[0], StoreFull) and sha(data) not in store
    slow_streamer.resumeProducing()  # the start from the file it opened, the newest bytes from memory
    assert slow.finished and slow.body == data and not slow.transport.aborted and reads
