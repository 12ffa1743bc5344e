"""Burst coordination wired into real nodes (dnsmirror/swarm_node.py): several dnsmirror peer listeners,
content chains and coordination drivers on loopback addresses (127.0.0.x, one port: every node listens on
the same port, and knows its peers by the address they connect from) in one reactor, in front of one
in-process upstream that sends a blob slowly and counts its requests.

- five nodes missing one blob at the same instant: one upstream GET, every body right, no node above
  ``peers.max_uploads`` streams of it, and the blob spreads as a tree;
- the fill lease holder dies mid-transfer: every other pull completes, the rest coming with a range;
- a client upstream refuses gets upstream's answer, and no peer is asked anything;
- a holder that lies: its bytes are never served as a success, and the retry gets the right ones;
- peers that are down or speak only the old peer protocol: upstream serves, as without peers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from fakes import FakeRequest, ManualDisk, registry_target
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionLost
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from dnsmirror import swarm
from dnsmirror.authz import Grants
from dnsmirror.config import HostPort
from dnsmirror.content import ContentChain
from dnsmirror.peers import (
    AUTH_HEADER,
    Holders,
    PeerClient,
    PeerRequest,
    PeerResource,
    PeerSet,
    PeerStats,
    UploadSlots,
    sign,
)
from dnsmirror.store import Store
from dnsmirror.streaming import DiskIO
from dnsmirror.swarm_node import SwarmDriver, decode_message, encode_message

SECRET = b"burst-coordination-test-secret-0123"
HOST = "registry.example"
GOOD = b"Basic dGVhbTpzM2NyZXQ="  # the credential upstream allows
CHUNK = 64 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the upstream registry: slow, counting, refusing a wrong credential ----------------------------------


class SlowBody:
    """Upstream's answer with ``data[start:]``: one chunk per ``tick`` seconds while not paused."""

    phrase = b"OK"

    def __init__(self, data: bytes, start: int, tick: float) -> None:
        self.data = data[start:]
        self.code = 206 if start else 200
        self.length = len(self.data)
        self.headers = Headers({b"content-type": [b"application/octet-stream"]})
        if start:
            ranged = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.headers.setRawHeaders(b"content-range", [ranged.encode()])
        self.tick = tick
        self.sent = 0
        self.paused = self.stopped = False
        self.call = None
        self.protocol = None

    def deliver_body(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)
        self._schedule()

    def discard(self, *args) -> defer.Deferred:
        self.stopped = True
        return defer.succeed(None)

    def _schedule(self) -> None:
        if self.call is None and not (self.paused or self.stopped):
            self.call = reactor.callLater(self.tick, self._send)

    def _send(self) -> None:
        self.call = None
        if self.paused or self.stopped:
            return
        chunk = self.data[self.sent:self.sent + CHUNK]
        self.sent += len(chunk)
        self.protocol.dataReceived(chunk)
        if self.sent >= self.length and not self.stopped:
            self.stopped = True
            self.protocol.connectionLost(Failure(ResponseDone()))
            return
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        reactor.callLater(0, self.protocol.connectionLost, Failure(ConnectionLost("closed")))


class Refusal:
    code, phrase, length = 401, b"Unauthorized", 0
    headers = Headers()

    def discard(self, *args) -> defer.Deferred:
        return defer.succeed(None)


class Registry:
    """Every node's upstream: one blob at a time; records (node, method, range) of each request."""

    def __init__(self, data: bytes, tick: float = 0.01) -> None:
        self.data = data
        self.tick = tick
        self.requests: list[tuple[str, str, bytes | None]] = []
        self.bodies: dict[str, list[SlowBody]] = {}

    def gets(self, ranged: bool) -> list[tuple[str, str, bytes | None]]:
        return [r for r in self.requests if r[1] == "GET" and (r[2] is not None) == ranged]

    def client(self, node: str) -> _RegistryClient:
        return _RegistryClient(self, node)


