"""The DNS controller and protocols with an in-memory forwarder and transports."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct

from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dnsmirror.dns.forwarder import (
    MAX_TCP_UPSTREAM,
    SOCKETS_PER_UPSTREAM,
    AllUpstreamsFailed,
    _question,
    matches,
)
from dnsmirror.dns.packets import Responder, with_id
from dnsmirror.dns.server import (
    MAX_TCP_CONNECTIONS,
    MAX_TCP_CONNECTIONS_PER_CLIENT,
    MAX_TCP_QUERIES_PENDING,
    DatagramListener,
    DnsController,
    DnsStreamFactory,
    DnsStreamProtocol,
    tcp_caps,
)
from dnsmirror.limits import OPENING_GRACE, ListenerCaps
from dnsmirror.patterns import HostMatcher

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
ALLOW = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def query(name: str, qtype: int = QTYPE.A, qid: int = 42) -> bytes:
    return bytes(DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, qtype)).pack())


class FakeForwarder:
    """Records forwarded packets; the test fires the Deferreds."""

    def __init__(self):
        self.pending: list[tuple[bytes, bool, defer.Deferred]] = []

    def forward(self, packet: bytes, tcp: bool = False) -> defer.Deferred:
        d = defer.Deferred()
        self.pending.append((packet, tcp, d))
        return d


def make_controller(enabled: bool = True):
    responder = Responder(HostMatcher(["*.dkr.ecr.*.amazonaws.com"]), "10.96.0.53", None, ttl=5)
    responder.capture_enabled = enabled
    forwarder = FakeForwarder()
    return DnsController(responder, forwarder, ALLOW), forwarder


class ControllerTests(SynchronousTestCase):
    def handle(self, controller, packet, host="127.0.0.1", tcp=False):
        replies = []
        controller.handle(packet, host, replies.append, tcp=tcp)
        return replies

    def test_captured_then_cached(self):
        controller, forwarder = make_controller()
        first = self.handle(controller, query(ECR, qid=1))
        second = self.handle(controller, query(ECR, qid=2))
        self.assertEqual(len(first), 1)
        self.assertEqual(second, [b"\x00\x02" + first[0][2:]])
        self.assertEqual(controller.stats.captured, 2)
        self.assertEqual(forwarder.pending, [])

    def test_forwarded_answer_passes_through_unchanged(self):
        controller, forwarder = make_controller()
        packet = query("example.com")
        replies = self.handle(controller, packet, tcp=True)
        self.assertEqual(replies, [])
        (sent, tcp, d), = forwarder.pending
        self.assertEqual((sent, tcp), (packet, True))
        upstream_answer = bytes(DNSRecord.parse(packet).reply().pack())
        d.callback(upstream_answer)
        self.assertEqual(replies, [upstream_answer])
        self.assertEqual(controller.stats.forwarded, 1)

    def test_servfail_when_all_upstreams_fail(self):
        controller, forwarder = make_controller()
        replies = self.handle(controller, query("example.com", qid=9))
        forwarder.pending[0][2].errback(AllUpstreamsFailed("127.0.0.1:53"))
        reply = DNSRecord.parse(replies[0])
        self.assertEqual((reply.header.id, reply.header.rcode), (9, RCODE.SERVFAIL))
        self.assertEqual(controller.stats.servfail, 1)

    def test_unexpected_forwarding_error_still_answers_servfail(self):
        controller, forwarder = make_controller()
        replies = self.handle(controller, query("example.com"))
        forwarder.pending[0][2].errback(RuntimeError("bug"))
        self.assertEqual(DNSRecord.parse(replies[0]).header.rcode, RCODE.SERVFAIL)
        self.flushLoggedErrors(RuntimeError)

    def test_fail_open_is_counted_and_forwarded(self):
        controller, forwarder = make_controller(enabled=False)
        self.assertEqual(self.handle(controller, query(ECR)), [])
        self.assertEqual(len(forwarder.pending), 1)
        self.assertEqual(controller.stats.fail_open, 1)

    def test_refused_outside_allow_list(self):
        controller, forwarder = make_controller()
        for host in ("192.0.2.7", "2001:db8::1", "not-an-ip"):
            replies = self.handle(controller, query(ECR), host=host)
            self.assertEqual(DNSRecord.parse(replies[0]).header.rcode, RCODE.REFUSED)
            self.assertEqual(DNSRecord.parse(replies[0]).rr, [])
        self.assertEqual(controller.stats.refused, 3)
        self.assertEqual(forwarder.pending, [])
        self.assertTrue(controller.is_allowed("::ffff:127.0.0.1"))

    def test_malformed_dropped_and_counted(self):
        controller, _ = make_controller()
        self.assertEqual(self.handle(controller, b"\x01\x02garbage"), [])
        self.assertEqual(controller.stats.malformed, 1)


class _Readers(Clock):
    """The reactor's part a listener uses: which descriptors are read, and a clock."""

    def __init__(self):
        super().__init__()
        self.readers = set()
        self.running = True

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)


