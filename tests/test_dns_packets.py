"""The capture decision and packet building, without sockets."""

from __future__ import annotations

import struct

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsmirror.dns.packets import Action, Responder, error_reply, question_end
from dnsmirror.patterns import HostMatcher

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


def responder(enabled: bool = True, address6: str | None = "fd00::53") -> Responder:
    r = Responder(
        HostMatcher(["*.dkr.ecr.*.amazonaws.com", "*-docker.pkg.dev"], skip=["9.dkr.ecr.x.amazonaws.com"]),
        "10.96.0.53",
        address6,
        ttl=7,
        cache_size=8,
    )
    r.capture_enabled = enabled
    return r


def query(name: str, qtype: str = "A", edns: bool = False, qid: int = 0x1234) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        record.add_ar(EDNS0(udp_len=4096))
    return bytes(record.pack())


def test_captured_a_answer():
    packet = query(ECR.upper() + ".")
    decision = responder().decide(packet)
    assert decision.action is Action.ANSWER and decision.captured
    reply = DNSRecord.parse(decision.packet)
    assert (
        reply.header.id == 0x1234 and reply.header.qr == 1 and reply.header.aa == 0 and reply.header.ra == 1
    )
    assert reply.header.rd == 1 and reply.header.rcode == RCODE.NOERROR
    assert str(reply.q.qname) == ECR.upper() + "."
    assert [(str(rr.rname), rr.rtype, str(rr.rdata), rr.ttl) for rr in reply.rr] == [
        (ECR.upper() + ".", QTYPE.A, "10.96.0.53", 7)
    ]


def test_captured_aaaa_with_and_without_ipv6_address():
    with_v6 = DNSRecord.parse(responder().decide(query(ECR, "AAAA")).packet)
    assert [str(rr.rdata) for rr in with_v6.rr] == ["fd00::53"]
    without = responder(address6=None).decide(query(ECR, "AAAA"))
    assert without.action is Action.ANSWER
    empty = DNSRecord.parse(without.packet)
    assert empty.header.rcode == RCODE.NOERROR and empty.rr == []


def test_captured_a_on_an_ipv6_only_node_is_empty_and_aaaa_answers():
    ipv6_only = Responder(HostMatcher(["*.dkr.ecr.*.amazonaws.com"]), None, "fd00::53", ttl=7)
    ipv6_only.capture_enabled = True
    a = ipv6_only.decide(query(ECR, "A"))
    assert a.action is Action.ANSWER and DNSRecord.parse(a.packet).rr == []
    assert [str(rr.rdata) for rr in DNSRecord.parse(ipv6_only.decide(query(ECR, "AAAA")).packet).rr] == [
        "fd00::53"
    ]


@pytest.mark.parametrize("qtype", ["HTTPS", "SVCB"])
def test_https_and_svcb_of_captured_names_are_empty(qtype):
    decision = responder().decide(query("us-docker.pkg.dev", qtype))
    reply = DNSRecord.parse(decision.packet)
    assert decision.action is Action.ANSWER and reply.header.rcode == RCODE.NOERROR and reply.rr == []


@pytest.mark.parametrize(("name", "qtype"), [(ECR, "MX"), (ECR, "TXT"), ("example.com", "A"),
                                             ("9.dkr.ecr.x.amazonaws.com", "A"), ("docker.pkg.dev", "A")])
def test_forwarded(name, qtype):
    decision = responder().decide(query(name, qtype))
    assert decision.action is Action.FORWARD and not decision.fail_open


def test_fail_open_forwards_captured_names_and_empties_the_cache():
    r = responder()
    packet = query(ECR)
    r.decide(packet)
    assert r.cached_answer(packet) is not None
    r.capture_enabled = False
    assert r.cached_answer(packet) is None
    decision = r.decide(packet)
    assert decision.action is Action.FORWARD and decision.fail_open and decision.captured
    r.capture_enabled = True
    assert r.decide(packet).action is Action.ANSWER