class _RegistryClient:
    def __init__(self, registry: Registry, node: str) -> None:
        self.registry, self.node = registry, node

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        headers = headers or {}
        ranged = headers.get(b"range", [None])[0]
        self.registry.requests.append((self.node, method, ranged))
        if headers.get(b"authorization") != [GOOD]:
            return defer.succeed(Refusal())
        if method == "HEAD":
            return defer.succeed(_Allowed())
        start = int(ranged.decode().removeprefix("bytes=").rstrip("-")) if ranged else 0
        body = SlowBody(self.registry.data, start, self.registry.tick)
        self.registry.bodies.setdefault(self.node, []).append(body)
        return defer.succeed(body)


class _Allowed(Refusal):
    code, phrase = 200, b"OK"


class PassThrough:
    """What the chain does with a refusal: upstream's own answer to the client's own request."""

    def __init__(self) -> None:
        self.forwarded = 0

    async def forward(self, request, target) -> None:
        self.forwarded += 1
        request.setResponseCode(401)
        request.finish()


# --- nodes ------------------------------------------------------------------------------------------------


class Node:
    """One dnsmirror node's content chain, peer listener, peer client and burst coordination."""

    def __init__(self, test: BurstTests, name: str, address: HostPort, members: list[HostPort],
                 registry: Registry, max_uploads: int, swarm_enabled: bool = True) -> None:
        self.name, self.address = name, address
        self.store = Store.open(test.tmp / name, 64 * 2**20)
        test.addCleanup(self.store.close)
        self.disk = DiskIO(reactor, self.store, threads=2)
        self.disk.start()
        test.addCleanup(self.disk.stop)
        self.peer_stats = PeerStats()
        self.peers = PeerSet(reactor, members, None, address.port, is_local=lambda host: host == address.host)
        self.holders = Holders()
        self.client = PeerClient(reactor, self.peers, self.holders, SECRET, 1, 2.0, 5.0, self.peer_stats)
        # a real node's requests leave from its own address; here every node shares the loopback device
        self.client.agent = Agent(reactor, connectTimeout=2.0, pool=self.client.pool,
                                  bindAddress=(address.host, 0))
        self.slots = UploadSlots(self.peer_stats, max_uploads)
        settings = swarm.SwarmSettings(max_uploads=max_uploads)
        self.driver = (SwarmDriver(reactor, address, self.peers, SECRET, settings, 2.0, 5.0)
                       if swarm_enabled else None)
        self.passthrough = PassThrough()
        self.chain = ContentChain(reactor, self.disk, registry.client(name), Grants(300, 86400),
                                  self.passthrough, peers=self.client, swarm=self.driver)
        self.resource = PeerResource(reactor, self.disk, SECRET, self.holders, self.peer_stats, address.port,
                                     running_fill=self.chain.running_fill, uploads=self.slots)
        if self.driver is not None:
            self.resource.on_message = self.driver.receive
            self.slots.on_start, self.slots.on_end = self.driver.upload_started, self.driver.upload_ended
            self.driver.start()
        self.site = server.Site(self.resource, requestFactory=PeerRequest)
        self.site.noisy = False
        self.connections = WrappingFactory(self.site)  # a killed node's connections are all cut
        self.port = None
        self.alive = True
        test.nodes.append(self)
        test.addCleanup(self.kill)

    def driver_pool(self):
        return self.driver.pool if self.driver is not None else self.client.pool

    def listen(self) -> None:
        self.port = reactor.listenTCP(self.address.port, self.connections, interface=self.address.host)

    def fetch(self, digest: str, authorization: bytes = GOOD) -> tuple[FakeRequest, defer.Deferred]:
        """A client's GET of ``digest`` through this node."""
        target = registry_target(f"/v2/team/app/blobs/{digest}", host=HOST, credential=authorization.decode(),
                                 authorization=[authorization])
        request = FakeRequest()
        served = defer.ensureDeferred(self.chain.serve(request, target))
        # the chain is done once the body is under way: the test waits for the response's end
        served.addCallback(lambda _: defer.ensureDeferred(
            wait_for(lambda: request.finished or request.channel.transport.aborted, 20)))
        served.addTimeout(30, reactor)
        return request, served

    def kill(self) -> defer.Deferred | None:
        """Stop as a killed process would: nothing more sent, every connection cut."""
        if not self.alive:
            return None
        self.alive = False
        stopped = []
        if self.driver is not None:
            stopped.append(self.driver.stop())
        if self.port is not None:
            stopped.append(defer.maybeDeferred(self.port.stopListening))
        for protocol in list(self.connections.protocols):
            protocol.transport.abortConnection()
        stopped.append(self.client.close())
        return defer.DeferredList(stopped)


