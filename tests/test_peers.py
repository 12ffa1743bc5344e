"""Peer sharing's pure parts and the peer listener, without a network (see test_peers_e2e for nodes)."""

from __future__ import annotations

import collections
import hashlib
import io
import os

import pytest
from fakes import ManualDisk
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from dnsmirror import config, failures, peers
from dnsmirror.config import HostPort
from dnsmirror.peers import (
    AUTH_HEADER,
    CLOCK_SKEW,
    HOLDERS_HEADER,
    PEER_BACKOFF,
    Holders,
    PeerResource,
    PeerSecretError,
    PeerSet,
    PeerStats,
    is_local_address,
    load_secret,
    rendezvous,
    sign,
    signature_valid,
)
from dnsmirror.store import Store

SECRET = b"0123456789abcdef-cluster-secret"
DIGEST = "sha256:" + "ab" * 32
NOW = 1_800_000_000.0


# --- signatures -----------------------------------------------------------------------------------------


def test_a_signature_is_valid_only_for_its_secret_method_digest_and_time() -> None:
    header = sign(SECRET, "GET", DIGEST, NOW)
    assert signature_valid(SECRET, header, "GET", DIGEST, NOW)
    assert signature_valid(SECRET, header, "GET", DIGEST, NOW + CLOCK_SKEW)
    assert not signature_valid(SECRET, header, "GET", DIGEST, NOW + CLOCK_SKEW + 1)
    assert not signature_valid(SECRET, header, "GET", DIGEST, NOW - CLOCK_SKEW - 1)
    assert not signature_valid(b"another-secret-of-the-same-size", header, "GET", DIGEST, NOW)
    assert not signature_valid(SECRET, header, "POST", DIGEST, NOW)
    assert not signature_valid(SECRET, header, "GET", "sha256:" + "cd" * 32, NOW)


@pytest.mark.parametrize("header", [None, b"", b"nonsense", b"12 ", b"\xff\xfe 00", b"1800000000", b"x y"])
def test_malformed_signatures_are_refused(header) -> None:
    assert not signature_valid(SECRET, header, "GET", DIGEST, NOW)


# --- rendezvous order -----------------------------------------------------------------------------------

PEERS = [HostPort(f"10.0.0.{n}", 5001) for n in range(1, 9)]


@given(st.permutations(PEERS), st.binary(min_size=1, max_size=8))
def test_every_node_computes_the_same_order(peers, seed) -> None:
    digest = "sha256:" + hashlib.sha256(seed).hexdigest()
    assert rendezvous(digest, peers) == rendezvous(digest, PEERS)


@given(st.sampled_from(PEERS), st.binary(min_size=1, max_size=8))
def test_removing_a_peer_keeps_the_order_of_the_others(removed, seed) -> None:
    digest = "sha256:" + hashlib.sha256(seed).hexdigest()
    full = rendezvous(digest, PEERS)
    assert rendezvous(digest, [p for p in PEERS if p != removed]) == [p for p in full if p != removed]


def test_first_choices_spread_over_the_peers() -> None:
    firsts = collections.Counter(rendezvous("sha256:" + hashlib.sha256(str(n).encode()).hexdigest(), PEERS)[0]
                                 for n in range(4000))
    assert set(firsts) == set(PEERS)
    assert all(350 < count < 650 for count in firsts.values()), firsts  # 500 each on average


# --- the secret file ------------------------------------------------------------------------------------


def test_the_secret_file_must_exist_be_private_and_long_enough(tmp_path) -> None:
    path = tmp_path / "secret"
    with pytest.raises(PeerSecretError, match="peers.secret_file: .* cannot be read"):
        load_secret(path)
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(PeerSecretError, match="at least 16"):
        load_secret(path)
    path.write_text("  a-long-enough-cluster-secret \n")
    path.chmod(0o644)
    with pytest.raises(PeerSecretError, match="group or others"):
        load_secret(path)
    path.chmod(0o400)
    assert load_secret(path) == b"a-long-enough-cluster-secret"


