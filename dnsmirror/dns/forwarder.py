"""Asynchronous forwarding of raw query packets to the upstream resolvers.

What a fresh socket per query bought is kept without paying for it: UDP queries go out over a small
pool of connected sockets per upstream, each bound to its own kernel-chosen random port and replaced
after a few hundred queries or a few seconds, and every attempt carries a fresh random ID. An answer
is accepted only from the upstream it was sent to (the socket is connected, or it is the TCP
connection that asked), with that ID and the same question, on UDP and TCP alike.

Identical queries in flight (same bytes apart from the ID, same transport) are merged into one
upstream query. Sockets and forwards in flight are bounded: at most ``max_in_flight`` distinct
forwards (beyond that a query fails at once with :class:`Overloaded`), ``sockets_per_upstream`` UDP
sockets per upstream plus the ones draining after rotation, and ``max_tcp`` TCP connections upstream
(further TCP forwards wait for one).

Upstreams are tried in the order :class:`~dnsmirror.dns.upstreams.UpstreamTable` gives: the working
ones, fastest first. A timeout or a refusal marks an upstream down and moves to the next at once
(for a refusal) or after ``timeout``; a down upstream is probed in the background and used again once
it answers. Under epoll a connected UDP socket's ICMP refusal shows as an error on the socket, not as
input: :class:`_UdpChannel` reads it with ``SO_ERROR``.

The client's bytes (EDNS included) go upstream unchanged apart from the ID, and the upstream's bytes
come back unchanged apart from the ID: truncation, NXDOMAIN, CNAME chains and large answers pass
through as they are.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from dnsmirror.config import HostPort
from dnsmirror.dns.packets import HEADER_SIZE, question_end, with_id
from dnsmirror.dns.upstreams import UpstreamTable, describe
from dnsmirror.logs import fields

log = logging.getLogger("dnsmirror.dns")

MAX_TCP_MESSAGE = 65535
SOCKETS_PER_UPSTREAM = 4
ROTATE_AFTER_QUERIES = 256
ROTATE_AFTER_SECONDS = 10.0
MAX_IN_FLIGHT = 4096
MAX_TCP_UPSTREAM = 32
_SWEEP_INTERVAL = 0.05
_PROBE_TICK = 0.25
_READS_PER_WAKEUP = 256
# ". IN NS", recursion desired: any well-formed answer to it shows an upstream is answering
_PROBE_QUESTION = b"\x00\x00\x02\x00\x01"


class _NoConnector:
    def disconnect(self) -> None:
        pass


_HOLDS_TCP_SLOT = _NoConnector()


class AllUpstreamsFailed(Exception):
    """No upstream resolver answered in time."""


class Overloaded(Exception):
    """Too many forwards in flight: the query is not sent."""


class UpstreamTimeout(Exception):
    """One upstream did not answer within the timeout."""


class _RandomIds:
    """16-bit IDs from the system's CSPRNG, read a few thousand at a time (one syscall per 2,048 IDs)."""

    def __init__(self) -> None:
        self._values: list[int] = []

    def next(self) -> int:
        if not self._values:
            block = os.urandom(4096)
            self._values = [int.from_bytes(block[i : i + 2], "big") for i in range(0, len(block), 2)]
        return self._values.pop()


_random_ids = _RandomIds()


def _question(packet: bytes) -> bytes | None:
    end = question_end(packet)
    return _normal_question(packet[HEADER_SIZE:end]) if end is not None else None


def _normal_question(section: bytes) -> bytes:
    # names compare without case (RFC 4343); the type and class bytes exactly (0x41 is not 0x61)
    return section[:-4].lower() + section[-4:]


def matches(query: bytes, question: bytes | None, answer: bytes) -> bool:
    """True when ``answer`` answers ``query``: a response, same ID, and the same question.

    ``question`` is the query's question section as :func:`_question` gives it (``None`` when it has
    none). An answer without a question section is taken only as a bare error (some FORMERR replies):
    no records, so nothing in it can be a forged address.
    """
    if len(answer) < HEADER_SIZE or answer[:2] != query[:2] or not answer[2] & 0x80:
        return False
    if answer[4:6] == b"\x00\x00":
        return answer[3] & 0x0F != 0 and answer[6:10] == b"\x00\x00\x00\x00"
    # byte-equal (the name ignoring case) to the asked question: the same name, type and class
    return (
        question is not None
        and len(answer) >= HEADER_SIZE + len(question)
        and _normal_question(answer[HEADER_SIZE : HEADER_SIZE + len(question)]) == question
    )