def received(request: FakeRequest, data: bytes) -> bool:
    """The client got the whole blob as one successful response."""
    return request.finished and not request.channel.transport.aborted and request.body == data


class Cluster:
    """``n`` nodes on 127.0.0.1 .. 127.0.0.n, one port; ``old`` of them without burst coordination."""

    def __init__(self, test: TestCase, registry: Registry, n: int, max_uploads: int = 4,
                 old: frozenset[int] = frozenset(), listening: frozenset[int] | None = None) -> None:
        for attempt in range(20):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            addresses = [HostPort(f"127.0.0.{i + 1}", port) for i in range(n)]
            self.nodes = [Node(test, f"node{i}-{attempt}", addresses[i], addresses, registry, max_uploads,
                               swarm_enabled=i not in old) for i in range(n)]
            try:
                for i, node in enumerate(self.nodes):
                    if listening is None or i in listening:
                        node.listen()
            except CannotListenError:
                for node in self.nodes:
                    node.kill()
                continue
            # first of the cleanups: fills end (and announce) while every node still runs
            test.addCleanup(lambda: defer.ensureDeferred(
                wait_for(lambda: not any(node.chain.slots for node in self.nodes if node.alive), 5.0)))
            return
        raise AssertionError("no port free on every loopback address")

    def coordinator(self, digest: str) -> Node:
        first = swarm.Membership(n.address for n in self.nodes).order(digest)[0]
        return next(n for n in self.nodes if n.address == first)


async def wait_for(condition, seconds: float = 10.0, step: float = 0.01) -> bool:
    for _ in range(int(seconds / step)):
        if condition():
            return True
        await task.deferLater(reactor, step, lambda: None)
    return condition()


async def settle() -> None:
    """Let requests still under way (announcements to nodes just stopped) end: trial wants a clean reactor.
    Only calls due soon count: the test's own timeout is due in a minute."""
    await wait_for(lambda: not [call for call in reactor.getDelayedCalls()
                                if call.active() and call.getTime() - reactor.seconds() < 10], 3.0)


class BurstTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dnsmirror-burst-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.nodes: list[Node] = []
        # last: a connection that went back to a pool after its node stopped (a killed node's) is closed too
        self.addCleanup(lambda: defer.DeferredList([pool.closeCachedConnections() for node in self.nodes
                                                   for pool in (node.client.pool, node.driver_pool())]))
        self.addCleanup(lambda: defer.ensureDeferred(settle()))

    @defer.inlineCallbacks
    def test_five_nodes_missing_a_blob_at_once_fetch_it_upstream_once_and_spread_it_as_a_tree(self):
        data = os.urandom(3 * 2**20)
        registry = Registry(data)
        cluster = Cluster(self, registry, 5, max_uploads=2)
        pulls = [node.fetch(sha(data)) for node in cluster.nodes]
        yield defer.gatherResults([served for _, served in pulls])

        assert all(received(request, data) for request, _ in pulls), [len(r.body) for r, _ in pulls]
        assert len(registry.gets(ranged=False)) == 1, registry.requests
        assert registry.gets(ranged=True) == []
        # the cap held on every node, and more than the lease holder uploaded: a tree, not a star
        uploads = [node.peer_stats.uploads_per_blob_max for node in cluster.nodes]
        assert max(uploads) <= 2, uploads
        assert sum(1 for count in uploads if count > 0) >= 2, uploads
        assert sum(node.driver.stats.leases for node in cluster.nodes) == 1
        assert sum(node.driver.stats.leases_taken for node in cluster.nodes) == 1
        cached = defer.ensureDeferred(wait_for(lambda: all(sha(data) in n.store for n in cluster.nodes)))
        assert (yield cached)

    @defer.inlineCallbacks
    def test_when_the_lease_holder_dies_mid_transfer_every_other_pull_completes(self):
        data = os.urandom(4 * 2**20)
        registry = Registry(data, tick=0.02)  # ~1.3 s upstream: time to die in the middle
        cluster = Cluster(self, registry, 5)
        digest = sha(data)
        coordinator = cluster.coordinator(digest)
        askers = [node for node in cluster.nodes if node is not coordinator]  # it hands the lease on itself
        pulls = {node.name: node.fetch(digest) for node in askers}

        def lease_holder():
            holder = coordinator.driver.node.lease_holder(digest)
            return next((node for node in askers if node.address == holder), None)

        def others_receiving() -> bool:
            holder = lease_holder()
            sessions = [node.driver.sessions.get(digest) for node in askers if node is not holder]
            return holder is not None and all(s is not None and s.fill is not None and s.fill.received > 0
                                              for s in sessions)

        assert (yield defer.ensureDeferred(wait_for(others_receiving)))
        holder = lease_holder()
        assert registry.bodies[holder.name][0].sent < len(data) // 2, "the transfer ended before the kill"
        yield holder.kill()
        registry.bodies[holder.name][0].stopProducing()
        survivors = [node for node in askers if node is not holder]
        yield defer.gatherResults([pulls[node.name][1] for node in survivors])

        for node in survivors:
            assert received(pulls[node.name][0], data), node.name
        # the rest came with a range from the byte reached, not a new whole fetch for each node
        assert len(registry.gets(ranged=False)) == 1, registry.requests
        assert 1 <= len(registry.gets(ranged=True)) <= len(survivors), registry.requests
        assert coordinator.driver.node.lease_holder(digest) != holder.address

    @defer.inlineCallbacks
    def test_a_client_upstream_refuses_gets_the_refusal_and_no_peer_is_asked(self):
        data = os.urandom(300_000)
        registry = Registry(data)
        cluster = Cluster(self, registry, 3)
        first, refused, _ = cluster.nodes
        request, served = first.fetch(sha(data))
        yield served
        assert received(request, data)
        messages_before = [(n.driver.stats.leases, n.driver.stats.offers, n.driver.stats.waits)
                           for n in cluster.nodes]
        served_before = first.peer_stats.served

        request, served = refused.fetch(sha(data), authorization=b"Basic bm9ib2R5Om5vcGU=")
        yield served
        assert request.code == 401 and request.body == b"" and refused.passthrough.forwarded == 1
        assert refused.peer_stats.lookups == 0 and refused.driver.node.pulls == {}
        assert [(n.driver.stats.leases, n.driver.stats.offers, n.driver.stats.waits)
                for n in cluster.nodes] == messages_before
        assert first.peer_stats.served == served_before
        assert len(registry.gets(ranged=False)) == 1

    async def one_holder(self, registry: Registry, size: int) -> tuple[Node, Node, Node]:
        """Three nodes and a blob that only ``holder`` has (pulled, complete, known to the coordinator),
        which ``asker``'s lookup cannot find: only coordination can send the asker to it."""
        cluster = Cluster(self, registry, 3)
        while True:  # the coordinator is neither of them; the asker's first lookup peer is not the holder
            registry.data = os.urandom(size)
            digest = sha(registry.data)
            coordinator = cluster.coordinator(digest)
            holder, asker = [n for n in cluster.nodes if n is not coordinator]
            lookup = swarm.Membership([holder.address, coordinator.address]).order(digest)[0]
            if lookup == coordinator.address:
                break
        request, served = holder.fetch(digest)
        await served
        assert received(request, registry.data)
        assert await wait_for(
            lambda: any(h.complete for h in coordinator.driver.node.coordinated[digest].holders.values()))
        for node in cluster.nodes:
            node.holders = node.client.holders = node.resource.holders = Holders()  # no announcement helps
        return holder, coordinator, asker

    @defer.inlineCallbacks
    def test_bytes_from_a_lying_holder_are_never_served_as_a_success(self):
        registry = Registry(b"")
        liar, coordinator, asker = yield defer.ensureDeferred(self.one_holder(registry, 500_000))
        data, digest = registry.data, sha(registry.data)

        async def lie(request, digest):
            request.setHeader(b"content-length", str(len(data)).encode())
            request.write(os.urandom(len(data)))
            request.finish()

        liar.resource._send = lie
        request, served = asker.fetch(digest)
        yield served
        assert not received(request, data) and request.channel.transport.aborted
        assert digest not in asker.store

        # the retry (a client resumes or asks again) gets the right bytes: the liar is dropped
        request, served = asker.fetch(digest)
        yield served
        assert received(request, data)
        assert liar.address not in coordinator.driver.node.coordinated[digest].holders

    @defer.inlineCallbacks
    def test_a_holder_that_stalls_costs_a_short_timeout_then_the_rest_comes_from_upstream(self):
        registry = Registry(b"")
        staller, coordinator, asker = yield defer.ensureDeferred(self.one_holder(registry, 500_000))
        data, digest = registry.data, sha(registry.data)

        async def stall(request, digest):
            request.setHeader(b"content-length", str(len(data)).encode())
            request.write(data[:100_000])  # and nothing more, the connection left open

        staller.resource._send = stall
        started = reactor.seconds()
        request, served = asker.fetch(digest)
        yield served
        assert received(request, data)
        assert reactor.seconds() - started < swarm.SwarmSettings().stall_timeout + 3
        assert registry.gets(ranged=True) == [(asker.name, "GET", b"bytes=100000-")]
        assert staller.address not in coordinator.driver.node.coordinated[digest].holders

    @defer.inlineCallbacks
    def test_with_peers_down_or_speaking_the_old_protocol_upstream_serves_as_without_peers(self):
        registry = Registry(b"")
        # node1 runs the old peer protocol (no coordination endpoint); node2 is down
        cluster = Cluster(self, registry, 3, old=frozenset({1}), listening=frozenset({0, 1}))
        node = cluster.nodes[0]
        while True:  # a blob whose first two coordinators are those two: both are skipped
            registry.data = os.urandom(400_000)
            if cluster.coordinator(sha(registry.data)) is not node and swarm.Membership(
                    n.address for n in cluster.nodes).order(sha(registry.data))[-1] == node.address:
                break
        request, served = node.fetch(sha(registry.data))
        yield served
        assert received(request, registry.data)
        assert len(registry.gets(ranged=False)) == 1
        assert node.driver.stats.messages_failed == 2 and node.driver.stats.leases == 1