@contextlib.contextmanager
def udp_pair(controller, client_host="127.0.0.1", readers=None):
    """A listener on a real loopback socket (read by calling doRead) and a client socket bound to it."""
    readers = readers or _Readers()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    listener = DatagramListener(readers, server, controller)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind((client_host, 0))
        client.connect(server.getsockname())
        client.settimeout(2)
        yield listener, client
    finally:
        client.close()
        listener.stopListening()
        assert readers.readers == set()


class ProtocolTests(SynchronousTestCase):
    def test_udp_replies_to_the_sender(self):
        controller, _ = make_controller()
        with udp_pair(controller, client_host="127.0.0.5") as (listener, client):
            client.send(query(ECR))
            listener.doRead()
            answer, sender = client.recvfrom(4096)
            self.assertEqual(sender, listener.socket.getsockname())
        self.assertEqual(str(DNSRecord.parse(answer).rr[0].rdata), "10.96.0.53")

    def test_udp_answers_a_batch_and_leaves_the_rest_for_the_next_wakeup(self):
        from dnsmirror.dns import server

        controller, _ = make_controller()
        total = server._DATAGRAMS_PER_WAKEUP + 3
        with udp_pair(controller) as (listener, client):
            for qid in range(total):
                client.send(query(ECR, qid=qid))
            listener.doRead()
            self.assertEqual(controller.stats.captured, server._DATAGRAMS_PER_WAKEUP)
            listener.doRead()  # the rest, then an empty socket
            self.assertEqual(controller.stats.captured, total)
            ids = {DNSRecord.parse(client.recv(4096)).header.id for _ in range(total)}
        self.assertEqual(ids, set(range(total)))

    def test_an_unexpected_error_pauses_the_listener_briefly_not_for_good(self):
        from dnsmirror.dns import server

        controller, _ = make_controller()
        readers = _Readers()
        with udp_pair(controller, readers=readers) as (listener, client):
            # as the reactor does when doRead raises: stop reading, then tell the listener
            readers.removeReader(listener)
            with self.assertLogs("dnsmirror.dns", logging.ERROR):
                listener.connectionLost(Failure(RuntimeError("a bug outside the per-query catch")))
            self.assertNotIn(listener, readers.readers)
            readers.advance(server._RESUME_AFTER)
            self.assertIn(listener, readers.readers)
            client.send(query(ECR))
            listener.doRead()
            self.assertEqual(str(DNSRecord.parse(client.recv(4096)).rr[0].rdata), "10.96.0.53")

    def test_an_answer_the_kernel_refuses_is_counted_and_the_next_is_sent(self):
        controller, _ = make_controller()
        answer_of = controller.handle

        def oversized_first(packet, client_host, reply, tcp=False):
            # the first answer is larger than any UDP datagram: sendto fails with EMSGSIZE
            if not oversized_first.done:
                oversized_first.done = True
                reply(b"\0" * 70_000)
                return
            answer_of(packet, client_host, reply, tcp)

        oversized_first.done = False
        controller.handle = oversized_first
        readers = _Readers()
        with udp_pair(controller, readers=readers) as (listener, client):
            client.send(query(ECR, qid=1))
            client.send(query(ECR, qid=2))
            with self.assertLogs("dnsmirror.dns", logging.WARNING) as logged:
                listener.doRead()
            self.assertEqual(DNSRecord.parse(client.recv(4096)).header.id, 2)
            self.assertIn("not sent", logged.output[0])
            # more refusals within the warning interval are counted, not logged
            oversized_first.done = False
            client.send(query(ECR, qid=3))
            with self.assertNoLogs("dnsmirror.dns", logging.WARNING):
                listener.doRead()
        self.assertEqual(controller.stats.unsent, 2)
        self.assertEqual(controller.stats.captured, 1)

    def test_the_reactor_shutting_down_closes_the_listener_quietly(self):
        controller, _ = make_controller()
        readers = _Readers()
        with udp_pair(controller, readers=readers) as (listener, _client):
            readers.running = False  # as during the reactor's shutdown, which disconnects every reader
            readers.removeReader(listener)
            listener.connectionLost(Failure(error.ConnectionLost()))
            self.assertTrue(listener.closed)
            self.assertEqual(readers.getDelayedCalls(), [])

    def test_a_query_that_raises_costs_that_query_only(self):
        controller, _ = make_controller()
        calls = []

        def broken(packet, host, reply, tcp=False):
            calls.append(packet)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            reply(b"answer")

        controller.handle = broken
        with udp_pair(controller) as (listener, client):
            client.send(b"first")
            client.send(b"second")
            listener.doRead()
            self.assertEqual(client.recv(4096), b"answer")
        self.assertEqual(controller.stats.malformed, 1)
        self.flushLoggedErrors()

    def test_tcp_framing_split_and_pipelined(self):
        controller, _ = make_controller()
        proto = DnsStreamProtocol(controller, clock=Clock())
        transport = StringTransport(peerAddress=type("A", (), {"host": "127.0.0.1"})())
        proto.makeConnection(transport)
        one, two = query(ECR, qid=1), query(ECR, qid=2)
        stream = struct.pack("!H", len(one)) + one + struct.pack("!H", len(two)) + two
        for i in range(0, len(stream), 7):
            proto.dataReceived(stream[i:i + 7])
        data = transport.value()
        ids = []
        while data:
            (length,) = struct.unpack_from("!H", data)
            ids.append(DNSRecord.parse(data[2:2 + length]).header.id)
            data = data[2 + length:]
        self.assertEqual(ids, [1, 2])
        proto.connectionLost(None)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=700))
    def test_no_bytes_raise_out_of_the_protocols(self, data):
        # the protocols catch any exception so a bug costs one query; here such a catch is a failure
        handled_bugs = []
        handler = logging.Handler(level=logging.ERROR)
        handler.emit = handled_bugs.append
        logger = logging.getLogger("dnsmirror.dns")
        logger.addHandler(handler)
        try:
            controller, forwarder = make_controller()
            with udp_pair(controller) as (listener, client):
                client.send(data)
                listener.doRead()
            tcp = DnsStreamProtocol(controller, clock=Clock())
            tcp.makeConnection(StringTransport(peerAddress=type("A", (), {"host": "127.0.0.1"})()))
            tcp.dataReceived(data)
            tcp.connectionLost(None)
        finally:
            logger.removeHandler(handler)
        assert handled_bugs == [], [record.getMessage() for record in handled_bugs]
        # every UDP datagram ends in exactly one outcome (forwards stay pending in the fake forwarder)
        stats = controller.stats
        assert stats.captured + stats.malformed + stats.rejected + len(forwarder.pending) >= 1


