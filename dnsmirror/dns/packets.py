"""Pure DNS packet handling for the capture decision: parse, decide, build answers.

No sockets here. :class:`Responder` turns a query packet into a :class:`Decision`; the hot path for
captured names is :meth:`Responder.cached_answer`, which answers repeated questions from packed bytes
without parsing (the answer to identical query bytes is identical, apart from the ID).
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from dnsmirror.patterns import HostMatcher

HEADER_SIZE = 12
# Answered empty for captured names, so no client learns alternative endpoints that bypass the mirror.
_EMPTY_FOR_CAPTURED = {QTYPE.HTTPS, QTYPE.SVCB}
_EDNS_PAYLOAD = 1232


class Action(enum.Enum):
    ANSWER = "answer"      # reply with Decision.packet
    FORWARD = "forward"    # send the query to the upstream resolvers
    DROP = "drop"          # malformed: no reply at all


@dataclass(frozen=True)
class Decision:
    action: Action
    packet: bytes = b""
    qname: str = ""
    qtype: int = 0
    # True when the name is captured but the mirror is down, so it is forwarded (fail open)
    fail_open: bool = False
    captured: bool = False


def question_end(packet: bytes) -> int | None:
    """Offset just past the first question (name, type, class), or ``None`` when malformed."""
    offset = HEADER_SIZE
    size = len(packet)
    for _ in range(128):
        if offset >= size:
            return None
        length = packet[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0 == 0xC0:
            offset += 2
            break
        if length & 0xC0:
            return None
        offset += 1 + length
    else:
        return None
    offset += 4
    return offset if offset <= size else None


def error_reply(query: bytes, rcode: int) -> bytes | None:
    """A reply with ``rcode`` built straight from the query's bytes (question echoed, no records).

    ``None`` when the query is too short to have an ID.
    """
    if len(query) < HEADER_SIZE:
        return None
    qid = query[:2]
    flags = query[2]
    rd = flags & 0x01
    opcode = flags & 0x78
    qdcount = struct.unpack_from("!H", query, 4)[0]
    end = question_end(query) if qdcount >= 1 else None
    question = query[HEADER_SIZE:end] if end is not None else b""
    header = qid + bytes([0x80 | opcode | rd, 0x80 | (rcode & 0x0F)]) + struct.pack(
        "!HHHH", 1 if question else 0, 0, 0, 0
    )
    return header + question


def plain_name(packet: bytes) -> bytes | None:
    """The wire-format name of a standard one-question query, lower-cased; ``None`` for anything else,
    and for a name with a compression pointer (whose bytes alone do not say which name it is)."""
    if len(packet) < HEADER_SIZE or packet[2] & 0xF8 or packet[4:6] != b"\x00\x01":
        return None
    offset, size = HEADER_SIZE, len(packet)
    while offset < size:
        length = packet[offset]
        if length == 0:
            # a name without compression pointers: its bytes alone say which name it is
            return packet[HEADER_SIZE:offset + 1].lower() if offset + 5 <= size else None
        if length & 0xC0:
            return None
        offset += 1 + length
    return None


def with_id(packet: bytes, qid: bytes) -> bytes:
    """``packet`` with its 2-byte ID replaced."""
    return qid + packet[2:]


class Responder:
    """Decides, for one query packet, whether dnsmirror answers it (captured) or forwards it.

    ``capture_enabled`` follows the mirror's health: when it is off, captured names are forwarded
    (fail open) and the answer cache is emptied. ``bypassed(name)``, if given, names single registries
    to forward as well (see :mod:`dnsmirror.bypass`); call :meth:`forget_answers` when it changes.
    """

    def __init__(
        self,
        matcher: HostMatcher,
        address: str | None,
        address6: str | None,
        ttl: int,
        cache_size: int = 4096,
        bypassed: Callable[[str], bool] | None = None,
    ) -> None:
        self.matcher = matcher
        self.bypassed = bypassed
        self.address = address
        self.address6 = address6
        self.ttl = ttl
        self.cache_size = cache_size
        self._answers: OrderedDict[bytes, bytes] = OrderedDict()
        # queries (past the header) about names no capture pattern matches: they skip the full parse
        self._forwarded_queries: set[bytes] = set()
        self._capture_enabled = False

    @property
    def capture_enabled(self) -> bool:
        return self._capture_enabled

    @capture_enabled.setter
    def capture_enabled(self, enabled: bool) -> None:
        if enabled != self._capture_enabled:
            self._answers.clear()
        self._capture_enabled = enabled

    def forget_answers(self) -> None:
        """Drop the remembered captured answers (a registry stopped being captured)."""
        self._answers.clear()

    def cached_answer(self, packet: bytes) -> bytes | None:
        """The captured answer for a query seen before in exactly these bytes (ID aside), or None."""
        cached = self._answers.get(packet[2:])
        if cached is None:
            return None
        return packet[:2] + cached

    def known_forwarded(self, packet: bytes) -> bool:
        """True for a standard query whose bytes past the header were seen before, naming (without
        compression) a name that no capture pattern matches."""
        return (len(packet) > HEADER_SIZE and not packet[2] & 0xF8 and packet[4:6] == b"\x00\x01"
                and packet[HEADER_SIZE:] in self._forwarded_queries)

    def decide(self, packet: bytes) -> Decision:
        """Parse ``packet`` and decide; never raises."""
        packet = bytes(packet)
        try:
            query = DNSRecord.parse(packet)
        except (DNSError, ValueError, IndexError, struct.error, UnicodeError):
            return Decision(Action.DROP)
        header = query.header
        if header.qr:
            return Decision(Action.DROP)
        if header.opcode != 0:
            return Decision(Action.ANSWER, error_reply(packet, RCODE.NOTIMP) or b"")
        if len(query.questions) != 1:
            return Decision(Action.ANSWER, error_reply(packet, RCODE.FORMERR) or b"")
        question = query.questions[0]
        qname = str(question.qname)
        qtype = question.qtype
        if not self.matcher.captures(qname):
            if plain_name(packet) is not None:
                if len(self._forwarded_queries) >= self.cache_size:
                    self._forwarded_queries.clear()
                self._forwarded_queries.add(packet[HEADER_SIZE:])
            return Decision(Action.FORWARD, qname=qname, qtype=qtype)
        if not self._capture_enabled or (self.bypassed is not None and self.bypassed(qname)):
            return Decision(Action.FORWARD, qname=qname, qtype=qtype, fail_open=True, captured=True)
        if qtype not in (QTYPE.A, QTYPE.AAAA) and qtype not in _EMPTY_FOR_CAPTURED:
            return Decision(Action.FORWARD, qname=qname, qtype=qtype)
        answer = self._build_answer(query, qtype)
        self._remember(packet, answer)
        return Decision(Action.ANSWER, answer, qname=qname, qtype=qtype, captured=True)

    def _build_answer(self, query: DNSRecord, qtype: int) -> bytes:
        reply = query.reply(ra=1, aa=0)
        qname = query.questions[0].qname
        if qtype == QTYPE.A and self.address:
            reply.add_answer(RR(qname, QTYPE.A, rdata=A(self.address), ttl=self.ttl))
        elif qtype == QTYPE.AAAA and self.address6:
            reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(self.address6), ttl=self.ttl))
        reply.header.ad = 0
        reply.header.cd = query.header.cd
        if any(rr.rtype == QTYPE.OPT for rr in query.ar):
            reply.add_ar(EDNS0(udp_len=_EDNS_PAYLOAD))
        return bytes(reply.pack())

    def _remember(self, packet: bytes, answer: bytes) -> None:
        self._answers[packet[2:]] = answer[2:]
        if len(self._answers) > self.cache_size:
            self._answers.popitem(last=False)
