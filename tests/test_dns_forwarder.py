"""The forwarder on the real reactor against an in-process UDP upstream on loopback: sockets rotate and
stay bounded, source ports and IDs vary, forged answers are dropped."""

from __future__ import annotations

from dnslib import RR, A, DNSRecord
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from dnsmirror.config import HostPort
from dnsmirror.dns import forwarder as forwarding
from dnsmirror.dns.forwarder import AllUpstreamsFailed, Forwarder


class Upstream(protocol.DatagramProtocol):
    """Answers every A question with 192.0.2.1; with ``forge_first``, first sends a forged answer
    (right ID, another question) and then the real one."""

    def __init__(self, forge_first: bool = False) -> None:
        self.forge_first = forge_first
        self.sources: set[int] = set()
        self.ids: list[int] = []

    def datagramReceived(self, data: bytes, addr) -> None:
        query = DNSRecord.parse(data)
        self.sources.add(addr[1])
        self.ids.append(query.header.id)
        if self.forge_first:
            forged = DNSRecord.question("evil.example")
            forged.header.id = query.header.id
            forged = forged.reply()
            forged.add_answer(RR("evil.example", rdata=A("6.6.6.6")))
            self.transport.write(forged.pack(), addr)
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, rdata=A("192.0.2.1")))
        self.transport.write(reply.pack(), addr)


class ForwarderTests(TestCase):
    def start(self, upstream: Upstream, timeout: float = 2.0) -> Forwarder:
        port = reactor.listenUDP(0, upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        forwarder = Forwarder(reactor, [HostPort("127.0.0.1", port.getHost().port)], timeout)
        self.addCleanup(forwarder.stop)
        return forwarder

    @defer.inlineCallbacks
    def test_sockets_rotate_and_stay_bounded(self):
        upstream = Upstream()
        forwarder = self.start(upstream)
        count = 3 * forwarding.ROTATE_AFTER_QUERIES * forwarding.SOCKETS_PER_UPSTREAM
        for batch in range(0, count, 200):
            answers = yield defer.gatherResults([
                forwarder.forward(DNSRecord.question(f"h{i}.example.test").pack())
                for i in range(batch, batch + 200)
            ])
            for offset, answer in enumerate(answers):
                self.assertEqual(str(DNSRecord.parse(answer).q.qname), f"h{batch + offset}.example.test.")
            self.assertLessEqual(forwarder.descriptors(), 2 * forwarding.SOCKETS_PER_UPSTREAM)
        # every socket carried at most ROTATE_AFTER_QUERIES queries, each from its own random port
        self.assertGreaterEqual(len(upstream.sources), count // forwarding.ROTATE_AFTER_QUERIES)
        self.assertGreater(len(set(upstream.ids)), count * 0.9)  # IDs are random, not a counter
        self.assertLessEqual(forwarder.descriptors(), forwarding.SOCKETS_PER_UPSTREAM)
        self.assertEqual(forwarder.in_flight, 0)

    @defer.inlineCallbacks
    def test_a_forged_answer_is_dropped_and_the_real_one_taken(self):
        forwarder = self.start(Upstream(forge_first=True))
        query = DNSRecord.question("www.example.test")
        query.header.id = 4242
        answer = DNSRecord.parse((yield forwarder.forward(query.pack())))
        self.assertEqual(answer.header.id, 4242)
        self.assertEqual((str(answer.q.qname), str(answer.a.rdata)), ("www.example.test.", "192.0.2.1"))

    @defer.inlineCallbacks
    def test_a_refused_upstream_fails_at_once_and_is_skipped(self):
        closed = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        address = closed.getHost().port
        yield closed.stopListening()
        forwarder = Forwarder(reactor, [HostPort("127.0.0.1", address)], timeout=5.0)
        self.addCleanup(forwarder.stop)
        started = reactor.seconds()
        with self.assertRaises(AllUpstreamsFailed) as caught:
            yield forwarder.forward(DNSRecord.question("www.example.test").pack())
        self.assertIn("refused", str(caught.exception))
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual(forwarder.table.down(), [0])

    def silent_then_answering(self) -> list[HostPort]:
        """A silent upstream, then one that answers (both on loopback, closed after the test)."""
        upstreams = []
        for server in (protocol.DatagramProtocol(), Upstream()):
            port = reactor.listenUDP(0, server, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            upstreams.append(HostPort("127.0.0.1", port.getHost().port))
        return upstreams

    @defer.inlineCallbacks
    def test_a_silent_upstream_times_out_and_the_next_one_answers(self):
        forwarder = Forwarder(reactor, self.silent_then_answering(), timeout=0.3)
        self.addCleanup(forwarder.stop)
        started = reactor.seconds()
        answer = yield forwarder.forward(DNSRecord.question("www.example.test").pack())
        self.assertEqual(str(DNSRecord.parse(answer).a.rdata), "192.0.2.1")
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        self.assertEqual(forwarder.table.down(), [0])
        started = reactor.seconds()
        yield forwarder.forward(DNSRecord.question("www2.example.test").pack())
        self.assertLess(reactor.seconds() - started, 0.2)  # the silent one is skipped now

    @defer.inlineCallbacks
    def test_what_it_finds_out_about_an_upstream_is_told_and_what_it_learns_is_not_told_back(self):
        upstreams = self.silent_then_answering()
        finder, learner = (Forwarder(reactor, upstreams, timeout=0.3) for _ in range(2))
        for forwarder in (finder, learner):
            self.addCleanup(forwarder.stop)
        told: list[tuple[int, bool, str]] = []
        told_on: list[tuple[int, bool, str]] = []  # (on_health's errors are logged, not raised)
        finder.on_health = lambda *change: told.append(change)
        learner.on_health = lambda *change: told_on.append(change)
        yield finder.forward(DNSRecord.question("www.example.test").pack())
        self.assertEqual([(index, up) for index, up, _ in told], [(0, False)])
        learner.learned(*told[0])
        self.assertEqual(learner.table.down(), [0])
        started = reactor.seconds()
        yield learner.forward(DNSRecord.question("www2.example.test").pack())
        self.assertLess(reactor.seconds() - started, 0.2)  # skipped without its own timeout
        learner.learned(0, True, "")
        self.assertEqual(learner.table.down(), [])
        learner.learned(7, False, "an index it does not have")  # ignored
        self.assertEqual(learner.table.down(), [])
        self.assertEqual(told_on, [])  # what it learned, it did not tell on