def test_cached_answer_patches_only_the_id():
    r = responder()
    first = r.decide(query(ECR, qid=1)).packet
    again = r.cached_answer(query(ECR, qid=0xBEEF))
    assert again == b"\xbe\xef" + first[2:]
    assert r.cached_answer(query(ECR, "AAAA", qid=1)) is None  # another question: not cached yet
    assert r.cached_answer(query(ECR, edns=True, qid=1)) is None  # other bytes: decided afresh


def test_edns_query_gets_an_opt_record():
    reply = DNSRecord.parse(responder().decide(query(ECR, edns=True)).packet)
    assert any(rr.rtype == QTYPE.OPT for rr in reply.ar)
    plain = DNSRecord.parse(responder().decide(query(ECR)).packet)
    assert plain.ar == []


def test_cache_is_bounded():
    r = responder()
    for i in range(20):
        r.decide(query(f"{i}.dkr.ecr.x.amazonaws.com"))
    assert len(r._answers) == 8


def test_malformed_and_unsupported():
    r = responder()
    assert r.decide(b"").action is Action.DROP
    assert r.decide(b"\x00" * 5).action is Action.DROP
    answer = DNSRecord.parse(r.decide(query(ECR)).packet)
    assert r.decide(bytes(answer.pack())).action is Action.DROP  # a response, not a query
    status = DNSRecord.question(ECR)
    status.header.opcode = 2
    notimp = r.decide(bytes(status.pack()))
    assert notimp.action is Action.ANSWER and DNSRecord.parse(notimp.packet).header.rcode == RCODE.NOTIMP
    two = DNSRecord.question(ECR)
    two.add_question(DNSRecord.question("example.com").q)
    formerr = r.decide(bytes(two.pack()))
    assert DNSRecord.parse(formerr.packet).header.rcode == RCODE.FORMERR


@pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED])
def test_error_reply_echoes_id_and_question(rcode):
    packet = query(ECR, "AAAA", edns=True, qid=777)
    reply = DNSRecord.parse(error_reply(packet, rcode))
    assert reply.header.id == 777 and reply.header.rcode == rcode and reply.header.qr == 1
    assert str(reply.q.qname) == ECR + "." and reply.q.qtype == QTYPE.AAAA
    assert reply.rr == [] and reply.ar == []


def test_question_end():
    packet = query("a.bc")
    assert question_end(packet) == 12 + len(b"\x01a\x02bc\x00") + 4
    assert question_end(packet[:-1]) is None
    assert question_end(b"\x00" * 12 + b"\x40") is None


def valid_queries():
    names = st.sampled_from([ECR, "us-docker.pkg.dev", "example.com", "a.b.c.d", "x" * 63 + ".io"])
    qtypes = st.sampled_from(["A", "AAAA", "HTTPS", "SVCB", "MX", "TXT", "ANY", "PTR"])
    return st.builds(query, names, qtypes, st.booleans(), st.integers(0, 0xFFFF))


@st.composite
def mutated_queries(draw):
    packet = bytearray(draw(valid_queries()))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "count"]))
        if kind == "flip" and packet:
            index = draw(st.integers(0, len(packet) - 1))
            packet[index] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del packet[draw(st.integers(0, len(packet))):]
        elif kind == "insert":
            index = draw(st.integers(0, len(packet)))
            packet[index:index] = draw(st.binary(max_size=20))
        elif kind == "count" and len(packet) >= 12:
            struct.pack_into("!H", packet, draw(st.sampled_from([4, 6, 8, 10])), draw(st.integers(0, 0xFFFF)))
    return bytes(packet)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=600), mutated_queries()))
def test_no_packet_makes_the_decision_raise(packet):
    r = responder()
    decision = r.decide(packet)
    assert decision.action in set(Action)
    if decision.action is Action.ANSWER:
        reply = DNSRecord.parse(decision.packet)
        assert reply.header.id == struct.unpack("!H", packet[:2])[0]
    for rcode in (RCODE.SERVFAIL, RCODE.REFUSED):
        reply = error_reply(packet, rcode)
        assert reply is None or reply[:2] == packet[:2]