class _Forward:
    """One upstream query and every client waiting for its answer."""

    __slots__ = ("packet", "tcp", "key", "question", "waiters", "order", "position", "errors")

    def __init__(self, packet: bytes, tcp: bool, key, order: list[int]) -> None:
        self.packet = packet
        self.tcp = tcp
        self.key = key
        self.question = _question(packet)
        self.waiters: list[tuple[bytes, Callable[[bytes], None], Callable[[Exception], None]]] = []
        self.order = order
        self.position = 0
        self.errors: list[str] = []


class _Attempt:
    """One query sent to one upstream (a client forward's attempt, or a health probe)."""

    __slots__ = (
        "forward",
        "index",
        "packet",
        "question",
        "sent_at",
        "deadline",
        "done",
        "channel",
        "qid",
        "connector",
    )

    def __init__(
        self,
        forward: _Forward | None,
        index: int,
        packet: bytes,
        question: bytes | None,
        now: float,
        timeout: float,
    ) -> None:
        self.forward = forward
        self.index = index
        self.packet = packet
        self.question = question
        self.sent_at = now
        self.deadline = now + timeout
        self.done = False
        self.channel: _UdpChannel | None = None
        self.qid = 0
        self.connector = None


@implementer(IReadDescriptor)
class _UdpChannel:
    """One connected UDP socket to one upstream, carrying many queries told apart by ID."""

    def __init__(self, forwarder: Forwarder, index: int, upstream: HostPort, now: float) -> None:
        self.forwarder = forwarder
        self.index = index
        family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            # connected: the kernel drops datagrams from any other source and reports refusals
            self.sock.connect((upstream.host, upstream.port))
        except OSError:
            self.sock.close()
            raise
        self.pending: dict[int, _Attempt] = {}
        self.uses = 0
        self.created = now
        self.retired = False
        self.closed = False
        forwarder.reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def logPrefix(self) -> str:
        return "dns-upstream"

    def send(self, attempt: _Attempt) -> str | None:
        """Send ``attempt`` with a random ID unused on this socket; the error text when it could not be
        sent."""
        for _ in range(16):
            qid = _random_ids.next()
            if qid not in self.pending:
                break
        else:
            return "no free query ID"
        packet = with_id(attempt.packet, qid.to_bytes(2, "big"))
        try:
            self.sock.send(packet)
        except OSError as exc:
            if self.retired and not self.pending:
                self.close()
            return _refusal_text(exc.errno)
        attempt.packet, attempt.qid, attempt.channel = packet, qid, self
        self.pending[qid] = attempt
        self.uses += 1
        return None

    def forget(self, attempt: _Attempt) -> None:
        self.pending.pop(attempt.qid, None)
        if self.retired and not self.pending:
            self.close()

    def doRead(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = self.sock.recv(MAX_TCP_MESSAGE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._broken(_refusal_text(exc.errno))
                return
            if len(data) < HEADER_SIZE:
                continue
            attempt = self.pending.get(int.from_bytes(data[:2], "big"))
            if attempt is not None and matches(attempt.packet, attempt.question, data):
                self.forwarder._answered(attempt, data)

    def connectionLost(self, reason: Failure) -> None:
        # epoll reports a pending socket error (an ICMP port unreachable) as a hang-up, not as input
        code = 0 if self.closed else self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._broken(_refusal_text(code) if code else "socket closed")

    def _broken(self, reason: str) -> None:
        self.forwarder._channel_broken(self)
        pending = list(self.pending.values())
        self.pending.clear()
        self.close()
        for attempt in pending:
            self.forwarder._failed(attempt, reason)

    def close(self) -> None:
        if not self.closed:
            self.forwarder.reactor.removeReader(self)
            self.closed = True
            self.sock.close()
            self.forwarder._pools[self.index].draining.discard(self)


def _refusal_text(code: int | None) -> str:
    if code == errno.ECONNREFUSED:
        return "refused"
    return os.strerror(code) if code else "socket error"


class _UdpPool:
    """Up to ``size`` channels to one upstream; each is retired after a number of queries or seconds."""

    def __init__(self, forwarder: Forwarder, index: int, upstream: HostPort, size: int) -> None:
        self.forwarder = forwarder
        self.index = index
        self.upstream = upstream
        self.size = size
        self.channels: list[_UdpChannel] = []
        self.draining: set[_UdpChannel] = set()

    def channel(self, now: float) -> _UdpChannel:
        """A channel to send one query on (a new socket while the pool is not full)."""
        if len(self.channels) < self.size:
            channel = _UdpChannel(self.forwarder, self.index, self.upstream, now)
            self.channels.append(channel)
        else:
            channel = self.channels[_random_ids.next() % len(self.channels)]
        if channel.uses + 1 >= ROTATE_AFTER_QUERIES or now - channel.created > ROTATE_AFTER_SECONDS:
            self.retire(channel)
        return channel

    def retire(self, channel: _UdpChannel) -> None:
        """No new queries on ``channel``; it closes once its last answer is in (or timed out)."""
        if channel in self.channels:
            self.channels.remove(channel)
        channel.retired = True
        if not channel.closed:
            self.draining.add(channel)

    def descriptors(self) -> int:
        return len(self.channels) + len(self.draining)

    def close(self) -> None:
        for channel in [*self.channels, *self.draining]:
            channel.close()
        self.channels, self.draining = [], set()


class _TcpAttemptProtocol(protocol.Protocol):
    """One query to one upstream over TCP (RFC 1035 two-byte length framing)."""

    transport: Any  # a TCP connection, once made

    def __init__(self, forwarder: Forwarder, attempt: _Attempt) -> None:
        self.forwarder = forwarder
        self.attempt = attempt
        self.buffer = b""

    def connectionMade(self) -> None:
        if self.attempt.done:
            self.transport.abortConnection()
            return
        self.transport.write(struct.pack("!H", len(self.attempt.packet)) + self.attempt.packet)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < 2:
            return
        (length,) = struct.unpack_from("!H", self.buffer)
        if len(self.buffer) < 2 + length:
            return
        answer = self.buffer[2 : 2 + length]
        self.transport.loseConnection()
        if self.attempt.done:
            return
        if matches(self.attempt.packet, self.attempt.question, answer):
            self.forwarder._answered(self.attempt, answer)
        else:
            self.forwarder._failed(self.attempt, "TCP answer does not match the query", mark_down=False)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.attempt.done:
            self.forwarder._failed(self.attempt, f"TCP connection lost: {reason.getErrorMessage()}")


class _TcpAttemptFactory(protocol.ClientFactory):
    def __init__(self, forwarder: Forwarder, attempt: _Attempt) -> None:
        self.forwarder = forwarder
        self.attempt = attempt

    def buildProtocol(self, addr):
        return _TcpAttemptProtocol(self.forwarder, self.attempt)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if not self.attempt.done:
            refused = "refused" if "refused" in reason.getErrorMessage().lower() else reason.getErrorMessage()
            self.forwarder._failed(self.attempt, refused)


class Forwarder:
    """Sends query packets to the working ``upstreams``, fastest first, until one answers."""

    def __init__(
        self,
        reactor,
        upstreams: Sequence[HostPort],
        timeout: float,
        *,
        sockets_per_upstream: int = SOCKETS_PER_UPSTREAM,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_tcp: int = MAX_TCP_UPSTREAM,
    ) -> None:
        self.reactor = reactor
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.table = UpstreamTable(len(self.upstreams))
        self._pools = [_UdpPool(self, i, u, sockets_per_upstream) for i, u in enumerate(self.upstreams)]
        self._in_flight: dict[tuple[bool, bytes], _Forward] = {}
        # TCP attempts by deadline; UDP attempts wait in their socket's pending dict, in the order sent
        self._tcp_attempts: deque[_Attempt] = deque()
        self._sweeper = None
        self._prober = None
        self._tcp_slots = defer.DeferredSemaphore(max_tcp)
        self._stopped = False
        # told of each upstream this forwarder found down or answering again: (index, up, reason)
        self.on_health: Callable[[int, bool, str], None] | None = None

    @property
    def in_flight(self) -> int:
        """Distinct forwards waiting for an upstream answer."""
        return len(self._in_flight)

    def descriptors(self) -> int:
        """UDP sockets open towards the upstreams (TCP connections are bounded by ``max_tcp``)."""
        return sum(pool.descriptors() for pool in self._pools)

    def forward(self, packet: bytes, tcp: bool = False) -> defer.Deferred:
        """Deferred firing with the upstream's answer carrying the client's ID."""
        waiting: defer.Deferred = defer.Deferred()
        self.send(bytes(packet), tcp, waiting.callback, waiting.errback)
        return waiting

    def send(
        self, packet: bytes, tcp: bool, answered: Callable[[bytes], None], failed: Callable[[Exception], None]
    ) -> None:
        """Forward ``packet``; exactly one of ``answered(answer with the client's ID)`` or
        ``failed(AllUpstreamsFailed | Overloaded)`` is called, now or later. (The hot path: no Deferred.)"""
        key = (tcp, packet[2:])
        running = self._in_flight.get(key)
        if running is not None:
            running.waiters.append((packet[:2], answered, failed))
            return
        if not self.upstreams:
            failed(AllUpstreamsFailed("no upstream resolvers configured"))
            return
        if len(self._in_flight) >= self.max_in_flight or self._stopped:
            failed(Overloaded(f"{len(self._in_flight)} forwards in flight"))
            return
        forward = _Forward(packet, tcp, key, self.table.order())
        forward.waiters.append((packet[:2], answered, failed))
        self._in_flight[key] = forward
        self._next(forward)

    def stop(self) -> None:
        """Close every socket; forwards in flight fail."""
        self._stopped = True
        for call in (self._sweeper, self._prober):
            if call is not None and call.active():
                call.cancel()
        self._sweeper = self._prober = None
        for attempt in [*self._tcp_attempts, *self._udp_attempts()]:
            if not attempt.done:
                self._failed(attempt, "forwarder stopped", mark_down=False)
        self._tcp_attempts.clear()
        for pool in self._pools:
            pool.close()

    # -- attempts

    def _next(self, forward: _Forward) -> None:
        """Start the next attempt of ``forward``, or fail it when every upstream was tried."""
        while forward.position < len(forward.order) and not self._stopped:
            index = forward.order[forward.position]
            forward.position += 1
            if forward.tcp:
                self._start_tcp(forward, index)
                return
            error = self._start_udp(forward, index)
            if error is None:
                return
            forward.errors.append(f"{self.upstreams[index]}: {error}")
            if error == "refused":
                self._mark_down(index, error)
        self._finish(forward, None)

    def _start_udp(self, forward: _Forward, index: int) -> str | None:
        now = self.reactor.seconds()
        attempt = _Attempt(forward, index, forward.packet, forward.question, now, self.timeout)
        try:
            channel = self._pools[index].channel(now)
        except OSError as exc:
            return _refusal_text(exc.errno)
        error = channel.send(attempt)
        if error is None and self._sweeper is None:
            self._sweeper = self.reactor.callLater(_SWEEP_INTERVAL, self._sweep)
        return error

    def _start_tcp(self, forward: _Forward, index: int) -> None:
        def connect(_):
            if self._stopped:
                self._tcp_slots.release()
                self._finish(forward, None)
                return
            upstream = self.upstreams[index]
            packet = with_id(forward.packet, _random_ids.next().to_bytes(2, "big"))
            attempt = _Attempt(forward, index, packet, forward.question, self.reactor.seconds(), self.timeout)
            # the slot is released once, by _complete, even if connecting fails before connectTCP returns
            attempt.connector = _HOLDS_TCP_SLOT
            attempt.connector = self.reactor.connectTCP(
                upstream.host, upstream.port, _TcpAttemptFactory(self, attempt), timeout=self.timeout
            )
            self._tcp_attempts.append(attempt)
            if self._sweeper is None:
                self._sweeper = self.reactor.callLater(_SWEEP_INTERVAL, self._sweep)

        self._tcp_slots.acquire().addCallback(connect).addErrback(
            lambda failure: log.error("TCP forward failed: %s", failure.getTraceback())
        )

    def _udp_attempts(self) -> list[_Attempt]:
        return [
            attempt
            for pool in self._pools
            for channel in [*pool.channels, *pool.draining]
            for attempt in channel.pending.values()
        ]

    def _sweep(self) -> None:
        """Fail the attempts whose time is up; runs every ``_SWEEP_INTERVAL`` while any is waiting."""
        self._sweeper = None
        now = self.reactor.seconds()
        expired = []
        waiting = False
        for pool in self._pools:
            for channel in [*pool.channels, *pool.draining]:
                # one timeout for all: each socket's pending dict is in deadline order
                for attempt in channel.pending.values():
                    if attempt.deadline > now:
                        waiting = True
                        break
                    expired.append(attempt)
        attempts = self._tcp_attempts
        while attempts and (attempts[0].done or attempts[0].deadline <= now):
            expired.append(attempts.popleft())
        for attempt in expired:
            if not attempt.done:
                self._failed(attempt, f"no answer in {self.timeout:g}s")
        if (waiting or attempts) and not self._stopped and self._sweeper is None:
            self._sweeper = self.reactor.callLater(_SWEEP_INTERVAL, self._sweep)

    def _complete(self, attempt: _Attempt) -> None:
        attempt.done = True
        if attempt.channel is not None:
            attempt.channel.forget(attempt)
        if attempt.connector is not None:
            attempt.connector.disconnect()
            self._tcp_slots.release()

    def _answered(self, attempt: _Attempt, answer: bytes) -> None:
        self._complete(attempt)
        if self.table.answered(attempt.index, self.reactor.seconds() - attempt.sent_at):
            log.info(
                "upstream resolver answers again",
                extra=fields(event="dns_upstream_up", upstream=str(self.upstreams[attempt.index])),
            )
            self._tell_health(attempt.index, True, "")
        if attempt.forward is not None:
            self._finish(attempt.forward, answer)

    def _failed(self, attempt: _Attempt, reason: str, mark_down: bool = True) -> None:
        self._complete(attempt)
        if mark_down:
            self._mark_down(attempt.index, reason, probe=attempt.forward is None)
        forward = attempt.forward
        if forward is not None:
            forward.errors.append(f"{self.upstreams[attempt.index]}: {reason}")
            self._next(forward)

    def _mark_down(self, index: int, reason: str, probe: bool = False) -> None:
        if self.table.failed(index, self.reactor.seconds(), reason, probe):
            log.warning(
                "upstream resolver skipped until it answers again",
                extra=fields(
                    event="dns_upstream_down",
                    upstream=str(self.upstreams[index]),
                    reason=reason,
                    upstreams=describe(self.upstreams, self.table),
                ),
            )
            self._tell_health(index, False, reason)
        self._probe_later()

    def _probe_later(self) -> None:
        if self._prober is None and not self._stopped:
            self._prober = self.reactor.callLater(_PROBE_TICK, self._probe_down)

    def _tell_health(self, index: int, up: bool, reason: str) -> None:
        if self.on_health is not None:
            try:
                self.on_health(index, up, reason)
            except Exception:
                log.exception("telling an upstream's health failed")

    def learned(self, index: int, up: bool, reason: str) -> None:
        """What another DNS process found out about upstream ``index``: it went down (skipped here too,
        and probed from here until it answers) or it answers again. Not told on (``on_health``)."""
        if not 0 <= index < len(self.upstreams):
            return
        if up:
            self.table.recovered(index)
        elif self.table.failed(index, self.reactor.seconds(), reason):
            log.debug("upstream resolver skipped, as another DNS process found: %s (%s)",
                      self.upstreams[index], reason)
            self._probe_later()

    def _finish(self, forward: _Forward, answer: bytes | None) -> None:
        if self._in_flight.get(forward.key) is forward:
            del self._in_flight[forward.key]
        for client_id, answered, failed in forward.waiters:
            try:
                if answer is None:
                    failed(AllUpstreamsFailed("; ".join(forward.errors) or "no upstream tried"))
                else:
                    answered(client_id + answer[2:])
            except Exception:
                log.exception("replying to a forwarded query failed")

    def _channel_broken(self, channel: _UdpChannel) -> None:
        self._pools[channel.index].retire(channel)

    # -- probes of down upstreams

    def _probe_down(self) -> None:
        self._prober = None
        if self._stopped:
            return
        now = self.reactor.seconds()
        for index in self.table.due_probes(now):
            packet = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + _PROBE_QUESTION
            attempt = _Attempt(None, index, packet, _question(packet), now, self.timeout)
            try:
                error = self._pools[index].channel(now).send(attempt)
            except OSError as exc:
                error = _refusal_text(exc.errno)
            if error is None:
                if self._sweeper is None:
                    self._sweeper = self.reactor.callLater(_SWEEP_INTERVAL, self._sweep)
            else:
                self.table.failed(index, now, error, probe=True)
        if self.table.down():
            self._prober = self.reactor.callLater(_PROBE_TICK, self._probe_down)
