"""Twisted UDP and TCP listeners of the DNS server, and the controller behind them.

The protocols only frame bytes; :class:`DnsController` applies the allow list, the capture decision
(:class:`~dnsmirror.dns.packets.Responder`) and forwarding (:class:`~dnsmirror.dns.forwarder.Forwarder`),
and counts every outcome. No input raises out of a protocol.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Callable, Sequence

from dnslib import RCODE
from twisted.internet import protocol
from twisted.protocols.policies import TimeoutMixin

from dnsmirror.config import IPNetwork
from dnsmirror.dns.forwarder import MAX_TCP_MESSAGE, AllUpstreamsFailed, Forwarder
from dnsmirror.dns.packets import HEADER_SIZE, Action, Responder, error_reply
from dnsmirror.dns.stats import DnsStats
from dnsmirror.logs import fields

log = logging.getLogger("dnsmirror.dns")

Reply = Callable[[bytes], None]
_ALLOW_CACHE_LIMIT = 4096


class DnsController:
    """What to do with one query packet from one client; replies through a callback."""

    def __init__(self, responder: Responder, forwarder: Forwarder, allow: Sequence[IPNetwork],
                 stats: DnsStats | None = None) -> None:
        self.responder = responder
        self.forwarder = forwarder
        self.allow = tuple(allow)
        self.stats = stats or DnsStats()
        self._allowed: dict[str, bool] = {}

    def is_allowed(self, host: str) -> bool:
        """True when a client at ``host`` may use this resolver (``dns.allow``)."""
        allowed = self._allowed.get(host)
        if allowed is None:
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return False
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            allowed = any(address in network for network in self.allow)
            if len(self._allowed) >= _ALLOW_CACHE_LIMIT:
                self._allowed.clear()
            self._allowed[host] = allowed
        return allowed

    def handle(self, packet: bytes, client_host: str, reply: Reply, tcp: bool = False) -> None:
        """Answer, forward, refuse or drop ``packet``; calls ``reply`` at most once."""
        if not self.is_allowed(client_host):
            self.stats.refused += 1
            refusal = error_reply(packet, RCODE.REFUSED)
            if refusal is not None and not packet[2] & 0x80:
                reply(refusal)
            return
        cached = self.responder.cached_answer(packet)
        if cached is not None:
            self.stats.captured += 1
            reply(cached)
            return
        decision = self.responder.decide(packet)
        if decision.action is Action.DROP:
            self.stats.malformed += 1
            return
        if decision.action is Action.ANSWER:
            if decision.captured:
                self.stats.captured += 1
            else:
                self.stats.rejected += 1
            reply(decision.packet)
            return
        if decision.fail_open:
            self.stats.fail_open += 1
        self._forward(packet, reply, tcp, decision.qname)

    def _forward(self, packet: bytes, reply: Reply, tcp: bool, qname: str) -> None:
        def answered(answer: bytes) -> None:
            self.stats.forwarded += 1
            reply(answer)

        def failed(failure) -> None:
            self.stats.servfail += 1
            if not failure.check(AllUpstreamsFailed):
                log.error("forwarding %s failed unexpectedly: %s", qname, failure.getTraceback())
            else:
                log.warning(
                    "all upstream resolvers failed", extra=fields(qname=qname, upstreams=str(failure.value))
                )
            servfail = error_reply(packet, RCODE.SERVFAIL)
            if servfail is not None:
                reply(servfail)

        self.forwarder.forward(packet, tcp=tcp).addCallbacks(answered, failed).addErrback(
            lambda f: log.error("replying failed: %s", f.getErrorMessage())
        )


class DnsDatagramProtocol(protocol.DatagramProtocol):
    """UDP listener: one datagram is one query."""

    def __init__(self, controller: DnsController) -> None:
        self.controller = controller

    def datagramReceived(self, data: bytes, addr) -> None:
        transport = self.transport
        try:
            self.controller.handle(data, addr[0], lambda answer: transport.write(answer, addr))
        except Exception:  # a bug must cost one query, not the listener
            self.controller.stats.malformed += 1
            log.exception("query from %s could not be handled", addr[0])


class DnsStreamProtocol(protocol.Protocol, TimeoutMixin):
    """TCP listener: length-prefixed queries, answered in any order; idle connections are closed."""

    idle_timeout = 30

    def __init__(self, controller: DnsController) -> None:
        self.controller = controller
        self.buffer = b""
        self.open = True

    def connectionMade(self) -> None:
        self.setTimeout(self.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack_from("!H", self.buffer)
            if len(self.buffer) < 2 + length:
                return
            packet, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            if length < HEADER_SIZE:
                self.controller.stats.malformed += 1
                continue
            try:
                self.controller.handle(packet, self.transport.getPeer().host, self._write, tcp=True)
            except Exception:  # a bug must cost one query, not the listener
                self.controller.stats.malformed += 1
                log.exception("TCP query could not be handled")

    def _write(self, answer: bytes) -> None:
        if self.open and len(answer) <= MAX_TCP_MESSAGE:
            self.transport.write(struct.pack("!H", len(answer)) + answer)

    def timeoutConnection(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.open = False
        self.setTimeout(None)


class DnsStreamFactory(protocol.Factory):
    def __init__(self, controller: DnsController) -> None:
        self.controller = controller

    def buildProtocol(self, addr):
        return DnsStreamProtocol(self.controller)


def listen(reactor, controller: DnsController, host: str, port: int) -> list:
    """Bind UDP and TCP on ``host:port``; returns the listening ports (raises CannotListenError)."""
    udp = reactor.listenUDP(port, DnsDatagramProtocol(controller), interface=host)
    try:
        tcp = reactor.listenTCP(port, DnsStreamFactory(controller), interface=host)
    except Exception:
        udp.stopListening()
        raise
    return [udp, tcp]

