"""The DNS controller and protocols with an in-memory forwarder and transports."""

from __future__ import annotations

import ipaddress
import logging
import struct

from dnslib import QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from dnsmirror.config import HostPort
from dnsmirror.dns.forwarder import AllUpstreamsFailed, _UdpAttempt
from dnsmirror.dns.packets import Responder, with_id
from dnsmirror.dns.server import DnsController, DnsDatagramProtocol, DnsStreamProtocol
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


class ProtocolTests(SynchronousTestCase):
    def test_udp_replies_to_the_sender(self):
        controller, _ = make_controller()
        proto = DnsDatagramProtocol(controller)
        written = []
        proto.transport = type("T", (), {"write": lambda self, data, addr: written.append((data, addr))})()
        proto.datagramReceived(query(ECR), ("127.0.0.5", 5555))
        self.assertEqual(written[0][1], ("127.0.0.5", 5555))
        self.assertEqual(str(DNSRecord.parse(written[0][0]).rr[0].rdata), "10.96.0.53")

    def test_tcp_framing_split_and_pipelined(self):
        controller, _ = make_controller()
        proto = DnsStreamProtocol(controller)
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
            udp = DnsDatagramProtocol(controller)
            udp.transport = type("T", (), {"write": lambda self, data, addr: None})()
            udp.datagramReceived(data, ("127.0.0.1", 1))
            tcp = DnsStreamProtocol(controller)
            tcp.makeConnection(StringTransport(peerAddress=type("A", (), {"host": "127.0.0.1"})()))
            tcp.dataReceived(data)
            tcp.connectionLost(None)
        finally:
            logger.removeHandler(handler)
        assert handled_bugs == [], [record.getMessage() for record in handled_bugs]
        # every UDP datagram ends in exactly one outcome (forwards stay pending in the fake forwarder)
        stats = controller.stats
        assert stats.captured + stats.malformed + stats.rejected + len(forwarder.pending) >= 1


class UdpAttemptTests(SynchronousTestCase):
    def test_only_the_matching_answer_is_accepted(self):
        packet = query("example.com", qid=0x0A0B)
        finished = defer.Deferred()
        attempt = _UdpAttempt(packet, HostPort("127.0.0.1", 53), finished)
        answer = bytes(DNSRecord.parse(packet).reply().pack())
        attempt.datagramReceived(with_id(answer, b"\x00\x01"), ("127.0.0.1", 53))  # wrong ID
        other = bytes(DNSRecord.parse(query("evil.com", qid=0x0A0B)).reply().pack())
        attempt.datagramReceived(other, ("127.0.0.1", 53))  # wrong question
        attempt.datagramReceived(packet, ("127.0.0.1", 53))  # a query, not an answer
        self.assertNoResult(finished)
        attempt.datagramReceived(answer, ("127.0.0.1", 53))
        self.assertEqual(self.successResultOf(finished), answer)