def test_peers_without_a_secret_file_are_a_config_error() -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.parse_document({"peers": {"static": ["10.0.0.5:5001"]}})
    assert [path for path, _ in raised.value.problems] == ["peers.secret_file"]
    with pytest.raises(config.ConfigError) as raised:
        config.parse_document({"peers": {"static": ["10.0.0.5:5002"], "secret_file": "/s"}})
    assert [path for path, _ in raised.value.problems] == ["peers.static[0]"]
    with pytest.raises(config.ConfigError) as raised:
        config.parse_document({"peers": {"lookup": 0, "timeout": "soon"}})
    assert sorted(path for path, _ in raised.value.problems) == ["peers.lookup", "peers.timeout"]
    built = config.parse_document(
        {
            "peers": {
                "dns_name": "dnsmirror-peers.kube-system.svc.cluster.local",
                "secret_file": "/etc/dnsmirror/peer-secret",
                "timeout": "500ms",
            }
        }
    )
    assert built.peers.enabled and built.peers.timeout == 0.5
    assert not config.parse_document({}).peers.enabled


# --- membership -----------------------------------------------------------------------------------------


def test_is_local_address() -> None:
    assert is_local_address("127.0.0.1")
    assert not is_local_address("192.0.2.1")  # documentation range: never configured
    assert not is_local_address("not-an-address")


def test_members_are_static_and_discovered_peers_without_this_node() -> None:
    clock = task.Clock()
    answers = [defer.succeed(["10.0.0.2", "10.0.0.3", "10.0.0.9"])]
    peers = PeerSet(clock, [HostPort("10.0.0.1", 5001), HostPort("10.0.0.2", 5001)], "peers.example", 5001,
                    resolve=lambda name: answers.pop(0), refresh=30,
                    is_local=lambda host: host == "10.0.0.9")
    peers.start()
    assert peers.members() == [
        HostPort("10.0.0.1", 5001),
        HostPort("10.0.0.2", 5001),
        HostPort("10.0.0.3", 5001),
    ]
    # a failed refresh keeps the peers known so far
    answers.append(defer.fail(OSError("timeout")))
    clock.advance(30)
    assert HostPort("10.0.0.3", 5001) in peers.members()
    peers.stop()


def test_a_failed_peer_is_skipped_for_a_while() -> None:
    clock = task.Clock()
    peers = PeerSet(clock, PEERS[:3], None, 5001, is_local=lambda host: False)
    peers.failed(PEERS[1])
    assert peers.healthy(PEERS[:3]) == [PEERS[0], PEERS[2]]
    clock.advance(PEER_BACKOFF + 1)
    assert peers.healthy(PEERS[:3]) == PEERS[:3]


def test_holders_expire_and_stay_bounded() -> None:
    holders = Holders(ttl=60, max_digests=2)
    holders.record("sha256:1", PEERS[0], 0)
    holders.record("sha256:1", PEERS[1], 10)
    assert holders.lookup("sha256:1", 30) == [PEERS[1], PEERS[0]]  # the newest announcement first
    assert holders.lookup("sha256:1", 65) == [PEERS[1]]
    holders.record("sha256:2", PEERS[0], 70)
    holders.record("sha256:3", PEERS[0], 70)
    assert len(holders) == 2 and holders.lookup("sha256:1", 70) == []
    for peer in PEERS:
        holders.record("sha256:3", peer, 80)
    assert len(holders.lookup("sha256:3", 80)) == 4


# --- the peer listener ----------------------------------------------------------------------------------