class AnswerMatchTests(SynchronousTestCase):
    def test_only_the_matching_answer_is_accepted(self):
        packet = query("example.com", qid=0x0A0B)
        question = packet[12:]
        answer = bytes(DNSRecord.parse(packet).reply().pack())
        self.assertFalse(matches(packet, question, with_id(answer, b"\x00\x01")))  # wrong ID
        other = bytes(DNSRecord.parse(query("evil.com", qid=0x0A0B)).reply().pack())
        self.assertFalse(matches(packet, question, other))  # right ID, wrong question
        self.assertFalse(matches(packet, question, packet))  # a query, not an answer
        self.assertTrue(matches(packet, question, answer))
        shouted = bytes(DNSRecord.parse(query("EXAMPLE.com", qid=0x0A0B)).reply().pack())
        self.assertTrue(matches(packet, question, shouted))  # names compare without case

    def test_the_type_is_compared_exactly(self):
        https = query("example.com", qid=7, qtype=65)  # HTTPS is 0x41, "A" in ASCII
        question = _question(https)
        other_type = bytes(DNSRecord.parse(query("example.com", qid=7, qtype=97)).reply().pack())
        self.assertFalse(matches(https, question, other_type))
        self.assertTrue(matches(https, question, bytes(DNSRecord.parse(https).reply().pack())))

    def test_an_answer_without_question_is_taken_only_as_a_bare_error(self):
        packet = query("example.com", qid=0x0A0B)
        question = _question(packet)
        formerr = bytes(DNSRecord(DNSHeader(id=0x0A0B, qr=1, rcode=RCODE.FORMERR)).pack())
        self.assertTrue(matches(packet, question, formerr))
        forged = DNSRecord(DNSHeader(id=0x0A0B, qr=1))
        forged.add_answer(RR("example.com", rdata=A("6.6.6.6")))
        self.assertFalse(matches(packet, question, bytes(forged.pack())))  # records, no question
        forged_error = DNSRecord(DNSHeader(id=0x0A0B, qr=1, rcode=RCODE.SERVFAIL))
        forged_error.add_answer(RR("example.com", rdata=A("6.6.6.6")))
        self.assertFalse(matches(packet, question, bytes(forged_error.pack())))