class MessageTests(SynchronousTestCase):
    def test_every_message_crosses_as_json_and_comes_back_equal(self):
        digest = sha(b"x")
        node = HostPort("10.0.0.1", 5001)
        for message in (swarm.Ask(digest, 5), swarm.Lease(digest, 7), swarm.Offer(digest, node),
                        swarm.Wait(digest, 0.05), swarm.Register(digest, None, 9, True, 2), swarm.Ack(digest),
                        swarm.Release(digest, node, HostPort("10.0.0.2", 5001), swarm.Outcome.LIED)):
            assert decode_message(json.loads(json.dumps(encode_message(message)))) == message

    def test_anything_but_a_message_is_refused(self):
        digest = sha(b"x")
        for bad in ([], {"type": "Ask"}, {"type": "Grant", "digest": digest},
                    {"type": "Ask", "digest": digest, "offset": "0"},
                    {"type": "Ask", "digest": digest, "offset": True},
                    {"type": "Ask", "digest": digest, "offset": -1},
                    {"type": "Ask", "digest": "Bearer abc", "offset": 0},
                    {"type": "Offer", "digest": digest, "holder": "registry.example:443"},
                    {"type": "Release", "digest": digest, "receiver": "10.0.0.1:5001", "source": None,
                     "outcome": "token"}):
            with self.assertRaises(ValueError):
                decode_message(bad)


    def test_a_body_nested_too_deep_is_refused_as_bad_input_not_a_crash(self):
        clock = task.Clock()
        peers = PeerSet(clock, [HostPort("10.0.0.2", 5001)], None, 5001, is_local=lambda host: False)
        driver = SwarmDriver(clock, HostPort("10.0.0.1", 5001), peers, SECRET, swarm.SwarmSettings(),
                             2.0, 5.0)
        with self.assertRaises(ValueError):
            driver.receive(HostPort("10.0.0.2", 5001), b"[" * 200_000 + b"]" * 200_000)