class PeerRequest(DummyRequest):
    """DummyRequest with a push-producer-friendly registerProducer."""

    def __init__(self, method: bytes, path: bytes, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(path.lstrip(b"/").split(b"/"))
        self.method = method
        self.path = path
        self.uri = path
        self.client = IPv4Address("TCP", "10.0.0.7", 40000)
        for name, value in (headers or {}).items():
            self.requestHeaders.setRawHeaders(name, [value])

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def render(resource: PeerResource, request: PeerRequest, disk: ManualDisk | None = None) -> bytes:
    result = resource.render(request)
    if result == server.NOT_DONE_YET:
        disk.drain()
        return b"".join(request.written)
    return result


@pytest.fixture
def listener(tmp_path):
    with Store.open(tmp_path / "cache", 10 * 2**20) as store:
        disk = ManualDisk(store)
        stats = PeerStats()
        holders = Holders()
        resource = PeerResource(disk.reactor, disk, SECRET, holders, stats, 5001, wall_clock=lambda: NOW)
        yield resource, disk, store, stats, holders


def signed(method: str, digest: str) -> dict[bytes, bytes]:
    return {AUTH_HEADER: sign(SECRET, method, digest, NOW)}


def test_the_listener_serves_cached_blobs_to_signed_requests_only(listener) -> None:
    resource, disk, store, stats, _ = listener
    data = os.urandom(200_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with store.writer(digest, content_type="application/vnd.oci.image.layer.v1.tar+gzip") as writer:
        writer.write(data)
        writer.commit()
    path = f"/peer/v1/blobs/{digest}".encode()

    request = PeerRequest(b"GET", path)
    render(resource, request)
    assert request.responseCode == 401 and stats.refused == 1
    request = PeerRequest(b"GET", path, {AUTH_HEADER: sign(b"x" * 32, "GET", digest, NOW)})
    render(resource, request)
    assert request.responseCode == 401 and stats.refused == 2

    request = PeerRequest(b"GET", path, signed("GET", digest))
    body = render(resource, request, disk)
    assert body == data and request.finished
    assert request.responseHeaders.getRawHeaders(b"content-length") == [str(len(data)).encode()]
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/vnd.oci.image.layer.v1.tar+gzip"
    ]
    assert stats.served == 1 and store.pinned(digest) == 0

    request = PeerRequest(b"HEAD", path, signed("HEAD", digest))
    assert render(resource, request, disk) == b"" and request.finished and stats.served == 1


class _Connection:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


def _cached_then_damaged(store: Store, size: int) -> tuple[bytes, str]:
    """A blob committed to ``store``, then one byte of its file flipped (as a failing disk would)."""
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with store.writer(digest) as writer:
        writer.write(data)
        writer.commit()
    with open(store.blob_path(digest), "r+b") as file:
        file.seek(size // 2)
        file.write(bytes([data[size // 2] ^ 0x01]))
    return data, digest


def test_the_listener_drops_a_damaged_small_blob_and_sends_none_of_it(listener) -> None:
    resource, disk, store, stats, _ = listener
    failures_before = failures.failures.count("cache", "damaged")
    _, digest = _cached_then_damaged(store, 200_000)
    request = PeerRequest(b"GET", f"/peer/v1/blobs/{digest}".encode(), signed("GET", digest))
    body = render(resource, request, disk)
    # a clean miss: the asker goes on to other holders or upstream, and nothing of the file was sent
    assert request.responseCode == 404 and b"not cached" in body
    assert digest not in store and not store.blob_path(digest).exists()
    assert stats.damaged == 1 and stats.served == 0 and store.pinned(digest) == 0
    assert failures.failures.count("cache", "damaged") == failures_before + 1


def test_the_listener_verifies_a_large_blob_while_sending_it(listener, monkeypatch) -> None:
    resource, disk, store, stats, _ = listener
    monkeypatch.setattr(peers, "VERIFY_BEFORE_SENDING", 100_000)
    failures_before = failures.failures.count("cache", "damaged")
    data, digest = _cached_then_damaged(store, 3 * 2**20)
    request = PeerRequest(b"GET", f"/peer/v1/blobs/{digest}".encode(), signed("GET", digest))
    request.transport = _Connection()
    body = render(resource, request, disk)
    # the connection is cut before the last bytes: the asker's own check sees a short body, never a success
    assert request.transport.aborted and len(body) < len(data) and not request.finished
    assert digest not in store and not store.blob_path(digest).exists() and store.pinned(digest) == 0
    assert stats.damaged == 1
    assert failures.failures.count("cache", "damaged") == failures_before + 1

    # an intact large blob is sent whole and remembered as verified: the next asker is not hashed again
    intact = os.urandom(3 * 2**20)
    intact_digest = "sha256:" + hashlib.sha256(intact).hexdigest()
    with store.writer(intact_digest) as writer:
        writer.write(intact)
        writer.commit()
    path = store.blob_path(intact_digest)
    os.utime(path)  # touched by something else: unverified again, like a file found at start
    with open(path, "r+b") as file:
        file.write(intact[:1])  # the same byte: a write, so the verified mark no longer holds
    for _ in range(2):
        request = PeerRequest(
            b"GET", f"/peer/v1/blobs/{intact_digest}".encode(), signed("GET", intact_digest)
        )
        assert render(resource, request, disk) == intact and request.finished
    with store.open_blob(intact_digest) as reader:
        assert reader.verified
    assert stats.damaged == 1 and stats.served == 3


def test_the_listener_names_holders_of_what_it_does_not_have(listener) -> None:
    resource, disk, _, stats, holders = listener
    path = f"/peer/v1/blobs/{DIGEST}".encode()
    request = PeerRequest(b"GET", path, signed("GET", DIGEST))
    render(resource, request, disk)
    assert request.responseCode == 404 and not request.responseHeaders.hasHeader(HOLDERS_HEADER)

    announce = PeerRequest(b"POST", f"/peer/v1/holders/{DIGEST}".encode(), signed("POST", DIGEST))
    render(resource, announce)
    assert announce.responseCode == 204 and stats.announcements_received == 1
    assert holders.lookup(DIGEST, disk.reactor.seconds()) == [HostPort("10.0.0.7", 5001)]

    request = PeerRequest(b"GET", path, signed("GET", DIGEST))
    render(resource, request, disk)
    assert request.responseCode == 404
    assert request.responseHeaders.getRawHeaders(HOLDERS_HEADER) == [b"10.0.0.7:5001"]


@pytest.mark.parametrize(("method", "path", "code"), [
    (b"GET", b"/peer/v1/blobs/sha256:short", 400),
    (b"GET", b"/peer/v1/blobs/../../etc/passwd", 400),
    (b"GET", b"/peer/v1/blobs/sha512:" + b"ab" * 64, 400),
    (b"DELETE", b"/peer/v1/blobs/" + DIGEST.encode(), 405),
    (b"GET", b"/peer/v1/holders/" + DIGEST.encode(), 405),
    (b"GET", b"/v2/", 404),
])
def test_the_listener_refuses_other_requests(listener, method, path, code) -> None:
    resource, disk, _, stats, _ = listener
    request = PeerRequest(method, path, signed(method.decode(), DIGEST))
    render(resource, request, disk)
    assert request.responseCode == code


def test_a_batch_announcement_records_every_digest_it_signs(listener) -> None:
    resource, disk, _, stats, holders = listener
    digests = ["sha256:" + hashlib.sha256(str(n).encode()).hexdigest() for n in range(3)]
    body = "\n".join([*digests, "../../etc/passwd", "sha256:short"]).encode()
    body_digest = "sha256:" + hashlib.sha256(body).hexdigest()

    forged = PeerRequest(b"POST", b"/peer/v1/holders", {AUTH_HEADER: sign(SECRET, "POST", DIGEST, NOW)})
    forged.content = io.BytesIO(body)
    render(resource, forged)
    assert forged.responseCode == 401 and len(holders) == 0

    request = PeerRequest(b"POST", b"/peer/v1/holders", {AUTH_HEADER: sign(SECRET, "POST", body_digest, NOW)})
    request.content = io.BytesIO(body)
    render(resource, request)
    assert request.responseCode == 204 and stats.announcements_received == 1
    assert len(holders) == 3
    assert all(holders.lookup(d, disk.reactor.seconds()) == [HostPort("10.0.0.7", 5001)] for d in digests)


class _RawResponse:
    """What twisted's Agent gives: enough of it for UpstreamResponse."""

    def __init__(self, code: int, headers: dict[bytes, bytes] | None = None, body: bytes = b"") -> None:
        from twisted.web.http_headers import Headers
        self.code, self.phrase, self.body = code, b"", body
        self.length = len(body)
        self.headers = Headers({name: [value] for name, value in (headers or {}).items()})

    def deliverBody(self, protocol):
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone
        protocol.makeConnection(None)
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class ScriptedAgent:
    """Answers each peer URL as scripted; records what was asked."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def request(self, method, url, headers=None, body=None):
        host = url.decode().split("/")[2]
        self.asked.append(host)
        answer = self.answers.get(host, ConnectionRefusedError("refused"))
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)


def test_a_lookup_follows_named_holders_only_among_members_and_skips_failed_peers() -> None:
    from dnsmirror.peers import PeerClient
    clock = task.Clock()
    members = [HostPort("10.0.0.1", 5001), HostPort("10.0.0.2", 5001), HostPort("10.0.0.3", 5001)]
    peers = PeerSet(clock, members, None, 5001, is_local=lambda host: False)
    stats = PeerStats()
    client = PeerClient(clock, peers, Holders(), SECRET, lookup=1, timeout=2, read_timeout=10, stats=stats)
    digest = "sha256:" + "12" * 32
    first, *others = rendezvous(digest, members)
    holder = others[1]
    client.agent = ScriptedAgent({
        str(first): _RawResponse(404, {HOLDERS_HEADER: f"10.9.9.9:5001, {others[0]}, {holder}".encode()}),
        str(holder): _RawResponse(200, body=b"blob bytes"),
    })
    found = defer.ensureDeferred(client.fetch(digest))
    assert found.called and found.result[0] == holder
    # the outsider named in the answer is never asked; the member that refuses is skipped for a while
    assert client.agent.asked == [str(first), str(others[0]), str(holder)]
    assert stats.failures == 1 and peers.healthy(members) == [m for m in members if m != others[0]]
    assert stats.lookups == 1 and stats.hits == 1


def test_a_lookup_gives_up_after_twice_the_peer_timeout() -> None:
    from dnsmirror.peers import PeerClient
    clock = task.Clock()
    members = [HostPort(f"10.0.0.{n}", 5001) for n in range(1, 7)]
    peers = PeerSet(clock, members, None, 5001, is_local=lambda host: False)
    client = PeerClient(
        clock, peers, Holders(), SECRET, lookup=1, timeout=2, read_timeout=10, stats=PeerStats()
    )
    digest = "sha256:" + "34" * 32
    first, *others = rendezvous(digest, members)
    silent = {str(peer): defer.Deferred() for peer in others}  # connections that never answer

    class Agent(ScriptedAgent):
        def request(self, method, url, headers=None, body=None):
            host = url.decode().split("/")[2]
            self.asked.append(host)
            if host in silent:
                return silent[host]
            return defer.succeed(
                _RawResponse(404, {HOLDERS_HEADER: ", ".join(map(str, others[:4])).encode()})
            )

    client.agent = Agent({})
    found = defer.ensureDeferred(client.fetch(digest))
    for _ in range(5):
        clock.advance(2)
    assert found.called and found.result is None
    assert client.agent.asked == [str(first), str(others[0]), str(others[1])]


def test_an_announced_holder_that_evicted_the_blob_is_forgotten() -> None:
    from dnsmirror.peers import PeerClient
    clock = task.Clock()
    members = [HostPort("10.0.0.1", 5001), HostPort("10.0.0.2", 5001)]
    holders = Holders()
    digest = "sha256:" + "56" * 32
    holders.record(digest, members[1], clock.seconds())
    client = PeerClient(
        clock,
        PeerSet(clock, members, None, 5001, is_local=lambda host: False),
        holders,
        SECRET,
        lookup=1,
        timeout=2,
        read_timeout=10,
        stats=PeerStats(),
    )
    client.agent = ScriptedAgent({str(member): _RawResponse(404) for member in members})
    found = defer.ensureDeferred(client.fetch(digest))
    assert found.called and found.result is None
    assert client.agent.asked[0] == str(members[1])  # what this node was told comes first
    assert holders.lookup(digest, clock.seconds()) == []


def test_grouping_gives_each_digest_to_its_first_peers() -> None:
    from dnsmirror.peers import group_by_first_peers
    digests = ["sha256:" + hashlib.sha256(str(n).encode()).hexdigest() for n in range(50)]
    grouped = group_by_first_peers(digests, PEERS, 2)
    assert sum(len(held) for held in grouped.values()) == 100
    for digest in digests:
        assert {peer for peer, held in grouped.items() if digest in held} == set(
            rendezvous(digest, PEERS)[:2]
        )


def test_the_cache_is_announced_once_peers_are_known_then_every_few_hours() -> None:
    from dnsmirror.peers import FIRST_REANNOUNCE, REANNOUNCE_INTERVAL, PeerClient
    clock = task.Clock()
    peers = PeerSet(clock, [], None, 5001, is_local=lambda host: False)
    client = PeerClient(
        clock, peers, Holders(), SECRET, lookup=1, timeout=2, read_timeout=10, stats=PeerStats()
    )
    announced: list[dict] = []
    client.send_announcements = lambda per_peer: announced.append(per_peer) or 1
    threaded: list[object] = []

    def in_thread(function, *args):
        threaded.append(function)
        return defer.maybeDeferred(function, *args)

    client.start_announcing(lambda: [DIGEST], in_thread)
    clock.advance(FIRST_REANNOUNCE * 3)
    assert announced == []  # nobody to tell yet (discovery has not answered)
    peers.discovered = (HostPort("10.0.0.2", 5001),)
    clock.advance(FIRST_REANNOUNCE)
    assert announced == [{HostPort("10.0.0.2", 5001): [DIGEST]}] and len(threaded) == 1
    clock.advance(REANNOUNCE_INTERVAL)
    assert len(announced) == 2 and len(threaded) == 2
    client.stop_announcing()
    clock.advance(REANNOUNCE_INTERVAL)
    assert len(announced) == 2 and not clock.getDelayedCalls()


def test_the_peer_listener_keeps_no_more_of_a_body_than_a_batch_announcement() -> None:
    from twisted.web.test.requesthelper import DummyChannel

    from dnsmirror.peers import MAX_BODY, PeerRequest
    request = PeerRequest(DummyChannel())
    request.gotLength(None)
    for _ in range(3):
        request.handleContentChunk(b"x" * (MAX_BODY // 2 + 1000))
    assert request.content.tell() == MAX_BODY


def test_a_batch_announcement_a_starting_peer_missed_is_sent_again_a_bounded_number_of_times() -> None:
    from twisted.internet.error import ConnectionRefusedError

    from dnsmirror.peers import ANNOUNCE_ATTEMPTS, FIRST_REANNOUNCE, PeerClient
    clock = task.Clock()
    up, starting = HostPort("10.0.0.2", 5001), HostPort("10.0.0.3", 5001)
    peers = PeerSet(clock, [up, starting], None, 5001, is_local=lambda host: False)
    client = PeerClient(clock, peers, Holders(), SECRET, lookup=2, timeout=2, read_timeout=10,
                        stats=PeerStats(), wall_clock=clock.seconds)
    listening = {up}
    received: list[tuple[HostPort, bytes, int]] = []

    class Agent:
        def request(self, method, url, headers=None, body=None):
            peer = HostPort(url.decode().split("/")[2].split(":")[0], 5001)
            if peer not in listening:
                return defer.fail(ConnectionRefusedError())
            stamp = int(headers.getRawHeaders(AUTH_HEADER)[0].split(b" ")[0])
            received.append((peer, body._inputFile.getvalue(), stamp))
            return defer.succeed(_RawResponse(204))

    client.agent = Agent()
    clock.advance(1000)
    client.start_announcing(lambda: [DIGEST], lambda function, *args: defer.maybeDeferred(function, *args))
    clock.advance(FIRST_REANNOUNCE)
    assert [peer for peer, *_ in received] == [up]
    clock.pump([1] * (5 + 10))  # two retries, still refused
    assert client.stats.announcements_sent == 4
    listening.add(starting)
    clock.pump([1] * 20)
    assert [peer for peer, *_ in received] == [up, starting]
    peer, body, stamp = received[-1]
    assert body == DIGEST.encode() and stamp == int(clock.seconds())  # signed when sent, not when first tried
    clock.pump([10] * 360)
    assert len(received) == 2  # answered: not sent again before the next round

    # a peer that never comes up is tried ANNOUNCE_ATTEMPTS times, then left to the next round
    listening.clear()
    attempts = client.stats.announcements_sent
    client.send_announcements({up: [DIGEST]})
    clock.pump([1] * 3600)
    assert client.stats.announcements_sent - attempts == ANNOUNCE_ATTEMPTS
    client.stop_announcing()
    client.send_announcements({up: [DIGEST]})
    assert not [call for call in clock.getDelayedCalls() if call.active()]  # stopped: nothing retried later
