"""Asynchronous forwarding of raw query packets to the upstream resolvers.

Each attempt uses a fresh random ID and a fresh UDP socket (so a fresh ephemeral source port);
an answer is accepted only from the upstream it was sent to, with that ID and the same question.
After ``timeout`` the next upstream is tried; when all fail the Deferred fails with
:class:`AllUpstreamsFailed`. The client's bytes (EDNS included) go upstream unchanged apart from the
ID, and the upstream's bytes come back unchanged apart from the ID: truncation, NXDOMAIN, CNAME chains
and large answers pass through as they are.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import Sequence

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.python.failure import Failure

from dnsmirror.config import HostPort
from dnsmirror.dns.packets import HEADER_SIZE, question_end, with_id

log = logging.getLogger("dnsmirror.dns")

MAX_TCP_MESSAGE = 65535


class AllUpstreamsFailed(Exception):
    """No upstream resolver answered in time."""


class UpstreamTimeout(Exception):
    """One upstream did not answer within the timeout."""


def _question(packet: bytes) -> bytes | None:
    end = question_end(packet)
    return packet[HEADER_SIZE:end].lower() if end is not None else None


class _UdpAttempt(protocol.DatagramProtocol):
    """One query to one upstream over a connected UDP socket of its own."""

    def __init__(self, packet: bytes, upstream: HostPort, finished: defer.Deferred) -> None:
        self.packet = packet
        self.upstream = upstream
        self.question = _question(packet)
        self.finished = finished

    def startProtocol(self) -> None:
        # connected UDP: the kernel drops datagrams from other sources and reports ICMP refusals
        self.transport.connect(self.upstream.host, self.upstream.port)
        self.transport.write(self.packet)

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.finished.called or len(data) < HEADER_SIZE:
            return
        if data[:2] != self.packet[:2] or not data[2] & 0x80:
            return
        # an answer without a question section (some FORMERR replies) cannot be checked further
        if struct.unpack_from("!H", data, 4)[0] and _question(data) != self.question:
            return
        self.finished.callback(data)

    def connectionRefused(self) -> None:
        if not self.finished.called:
            self.finished.errback(error.ConnectionRefusedError(str(self.upstream)))


class _TcpAttempt(protocol.Protocol):
    """One query to one upstream over TCP (RFC 1035 two-byte length framing)."""

    def __init__(self, packet: bytes, finished: defer.Deferred) -> None:
        self.packet = packet
        self.finished = finished
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(struct.pack("!H", len(self.packet)) + self.packet)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < 2:
            return
        (length,) = struct.unpack_from("!H", self.buffer)
        if len(self.buffer) >= 2 + length:
            answer = self.buffer[2 : 2 + length]
            self.transport.loseConnection()
            if not self.finished.called:
                if answer[:2] == self.packet[:2] and len(answer) >= HEADER_SIZE:
                    self.finished.callback(answer)
                else:
                    self.finished.errback(ValueError("TCP answer does not match the query"))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.finished.called:
            self.finished.errback(reason)


class Forwarder:
    """Sends query packets to ``upstreams`` in order until one answers."""

    def __init__(self, reactor: IReactorUDP | IReactorTCP | IReactorTime, upstreams: Sequence[HostPort],
                 timeout: float) -> None:
        self.reactor = reactor
        self.upstreams = tuple(upstreams)
        self.timeout = timeout

    @defer.inlineCallbacks
    def forward(self, packet: bytes, tcp: bool = False):
        """Deferred firing with the upstream's answer carrying the client's ID."""
        client_id = packet[:2]
        for upstream in self.upstreams:
            outgoing = with_id(packet, secrets.token_bytes(2))
            try:
                answer = yield (self._tcp(outgoing, upstream) if tcp else self._udp(outgoing, upstream))
            except defer.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure of one upstream means: try the next
                log.debug("upstream %s failed: %s", upstream, exc)
                continue
            return with_id(answer, client_id)
        raise AllUpstreamsFailed(
            ", ".join(str(u) for u in self.upstreams) or "no upstream resolvers configured"
        )

    def _udp(self, packet: bytes, upstream: HostPort) -> defer.Deferred:
        finished: defer.Deferred = defer.Deferred()
        attempt = _UdpAttempt(packet, upstream, finished)
        interface = "::" if ":" in upstream.host else "0.0.0.0"
        port = self.reactor.listenUDP(0, attempt, interface=interface)
        return self._bounded(finished, lambda: port.stopListening(), upstream)

    def _tcp(self, packet: bytes, upstream: HostPort) -> defer.Deferred:
        finished: defer.Deferred = defer.Deferred()
        factory = protocol.Factory.forProtocol(lambda: _TcpAttempt(packet, finished))
        connector = self.reactor.connectTCP(
            upstream.host, upstream.port, _OneShotClientFactory(factory, finished), timeout=self.timeout
        )
        return self._bounded(finished, connector.disconnect, upstream)

    def _bounded(self, finished: defer.Deferred, cleanup, upstream: HostPort) -> defer.Deferred:
        def on_timeout() -> None:
            if not finished.called:
                finished.errback(UpstreamTimeout(f"{upstream} did not answer in {self.timeout}s"))

        timer = self.reactor.callLater(self.timeout, on_timeout)

        def done(result):
            if timer.active():
                timer.cancel()
            cleanup()
            return result

        return finished.addBoth(done)


class _OneShotClientFactory(protocol.ClientFactory):
    def __init__(self, factory: protocol.Factory, finished: defer.Deferred) -> None:
        self.factory = factory
        self.finished = finished

    def buildProtocol(self, addr):
        return self.factory.buildProtocol(addr)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if not self.finished.called:
            self.finished.errback(reason)