class ListenerRequest(DummyRequest):
    """A request on the peer listener from 10.0.0.7, with a push-producer-friendly registerProducer."""

    def __init__(self, path: bytes, headers: dict[bytes, bytes]) -> None:
        super().__init__(path.lstrip(b"/").split(b"/"))
        self.method = b"GET"
        self.path = self.uri = path
        self.client = IPv4Address("TCP", "10.0.0.7", 40000)
        for name, value in headers.items():
            self.requestHeaders.setRawHeaders(name, [value])

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


class ListenerTests(SynchronousTestCase):
    def test_the_listener_sends_at_most_max_uploads_streams_of_a_blob_and_resumes_from_a_byte(self):
        data = os.urandom(200_000)
        digest = sha(data)
        now = 1_800_000_000.0
        root = Path(tempfile.mkdtemp(prefix="dnsmirror-listener-"))
        self.addCleanup(shutil.rmtree, root, True)
        with Store.open(root, 10 * 2**20) as store:
            with store.writer(digest) as writer:
                writer.write(data)
                writer.commit()
            disk = ManualDisk(store)
            stats = PeerStats()
            resource = PeerResource(disk.reactor, disk, SECRET, Holders(), stats, 5001,
                                    wall_clock=lambda: now, uploads=UploadSlots(stats, 2))
            started = []
            resource.uploads.on_start = lambda d, receiver: started.append(receiver)
            path = f"/peer/v1/blobs/{digest}".encode()

            def get(extra: dict[bytes, bytes] | None = None) -> ListenerRequest:
                signed = {AUTH_HEADER: sign(SECRET, "GET", digest, now)}
                request = ListenerRequest(path, {**signed, **(extra or {})})
                assert resource.render(request) == server.NOT_DONE_YET
                disk.step("open_blob")
                if "verify_reader" in [getattr(f, "__name__", "") for f, *_ in disk.queue]:
                    disk.step("verify_reader")
                return request

            streaming = [get(), get()]  # both hold a slot: their reads are still queued
            refused = get()
            assert refused.responseCode == 503 and refused.finished
            assert stats.uploads_refused == 1 and stats.uploads_per_blob_max == 2
            assert resource.uploads.busiest == 2 and started == [HostPort("10.0.0.7", 5001)] * 2
            disk.drain()
            assert all(b"".join(r.written) == data and r.finished for r in streaming)
            assert resource.uploads.total == 0

            ranged = get({b"range": b"bytes=150000-"})
            disk.drain()
            assert ranged.responseCode == 206 and b"".join(ranged.written) == data[150_000:]
            assert ranged.responseHeaders.getRawHeaders(b"content-range") == [
                f"bytes 150000-{len(data) - 1}/{len(data)}".encode()]
            assert stats.uploads_per_blob_max == 2
