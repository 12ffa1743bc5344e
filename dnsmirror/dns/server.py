"""Twisted UDP and TCP listeners of the DNS server, and the controller behind them.

The protocols only frame bytes; :class:`DnsController` applies the allow list, the capture decision
(:class:`~dnsmirror.dns.packets.Responder`) and forwarding (:class:`~dnsmirror.dns.forwarder.Forwarder`),
and counts every outcome. No input raises out of a protocol.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from dnslib import RCODE, DNSRecord
from twisted.internet import error, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from dnsmirror.config import IPNetwork
from dnsmirror.dns.forwarder import (
    MAX_TCP_MESSAGE,
    MAX_TCP_UPSTREAM,
    SOCKETS_PER_UPSTREAM,
    AllUpstreamsFailed,
    Forwarder,
    Overloaded,
)
from dnsmirror.dns.packets import HEADER_SIZE, Action, Responder, error_reply
from dnsmirror.dns.stats import DnsStats
from dnsmirror.limits import ConnectionTable, ListenerCaps
from dnsmirror.logs import fields

log = logging.getLogger("dnsmirror.dns")

Reply = Callable[[bytes], None]
# forwards waiting for an upstream answer from one client address (the forwarder's own cap is 4,096)
MAX_FORWARDS_PER_CLIENT = 1024
_ALLOW_CACHE_LIMIT = 4096
# a UDP listener answers at most this many datagrams per wake-up, so its clients cannot starve TCP or the
# forwarder's sockets; what is left waits one loop iteration
_DATAGRAMS_PER_WAKEUP = 64
_MAX_DATAGRAM = 65535
_RESUME_AFTER = 0.1
# answers the kernel refused: one warning per this many seconds at most (each is counted)
_UNSENT_WARNING_EVERY = 10.0


class DnsController:
    """What to do with one query packet from one client; replies through a callback."""

    def __init__(
        self,
        responder: Responder,
        forwarder: Forwarder,
        allow: Sequence[IPNetwork],
        stats: DnsStats | None = None,
    ) -> None:
        self.responder = responder
        self.forwarder = forwarder
        self.allow = tuple(allow)
        self.stats = stats or DnsStats()
        self._allowed: dict[str, bool] = {}
        self.max_forwards_per_client = MAX_FORWARDS_PER_CLIENT
        self._forwards_of: dict[str, int] = {}
        self._last_failure_log = -1e9
        self._failures_not_logged = 0

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
        if self.responder.known_forwarded(packet):
            self._forward(packet, reply, tcp, "", client_host)
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
        self._forward(packet, reply, tcp, decision.qname, client_host)

    def _forward(self, packet: bytes, reply: Reply, tcp: bool, qname: str, client: str) -> None:
        waiting = self._forwards_of.get(client, 0)
        if waiting >= self.max_forwards_per_client:
            # one client's flood must not take every forward slot from the others
            self.stats.servfail += 1
            self.stats.overloaded += 1
            servfail = error_reply(packet, RCODE.SERVFAIL)
            if servfail is not None:
                reply(servfail)
            return
        self._forwards_of[client] = waiting + 1

        def release() -> None:
            left = self._forwards_of.get(client, 1) - 1
            if left > 0:
                self._forwards_of[client] = left
            else:
                self._forwards_of.pop(client, None)

        def answered(answer: bytes) -> None:
            release()
            self.stats.forwarded += 1
            reply(answer)

        def failed(failure) -> None:
            release()
            self.stats.servfail += 1
            if failure.check(Overloaded):
                self.stats.overloaded += 1
            elif not failure.check(AllUpstreamsFailed):
                log.error("forwarding %s failed unexpectedly: %s", qname, failure.getTraceback())
            else:
                self._log_all_failed(qname or _name_of(packet), str(failure.value))
            servfail = error_reply(packet, RCODE.SERVFAIL)
            if servfail is not None:
                reply(servfail)

        send = getattr(self.forwarder, "send", None)
        if send is not None:
            send(packet, tcp, answered, lambda exc: failed(Failure(exc)))
            return
        self.forwarder.forward(packet, tcp=tcp).addCallbacks(answered, failed).addErrback(
            lambda f: log.error("replying failed: %s", f.getErrorMessage())
        )

    def _log_all_failed(self, qname: str, upstreams: str) -> None:
        """One warning per second at most: an outage must not flood the log with one line per query."""
        now = time.monotonic()
        if now - self._last_failure_log < 1.0:
            self._failures_not_logged += 1
            return
        log.warning(
            "all upstream resolvers failed",
            extra=fields(qname=qname, upstreams=upstreams, more_since_last_warning=self._failures_not_logged),
        )
        self._last_failure_log, self._failures_not_logged = now, 0


def _name_of(packet: bytes) -> str:
    try:
        return str(DNSRecord.parse(packet).q.qname)
    except Exception:  # noqa: BLE001 - only for a log line
        return "?"


@implementer(IReadDescriptor)
class DatagramListener:
    """UDP listener on a bound, non-blocking socket: one datagram is one query, answered from the socket.

    It reads the socket itself rather than through Twisted's UDP port, whose per-datagram transport
    work and per-answer address check were a share of every query's CPU.
    """

    def __init__(self, reactor, sock: socket.socket, controller: DnsController) -> None:
        self.reactor = reactor
        self.socket = sock
        self.controller = controller
        self.closed = False
        self._unsent_warned_at = -_UNSENT_WARNING_EVERY
        sock.setblocking(False)
        reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self.closed else self.socket.fileno()

    def logPrefix(self) -> str:
        return "dns-udp"

    def doRead(self) -> None:
        """Answer the datagrams waiting, at most ``_DATAGRAMS_PER_WAKEUP`` before other sockets' turn."""
        sock = self.socket
        handle = self.controller.handle
        stats = self.controller.stats
        for _ in range(_DATAGRAMS_PER_WAKEUP):
            try:
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # an error queued on the socket costs that read only
                log.debug("UDP read failed: %s", exc)
                continue

            def reply(answer: bytes, addr=addr) -> None:
                try:
                    sock.sendto(answer, addr)
                except OSError as exc:  # a full send buffer or a vanished client costs this answer only
                    stats.unsent += 1
                    self._warn_unsent(addr[0], exc)

            try:
                handle(data, addr[0], reply)
            except Exception:
                self.controller.stats.malformed += 1
                log.exception("query from %s could not be handled", addr[0])

    def _warn_unsent(self, client: str, exc: OSError) -> None:
        """At most one warning per ``_UNSENT_WARNING_EVERY`` seconds, naming the latest client and error."""
        now = self.reactor.seconds()
        if now - self._unsent_warned_at < _UNSENT_WARNING_EVERY:
            return
        self._unsent_warned_at = now
        log.warning(
            "DNS answer to %s not sent: %s (%d not sent since start)",
            client, exc, self.controller.stats.unsent,
            extra=fields(event="dns_answer_unsent", client=client, reason=str(exc)),
        )

    def connectionLost(self, reason: Failure) -> None:
        """The reactor stopped reading after an error it did not expect: read again shortly, so a bug
        costs the datagram it met, not the node's DNS (at most one error log per ``_RESUME_AFTER``).
        When the reactor itself shuts down, the socket is closed."""
        if self.closed or not self.reactor.running:
            self.stopListening()
            return
        log.error("DNS UDP listener failed, reading again in %gs: %s", _RESUME_AFTER, reason.value)
        self.reactor.callLater(_RESUME_AFTER, self._resume)

    def _resume(self) -> None:
        if not self.closed:
            self.reactor.addReader(self)

    def stopListening(self) -> None:
        """Stop reading and close the socket."""
        if not self.closed:
            self.reactor.removeReader(self)
            self.closed = True
            self.socket.close()