def tcp_client(controller, clock, host="127.0.0.1", factory=None):
    proto = factory.buildProtocol(type("A", (), {"host": host})()) if factory else DnsStreamProtocol(
        controller, clock=clock)
    if proto is None:
        return None, None
    transport = StringTransport(peerAddress=type("A", (), {"host": host})())
    proto.makeConnection(transport)
    return proto, transport


def framed(packet: bytes) -> bytes:
    return struct.pack("!H", len(packet)) + packet


class StreamLimitTests(SynchronousTestCase):
    def test_a_trickling_client_is_closed_at_the_message_deadline(self):
        controller, _ = make_controller()
        clock = Clock()
        proto, transport = tcp_client(controller, clock)
        message = framed(query(ECR))
        for byte in message[:4]:
            proto.dataReceived(bytes([byte]))
            clock.advance(2)  # one byte every 2 s: the old idle timer would never fire
        self.assertFalse(transport.disconnecting)
        clock.advance(DnsStreamProtocol.message_timeout)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(controller.stats.tcp_timeouts, 1)

    def test_idle_timer_restarts_only_after_a_whole_message(self):
        controller, _ = make_controller()
        clock = Clock()
        proto, transport = tcp_client(controller, clock)
        clock.advance(DnsStreamProtocol.idle_timeout - 1)
        proto.dataReceived(framed(query(ECR)))  # answered at once (captured)
        clock.advance(DnsStreamProtocol.idle_timeout - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_pipelined_queries_beyond_the_cap_wait_and_are_all_answered(self):
        controller, forwarder = make_controller()
        clock = Clock()
        proto, transport = tcp_client(controller, clock)
        count = MAX_TCP_QUERIES_PENDING * 3
        proto.dataReceived(b"".join(framed(query(f"host{i}.example.com", qid=i)) for i in range(count)))
        self.assertEqual(len(forwarder.pending), MAX_TCP_QUERIES_PENDING)
        self.assertEqual(transport.producerState, "paused")
        answered = 0
        while answered < len(forwarder.pending):
            packet, _, d = forwarder.pending[answered]
            d.callback(bytes(DNSRecord.parse(packet).reply().pack()))
            answered += 1
        self.assertEqual(answered, count)
        self.assertEqual(transport.producerState, "producing")
        data, ids = transport.value(), []
        while data:
            (length,) = struct.unpack_from("!H", data)
            ids.append(DNSRecord.parse(data[2:2 + length]).header.id)
            data = data[2 + length:]
        self.assertEqual(sorted(ids), list(range(count)))

    def test_connections_are_capped_in_total_and_per_client(self):
        controller, _ = make_controller()
        factory = DnsStreamFactory(controller, Clock(), ListenerCaps(total=3, per_client=2))
        first, first_transport = tcp_client(controller, None, "127.0.0.1", factory)
        second, _ = tcp_client(controller, None, "127.0.0.1", factory)
        self.assertIsNone(tcp_client(controller, None, "127.0.0.1", factory)[0])
        self.assertIsNotNone(tcp_client(controller, None, "127.0.0.2", factory)[0])
        # full: a newcomer takes the oldest idle connection of the address holding the most
        self.assertIsNotNone(tcp_client(controller, None, "127.0.0.3", factory)[0])
        self.assertTrue(first_transport.disconnecting)
        first.connectionLost(None)  # already let go of: counted once
        self.assertEqual(factory.table.total, 3)
        # one each now: nobody takes from anybody
        self.assertIsNone(tcp_client(controller, None, "127.0.0.4", factory)[0])
        self.assertEqual(controller.stats.tcp_refused, 2)

    def test_tcp_clients_get_what_the_forwarder_leaves_of_the_descriptors(self):
        # the forwarder's sockets to one upstream first: the rest for TCP clients, up to the fixed caps
        small = tcp_caps(225, 1)
        self.assertEqual(small.total, 225 - (4 * SOCKETS_PER_UPSTREAM + 1) - MAX_TCP_UPSTREAM)
        self.assertEqual(small.per_client, small.total // 8)
        self.assertLess(tcp_caps(225, 6).total, small.total)  # more upstreams, more sockets kept
        fixed = ListenerCaps(MAX_TCP_CONNECTIONS, MAX_TCP_CONNECTIONS_PER_CLIENT)
        self.assertEqual(tcp_caps(1 << 20, 6), fixed)
        self.assertEqual(tcp_caps(0, 1), ListenerCaps(4, 4))  # nothing left: a few all the same
        # two listeners share what the one forwarder leaves
        self.assertEqual(tcp_caps(225, 1, listeners=2).total, small.total // 2)

    def test_a_connection_answering_a_query_is_never_taken(self):
        controller, forwarder = make_controller()
        clock = Clock()
        factory = DnsStreamFactory(controller, clock, ListenerCaps(total=3, per_client=3))
        asking, asking_transport = tcp_client(controller, None, "127.0.0.1", factory)
        asking.dataReceived(framed(query("www.example.com", qid=7)))  # forwarded: its answer is pending
        self.assertEqual(len(forwarder.pending), 1)
        idle = [tcp_client(controller, None, "127.0.0.1", factory)[1] for _ in range(2)]
        clock.advance(OPENING_GRACE)  # the new ones sent nothing: no longer spared as opening
        newcomer, _ = tcp_client(controller, None, "127.0.0.2", factory)
        self.assertIsNotNone(newcomer)  # it took an idle one, not the one being answered
        self.assertTrue(idle[0].disconnecting)
        self.assertFalse(asking_transport.disconnecting or idle[1].disconnecting)
        self.assertIsNone(tcp_client(controller, None, "127.0.0.3", factory)[0])
        # answered: that connection is idle, and may be taken like the others
        self.assertEqual(factory.table.serving(), 1)
        packet, _, answer = forwarder.pending[0]
        answer.callback(packet)
        self.assertEqual(factory.table.serving(), 0)


class FastPathTests(SynchronousTestCase):
    def test_repeated_forwarded_queries_skip_the_parse_and_captured_ones_never_do(self):
        controller, forwarder = make_controller()
        responder = controller.responder
        for qid in (1, 2):
            self.assertEqual(ControllerTests.handle(self, controller, query("www.example.com", qid=qid)), [])
        self.assertEqual([p[:2] for p, _, _ in forwarder.pending], [b"\x00\x01", b"\x00\x02"])
        self.assertTrue(responder.known_forwarded(query("www.example.com", qid=9)))
        self.assertFalse(responder.known_forwarded(query(ECR, qid=9)))
        # other bytes: parsed again
        self.assertFalse(responder.known_forwarded(query("WWW.example.com", qid=9)))
        # a response or another opcode with the same question is not a plain query
        response = bytearray(query("www.example.com", qid=9))
        response[2] |= 0x80
        self.assertFalse(responder.known_forwarded(bytes(response)))


class ClientShareTests(SynchronousTestCase):
    def test_one_clients_flood_leaves_forwards_for_the_others(self):
        controller, forwarder = make_controller()
        controller.max_forwards_per_client = 3
        replies = []
        for i in range(5):
            controller.handle(query(f"h{i}.example.com", qid=i), "127.0.0.7", replies.append)
        self.assertEqual(len(forwarder.pending), 3)
        self.assertEqual([DNSRecord.parse(r).header.rcode for r in replies], [RCODE.SERVFAIL] * 2)
        self.assertEqual(controller.stats.overloaded, 2)
        controller.handle(query("other.example.com", qid=9), "127.0.0.8", replies.append)
        self.assertEqual(len(forwarder.pending), 4)  # another client still gets its forward
        packet, _, d = forwarder.pending[0]
        d.callback(bytes(DNSRecord.parse(packet).reply().pack()))
        controller.handle(query("h9.example.com", qid=10), "127.0.0.7", replies.append)
        self.assertEqual(len(forwarder.pending), 5)  # an answered forward frees the client's slot
