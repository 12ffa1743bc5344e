"""Bounds on what clients may hold: the descriptor budget, connection caps per listener, header deadlines.

Every connection a client opens costs a file descriptor, and so does every upstream connection, cache
file and forwarded DNS query the mirror opens for its clients. Without bounds, one client opening idle
connections takes the descriptors that another client's pull and the node's DNS need, and everything
fails with "too many open files". So:

- at start the soft ``RLIMIT_NOFILE`` is raised to the hard limit (:func:`raise_descriptor_limit`);
- :func:`plan_budget` (pure) splits the descriptors left after start between the DNS, the listeners (a
  total cap and a cap per client address each) and a reserve for what the mirror opens on behalf of the
  connections it admitted (upstream and peer connections, cache files);
- :class:`ConnectionLimiter` enforces a listener's caps when a connection is accepted. A client address at
  its cap is refused. When the listener is full, a newcomer may take an idle connection (no request in
  progress) from another address, preferring addresses that never sent a request, then by fair share
  (:class:`ConnectionTable`); otherwise it is refused. A connection serving a request is never taken: a
  flood of idle connections must not cut another client's download. Refusals are logged once per
  :data:`REFUSAL_LOG_PERIOD` with their count, never one line per connection;
- :func:`with_header_deadline` gives an HTTP channel a deadline for a request's whole header, from its
  first byte (twisted.web's own timeout is an idle timer, which a client sending one byte at a time resets),
  and marks its connection busy for the limiter from a request's header to the end of its response.
"""

from __future__ import annotations

import logging
import os
import resource
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import Any, cast

from twisted.internet import address as tw_address
from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime, ITCPTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from dnsmirror.logs import fields

log = logging.getLogger("dnsmirror.limits")

# descriptors taken at start besides those counted then: listeners, thread pools, the store, log files
START_OVERHEAD = 32
# kept for the DNS: forwarded queries in flight and TCP DNS connections (a share of the free descriptors)
DNS_SHARE = 0.125
MIN_DNS = 32
# what one busy connection of a listener may cost besides its own socket: for HTTPS an upstream (or peer)
# connection, the fill's cache file and a cache reader; for the peer listener a cache reader
EXTRA_PER_CONNECTION = {"https": 3, "peers": 1, "metrics": 0}
# shares of the remaining descriptors, each listener's connections counted with what they may cost
WEIGHTS = {"https": 6, "peers": 3, "metrics": 1}
# the listeners the budget shares descriptors between
LISTENERS = tuple(WEIGHTS)
# one client address may hold this share of a listener's connections, at least MIN_PER_CLIENT
PER_CLIENT_SHARE = 0.25
MIN_PER_CLIENT = 16
MAX_PER_CLIENT = 4096
MIN_CONNECTIONS = 4
REFUSAL_LOG_PERIOD = 10.0
# an address that sent a whole request header is preferred to one that never did, for this long
KNOWN_FOR = 600.0
MAX_KNOWN = 4096
# a known address's new connection is not taken this long before its first request (TLS handshake)
OPENING_GRACE = 10.0
# at most this many of a known address's new connections are spared at once
SPARED_OPENING = 4
# how many of a holder's idle connections one admission looks at for one that may be taken
MAX_VICTIM_SCAN = 64
# a request's header must arrive whole within this many seconds of its first byte
HEADER_DEADLINE = 20.0
# New connections per second one address may open to the peer listener, and how many at once. A node's
# peer clients keep at most a dozen connections to each peer and reuse them; a host opening hundreds a
# second is a flood, which would otherwise take the event loop (0.15 ms of CPU per plain request refused,
# about 0.5 ms per TLS handshake). A peer refused goes on to other holders and upstream.
PEER_CONNECTIONS_PER_SECOND = 20.0
PEER_CONNECTIONS_BURST = 100
# with an unlimited hard limit the soft limit is raised to this
UNLIMITED_TARGET = 1 << 20


@dataclass(frozen=True)
class DescriptorLimit:
    """The process's descriptor limit before and after :func:`raise_descriptor_limit`."""

    soft_before: int
    soft: int
    hard: int


def raise_descriptor_limit() -> DescriptorLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (as far as the kernel allows) and log both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_TARGET)
    raised = soft
    if soft == resource.RLIM_INFINITY:
        raised = target
    elif target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            raised = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc,
                        extra=fields(event="nofile_limit", soft=soft, hard=hard))
    limit = DescriptorLimit(soft, raised, hard if hard != resource.RLIM_INFINITY else -1)
    log.info(
        "descriptor limit: soft %d (was %d), hard %s",
        limit.soft,
        limit.soft_before,
        "unlimited" if limit.hard < 0 else limit.hard,
        extra=fields(event="nofile_limit", soft=limit.soft, soft_before=limit.soft_before, hard=limit.hard),
    )
    return limit