def bind_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets bound to ``host:port`` (TCP listening); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        for sock in (udp, tcp):
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((host, port))
        tcp.bind((host, udp.getsockname()[1] if port == 0 else port))
        tcp.listen(128)
        for sock in (udp, tcp):
            sock.setblocking(False)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


# TCP clients: at most this many connections in all and from one address; a connection may have this
# many queries waiting for an answer before it is read no further (RFC 7766 pipelining stays bounded)
MAX_TCP_CONNECTIONS = 256
MAX_TCP_CONNECTIONS_PER_CLIENT = 32
MIN_TCP_CONNECTIONS = 4
MAX_TCP_QUERIES_PENDING = 64
# descriptors the DNS takes besides its TCP clients and the forwarder's sockets: stdio, epoll, logs
DNS_START_OVERHEAD = 16


def tcp_caps(descriptors: int, upstreams: int, listeners: int = 1) -> ListenerCaps:
    """Each of ``listeners`` TCP listeners' caps when ``descriptors`` are free for the DNS: the one
    forwarder's sockets to ``upstreams`` (UDP pools with the channels still draining after rotation, TCP
    forwards, probes) are kept first, so a flood of TCP clients cannot take the sockets forwarded queries
    need; the listeners share the rest, each up to :data:`MAX_TCP_CONNECTIONS`, an eighth of its share (at
    most 32) per client address."""
    forwarder = upstreams * (4 * SOCKETS_PER_UPSTREAM + 1) + MAX_TCP_UPSTREAM
    share = (descriptors - forwarder) // max(listeners, 1)
    total = max(min(MAX_TCP_CONNECTIONS, share), MIN_TCP_CONNECTIONS)
    per_client = min(max(total // 8, MIN_TCP_CONNECTIONS), MAX_TCP_CONNECTIONS_PER_CLIENT)
    return ListenerCaps(total, per_client)


class DnsStreamProtocol(protocol.Protocol):
    """TCP listener: length-prefixed queries, answered in any order.

    A connection is closed when it stays idle for ``idle_timeout`` between messages, or when a message
    that has started does not arrive whole within ``message_timeout``: a client trickling bytes cannot
    hold it open. At most ``MAX_TCP_QUERIES_PENDING`` queries are worked on at once per connection.
    """

    idle_timeout = 30.0
    message_timeout = 10.0
    transport: Any  # a TCP connection: an ITransport that is also an IPushProducer

    def __init__(
        self, controller: DnsController, factory: DnsStreamFactory | None = None, clock=None
    ) -> None:
        self.controller = controller
        self.factory = factory
        self.clock = clock
        self.buffer = b""
        self.open = True
        self.pending = 0
        self.paused = False
        self._timer: Any = None  # the IDelayedCall of the connection's one timer, while it runs
        self._timer_kind = ""

    def connectionMade(self) -> None:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._parse()

    def _parse(self) -> None:
        while self.open and len(self.buffer) >= 2 and self.pending < MAX_TCP_QUERIES_PENDING:
            (length,) = struct.unpack_from("!H", self.buffer)
            if len(self.buffer) < 2 + length:
                break
            packet, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            if length < HEADER_SIZE:
                self.controller.stats.malformed += 1
                continue
            self._pending_change(+1)
            try:
                self.controller.handle(packet, self.transport.getPeer().host, self._answer_once(), tcp=True)
            except Exception:
                self._pending_change(-1)
                self.controller.stats.malformed += 1
                log.exception("TCP query could not be handled")
        full = self.pending >= MAX_TCP_QUERIES_PENDING
        if full != self.paused and self.open:
            self.paused = full
            (self.transport.pauseProducing if full else self.transport.resumeProducing)()
        self._arm()

    def _pending_change(self, change: int) -> None:
        """One more (+1) or one fewer (-1) query waiting for its answer; the factory hears when the
        connection starts or stops answering (a connection answering is never taken for another)."""
        before = self.pending
        self.pending += change
        if self.factory is not None and (before == 0) != (self.pending == 0):
            self.factory.answering(self, self.pending > 0)

    def _answer_once(self) -> Reply:
        answered = False

        def reply(answer: bytes) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            self._pending_change(-1)
            self._write(answer)
            if self.open and (self.paused or self.buffer):
                self._parse()
            elif self.open:
                self._arm()

        return reply

    def _arm(self) -> None:
        """The one timer of this connection: a message under way must finish, an idle one is closed."""
        if not self.open:
            return
        if self.buffer and not self.paused:
            kind, seconds = "message", self.message_timeout
        elif not self.pending and not self.buffer:
            kind, seconds = "idle", self.idle_timeout
        else:
            kind, seconds = "", 0.0  # answers are under way: the forwarder bounds how long they take
        if kind == self._timer_kind and (not kind or self._timer.active()):
            # an idle timer restarts only after a whole message; a message timer never restarts
            if kind == "idle":
                self._timer.reset(seconds)
            return
        self._cancel_timer()
        self._timer_kind = kind
        if kind:
            self._timer = self.clock.callLater(seconds, self._expired, kind)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer, self._timer_kind = None, ""

    def _expired(self, kind: str) -> None:
        self._timer, self._timer_kind = None, ""
        if kind == "message":
            self.controller.stats.tcp_timeouts += 1
        self.transport.loseConnection()

    def _write(self, answer: bytes) -> None:
        if self.open and len(answer) <= MAX_TCP_MESSAGE:
            self.transport.write(struct.pack("!H", len(answer)) + answer)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.open = False
        self._cancel_timer()
        if self.factory is not None:
            self.factory.closed(self)


class DnsStreamFactory(protocol.Factory):
    """Builds the TCP protocol within the caps, in total and per client address. When full, a newcomer
    takes an idle connection (no query being answered) as the mirror's listeners do
    (:class:`~dnsmirror.limits.ConnectionTable`): a flood of idle connections from many addresses cannot
    shut out a client that sends queries."""

    def __init__(self, controller: DnsController, clock, caps: ListenerCaps) -> None:
        """``caps`` from :func:`tcp_caps`; ``clock`` None is the global reactor."""
        self.controller = controller
        self.clock = clock
        self.table = ConnectionTable(caps)

    def _now(self) -> float:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        return float(self.clock.seconds())

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        now = self._now()
        admitted, victim = self.table.admit(host, now)
        if not admitted:
            self.controller.stats.tcp_refused += 1
            return None  # the connection is closed at once
        if victim is not None:
            self.table.remove(victim)  # at once: its connectionLost comes later
            victim.transport.abortConnection()
        proto = DnsStreamProtocol(self.controller, self, self.clock)
        self.table.add(host, proto, now)
        return proto

    def answering(self, proto: DnsStreamProtocol, busy: bool) -> None:
        """``proto`` starts (``busy``) or ends answering queries: a connection answering is never taken."""
        self.table.mark(proto, busy, self._now())

    def closed(self, proto: DnsStreamProtocol) -> None:
        self.table.remove(proto)


def listen(reactor, controller: DnsController, host: str, port: int, caps: ListenerCaps) -> list:
    """Bind UDP and TCP on ``host:port``, TCP within ``caps`` (:func:`tcp_caps`); returns the listening
    ports (raises CannotListenError)."""
    try:
        udp_socket, tcp_socket = bind_sockets(host, port)
    except OSError as exc:
        raise error.CannotListenError(host, port, exc) from exc
    udp = DatagramListener(reactor, udp_socket, controller)
    try:
        factory = DnsStreamFactory(controller, reactor, caps)
        tcp = reactor.adoptStreamPort(tcp_socket.fileno(), tcp_socket.family, factory)
    except Exception:
        udp.stopListening()
        raise
    finally:
        tcp_socket.close()  # the adopted port holds its own duplicate
    return [udp, tcp]