def current_limit() -> int:
    """The soft descriptor limit now (an unlimited one counts as :data:`UNLIMITED_TARGET`)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def descriptors_in_use() -> int:
    """How many descriptors this process holds now (0 where ``/proc`` is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass(frozen=True)
class ListenerCaps:
    """How many connections one listener may hold in all, and per client address."""

    total: int
    per_client: int


@dataclass(frozen=True)
class DescriptorBudget:
    """What the descriptor limit allows: connection caps per listener, the rest kept in reserve."""

    limit: int
    in_use: int
    # for what admitted connections open (upstream and peer connections, cache files) and the DNS
    reserve: int
    dns: int  # of the reserve: kept for the DNS (forwarded queries in flight, TCP DNS connections)
    listeners: dict[str, ListenerCaps]

    def caps(self, listener: str) -> ListenerCaps:
        return self.listeners[listener]

    def summary(self) -> str:
        """One line for the log."""
        listeners = ", ".join(f"{name} {caps.total} connections ({caps.per_client} per client address)"
                              for name, caps in self.listeners.items())
        return (f"{self.limit} descriptors, {self.in_use} in use at start: {listeners}; "
                f"{self.dns} kept for the DNS")

    def describe(self) -> dict[str, object]:
        """The plan as log fields."""
        return {"limit": self.limit, "in_use": self.in_use, "reserve": self.reserve, "dns": self.dns,
                **{f"{name}_connections": caps.total for name, caps in self.listeners.items()},
                **{f"{name}_per_client": caps.per_client for name, caps in self.listeners.items()}}


def plan_budget(
    limit: int, in_use: int, listeners: tuple[str, ...] = LISTENERS
) -> DescriptorBudget:
    """Split ``limit`` descriptors. What is in use at start (plus :data:`START_OVERHEAD`) is taken; of the
    rest, :data:`DNS_SHARE` is kept for the DNS, and the remainder goes to ``listeners`` by
    :data:`WEIGHTS`, each connection counted with its :data:`EXTRA_PER_CONNECTION`. So the reserve (all but
    the connections themselves) covers what the mirror opens for every connection it admitted, and
    the DNS's share stays free whatever the listeners hold."""
    free = max(limit - in_use - START_OVERHEAD, 0)
    dns = min(max(int(free * DNS_SHARE), MIN_DNS), free)
    for_listeners = free - dns
    weight = sum(WEIGHTS[name] for name in listeners) or 1
    caps = {}
    for name in listeners:
        share = for_listeners * WEIGHTS[name] // weight
        total = max(share // (1 + EXTRA_PER_CONNECTION[name]), MIN_CONNECTIONS)
        per_client = min(max(int(total * PER_CLIENT_SHARE), MIN_PER_CLIENT), MAX_PER_CLIENT, total)
        caps[name] = ListenerCaps(total, per_client)
    reserve = free - sum(cap.total for cap in caps.values())
    return DescriptorBudget(limit, in_use, reserve, dns, caps)


@dataclass
class _Held:
    """What the table knows of one connection."""

    client: str
    accepted_at: float
    served: bool = False  # a request has started on it


class ConnectionTable:
    """Who holds which connections of one listener, which of them serve a request, and the admission
    decision (pure; no sockets, the time is passed in).

    ``admit(client, now)`` answers ``(True, None)``, ``(True, victim)`` where ``victim`` is a connection to
    close first, or ``(False, None)``. Connections start idle; :meth:`mark` says when one starts and ends
    serving a request. When the listener is full:

    - a connection serving a request is never taken;
    - an address that sent a whole request header in the last :data:`KNOWN_FOR` seconds is *known*. A
      newcomer from a known address takes an idle connection of an address that is not (one that only
      holds sockets gives way to one that talks HTTP), from the one holding the most;
    - otherwise the address holding the most idle connections gives its oldest, if it holds at least two
      more than the newcomer (fair share of what nobody uses; the margin keeps two holders from taking
      from each other in turn). A known address's new connections are spared for their first
      :data:`OPENING_GRACE` seconds, until their first request (their TLS handshakes are under way), as
      long as it has at most :data:`SPARED_OPENING` of them."""

    def __init__(self, caps: ListenerCaps) -> None:
        self.caps = caps
        self.held_by: dict[object, _Held] = {}
        # per client address, idle connections with the longest idle first; empty entries are dropped
        self.idle: dict[str, OrderedDict[object, None]] = {}
        self.busy: dict[str, set[object]] = {}
        # address -> when it last sent a whole request header, the least recent first
        self.known: OrderedDict[str, float] = OrderedDict()

    @property
    def total(self) -> int:
        return len(self.held_by)

    def serving(self) -> int:
        """How many connections serve a request now."""
        return sum(len(connections) for connections in self.busy.values())

    def held(self, client: str) -> int:
        """How many connections ``client`` holds, idle or busy."""
        return len(self.idle.get(client, ())) + len(self.busy.get(client, ()))

    def is_known(self, client: str, now: float) -> bool:
        seen = self.known.get(client)
        return seen is not None and now - seen < KNOWN_FOR

    def admit(self, client: str, now: float) -> tuple[bool, object | None]:
        if self.held(client) >= self.caps.per_client:
            return False, None
        if self.total < self.caps.total:
            return True, None
        victim = self._victim(client, now)
        return victim is not None, victim

    def _victim(self, client: str, now: float) -> object | None:
        if self.is_known(client, now):
            unknown = [other for other in self.idle if not self.is_known(other, now)]
            if unknown:
                return next(iter(self.idle[max(unknown, key=lambda other: len(self.idle[other]))]))
        mine = len(self.idle.get(client, ()))
        biggest = max(self.idle, key=lambda other: len(self.idle[other]), default=None)
        if biggest is None or len(self.idle[biggest]) <= mine + 1:
            return None
        if not self.is_known(biggest, now):
            return next(iter(self.idle[biggest]))
        opening = []
        for connection in islice(self.idle[biggest], MAX_VICTIM_SCAN):
            held = self.held_by[connection]
            if held.served or now - held.accepted_at >= OPENING_GRACE:
                return connection
            opening.append(connection)
        # a client opens a few connections at once; more than that opening together are a flood's
        return opening[0] if len(opening) > SPARED_OPENING else None

    def add(self, client: str, connection: object, now: float) -> None:
        self.held_by[connection] = _Held(client, now)
        self.idle.setdefault(client, OrderedDict())[connection] = None

    def mark(self, connection: object, busy: bool, now: float) -> None:
        """``connection`` starts (``busy``) or ends serving a request; unknown connections are ignored."""
        held = self.held_by.get(connection)
        if held is None:
            return
        client = held.client
        idle, serving = self.idle.get(client), self.busy.get(client)
        if busy and idle is not None and connection in idle:
            held.served = True
            self.known[client] = now
            self.known.move_to_end(client)
            while len(self.known) > MAX_KNOWN:
                self.known.popitem(last=False)
            del idle[connection]
            if not idle:
                del self.idle[client]
            self.busy.setdefault(client, set()).add(connection)
        elif not busy and serving is not None and connection in serving:
            serving.discard(connection)
            if not serving:
                del self.busy[client]
            self.idle.setdefault(client, OrderedDict())[connection] = None

    def remove(self, connection: object) -> None:
        held = self.held_by.pop(connection, None)
        if held is None:
            return
        idle, serving = self.idle.get(held.client), self.busy.get(held.client)
        if idle is not None and connection in idle:
            del idle[connection]
            if not idle:
                del self.idle[held.client]
        elif serving is not None:
            serving.discard(connection)
            if not serving:
                del self.busy[held.client]


def client_address(addr: object) -> str:
    """The client's IP address (one key per address, whatever the port); a UNIX socket is one client."""
    if isinstance(addr, tw_address.IPv4Address | tw_address.IPv6Address):
        return addr.host
    return str(addr)


class _Limited(ProtocolWrapper):
    """A connection the limiter admitted; its table knows whose it is."""

    def serving(self, busy: bool) -> None:
        """The HTTP channel inside starts (``busy``) or ends serving a request."""
        limiter = cast(ConnectionLimiter, self.factory)
        limiter.table.mark(self, busy, limiter.clock.seconds())


def _limited_connection(transport: object) -> _Limited | None:
    """The limiter's wrapper under an HTTP channel's ``transport`` (directly, under TLS, or under the peer
    listener's TLS and its handshake watch), if any."""
    for _ in range(3):
        if isinstance(transport, _Limited):
            return transport
        transport = getattr(transport, "transport", None)
    return None


class NewConnectionRate:
    """A token bucket per client address: at most ``burst`` new connections at once, refilled at
    ``per_second`` (pure; the time is passed in). Only the :data:`MAX_KNOWN` most recently seen addresses
    are remembered: one forgotten starts again with a full bucket."""

    def __init__(self, per_second: float, burst: int, max_clients: int = MAX_KNOWN) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("a connection rate needs a positive rate and a burst of at least one")
        self.per_second = per_second
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def allow(self, client: str, now: float) -> bool:
        """Whether ``client`` may open one more connection at ``now`` (taking a token if so)."""
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(now - at, 0.0) * self.per_second)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed


@dataclass
class LimiterStats:
    """Counters of one listener's limiter."""

    refused: int = 0  # at its caps, or above its new-connection rate
    evicted: int = 0


class ConnectionLimiter(WrappingFactory[_Limited]):
    """Wraps a listener's factory and enforces its :class:`ListenerCaps` at accept time."""

    protocol = _Limited

    def __init__(self, wrapped: IProtocolFactory, caps: ListenerCaps, name: str, clock: IReactorTime,
                 rate: NewConnectionRate | None = None) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.table = ConnectionTable(caps)
        self.name = name
        self.clock = clock
        self.rate = rate
        self.stats = LimiterStats()
        self._unlogged = 0
        self._logged_at: float | None = None

    # None refuses the connection, as IProtocolFactory allows
    def buildProtocol(self, addr: IAddress | None) -> _Limited | None:  # type: ignore[override]
        client = client_address(addr)
        now = self.clock.seconds()
        if self.rate is not None and not self.rate.allow(client, now):
            self.stats.refused += 1
            self._refused(client, f"more than {self.rate.burst} new connections at a time, or "
                                  f"{self.rate.per_second:g} a second, from one address")
            return None  # before any work: no protocol, no TLS handshake
        admitted, victim = self.table.admit(client, now)
        evicted = cast(_Limited | None, victim)
        if not admitted:
            self.stats.refused += 1
            caps = self.table.caps
            self._refused(client, f"full (caps {caps.total} in all, {caps.per_client} per client address)")
            return None  # twisted closes the accepted socket at once
        if evicted is not None:
            self.stats.evicted += 1
            cast(ITCPTransport, evicted.transport).abortConnection()
            self.table.remove(evicted)  # at once: connectionLost comes later
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        connection = _Limited(self, wrapped)
        self.table.add(client, connection, now)
        return connection

    def registerProtocol(self, p: _Limited) -> None:
        """Counted in :meth:`buildProtocol` already."""

    def unregisterProtocol(self, p: _Limited) -> None:
        self.table.remove(p)

    def _refused(self, client: str, why: str) -> None:
        self._unlogged += 1
        now = self.clock.seconds()
        if self._logged_at is not None and now - self._logged_at < REFUSAL_LOG_PERIOD:
            return
        caps = self.table.caps
        log.warning("%s listener refused %d connection(s) since the last report (latest from %s: %s)",
                    self.name, self._unlogged, client, why,
                    extra=fields(event="connections_refused", listener=self.name, refused=self._unlogged,
                                 client=client, reason=why, total=self.table.total, cap=caps.total,
                                 per_client=caps.per_client))
        self._unlogged = 0
        self._logged_at = now


def with_header_deadline(channel_type: type[Any], deadline: float = HEADER_DEADLINE) -> type[Any]:
    """A subclass of the twisted.web ``HTTPChannel`` type ``channel_type`` that closes the connection when
    a request's header has not arrived whole ``deadline`` seconds after its first byte, and tells the
    listener's :class:`ConnectionLimiter` (if any) while it serves a request."""

    class HeaderDeadlineChannel(channel_type):  # type: ignore[misc]  # any HTTPChannel subclass
        header_deadline = deadline
        _header_timer = None
        _awaiting_header = True

        def dataReceived(self, data: bytes) -> None:
            if data and self._awaiting_header and self._header_timer is None:
                self._header_timer = self.callLater(self.header_deadline, self._header_too_slow)
            super().dataReceived(data)

        def allHeadersReceived(self) -> None:
            self._awaiting_header = False
            self._cancel_header_timer()
            self._tell_limiter(True)
            super().allHeadersReceived()

        def requestDone(self, request: Any) -> None:
            self._awaiting_header = True  # before the channel replays the next request's buffered bytes
            self._tell_limiter(False)
            super().requestDone(request)

        def _tell_limiter(self, busy: bool) -> None:
            # a connection serving a request is never taken for a newcomer (ConnectionTable.admit)
            limited = _limited_connection(self.transport)
            if limited is not None:
                limited.serving(busy)

        def connectionLost(self, reason: Failure) -> None:
            self._cancel_header_timer()
            super().connectionLost(reason)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None and self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

        def _header_too_slow(self) -> None:
            self._header_timer = None
            log.debug("request header not complete after %.0f s: closing", self.header_deadline,
                      extra=fields(event="header_timeout"))
            self.transport.abortConnection()

    HeaderDeadlineChannel.__name__ = HeaderDeadlineChannel.__qualname__ = (
        f"HeaderDeadline{channel_type.__name__}"
    )
    return HeaderDeadlineChannel
