"""Burst coordination on a real node: the Twisted side of :mod:`dnsmirror.swarm`.

:class:`SwarmDriver` owns the process's one :class:`~dnsmirror.swarm.SwarmNode`, feeds it events with the
reactor's clock and carries out its actions; every decision stays in the sans-IO node.

- Messages travel as signed POSTs to the peer listener's ``/peer/v1/swarm`` (HMAC over the body with the
  cluster secret, as batch announcements); the sender is the peer that connected, at the cluster's port.
  Messages the receiver sends back to the sender (an answer to an ask, an ack) come in the POST's answer;
  any others are POSTs of their own. A message that cannot be delivered (refused, or a node running the
  old peer protocol that answers 404) makes the node skip that peer at once.
- The content chain's peer source (:class:`dnsmirror.sources.PeerSource`) asks :meth:`SwarmDriver.pull` on
  a local miss, after the access check with the client's own credentials; the answer is a
  :class:`Decision`: fill from upstream (the lease), or stream from a holder. Once bytes flow, the fill is
  watched: its first bytes register this node as a holder, its end completes or abandons the pull.
- A transfer from a holder that breaks, stalls or is refused goes on from whichever source the node's
  decisions name next (another holder with a range from the byte reached, or upstream with a range), into
  the same fill: the client sees one stream (:class:`_Transfer`).
- Messages carry only digests, node addresses, offsets, counts and flags (their constructors refuse
  anything else); no client credential ever crosses nodes.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from dnsmirror import swarm
from dnsmirror.bulk import PeerEndpoints
from dnsmirror.config import HostPort, host_port
from dnsmirror.logs import fields as log_fields
from dnsmirror.peers import AUTH_HEADER, BLOB_PATH, SWARM_PATH, PeerSet, body_digest, sign
from dnsmirror.periodic import Periodic
from dnsmirror.store import DigestMismatch
from dnsmirror.streaming import Fill
from dnsmirror.upstream import UpstreamResponse

log = logging.getLogger("dnsmirror.swarm")

MESSAGES: dict[str, type] = {cls.__name__: cls for cls in (swarm.Ask, swarm.Lease, swarm.Offer, swarm.Wait,
                                                            swarm.Register, swarm.Ack, swarm.Release)}
# how each message field crosses the wire (JSON value -> field value); nothing else is accepted
_FIELDS: dict[str, Callable[[Any], Any]] = {
    "digest": str,
    "offset": int,
    "uploads": int,
    "retry_after": float,
    "complete": bool,
    "holder": lambda value: host_port(value),
    "receiver": lambda value: host_port(value),
    "source": lambda value: None if value is None else host_port(value),
    "outcome": swarm.Outcome,
}
_TYPES: dict[str, tuple[type, ...]] = {"digest": (str,), "offset": (int,), "uploads": (int,),
                                       "retry_after": (int, float), "complete": (bool,)}
MAX_ANSWER = 64 * 1024  # bytes of a coordination answer (a few messages)
MAINTENANCE_INTERVAL = 1.0  # s: throttled transfers reported alive; idle coordinator memory dropped
FORGET_EVERY = 30  # maintenance rounds between two calls of SwarmNode.forget_idle


def node_settings(max_uploads: int) -> swarm.SwarmSettings:
    """The decisions' limits on a real network (the simulation keeps :class:`~dnsmirror.swarm.SwarmSettings`'
    defaults): in a burst a node's cores are busy unpacking and hashing, and an answer a little late must
    not make the asker skip its coordinator (whose replacement, knowing nothing yet, may lease a second
    fill). A coordinator that is gone refuses the connection, which is skipped at once anyway."""
    return swarm.SwarmSettings(max_uploads=max_uploads, ask_timeout=1.0, heartbeat=1.5, stall_timeout=5.0,
                               patience=30.0)


def encode_message(message: swarm.Message) -> dict[str, Any]:
    """A message as a JSON object: its type and fields (addresses as ``host:port``, outcomes by value)."""
    encoded: dict[str, Any] = {"type": type(message).__name__}
    for f in fields(message):
        value = getattr(message, f.name)
        encoded[f.name] = str(value) if isinstance(value, HostPort) else (
            value.value if isinstance(value, swarm.Outcome) else value)
    return encoded


def decode_message(data: Any) -> swarm.Message:
    """The message a JSON object encodes; ``ValueError`` for anything else."""
    if not isinstance(data, dict) or data.get("type") not in MESSAGES:
        raise ValueError("not a coordination message")
    cls = MESSAGES[data["type"]]
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.name == "uploads":
                continue  # optional, as in the dataclass
            raise ValueError(f"{cls.__name__}.{f.name} missing")
        raw = data[f.name]
        allowed = _TYPES.get(f.name)
        wrong = allowed is not None and not isinstance(raw, allowed)
        if wrong or (allowed is not None and bool not in allowed and isinstance(raw, bool)):
            raise ValueError(f"{cls.__name__}.{f.name}: {type(raw).__name__} is not allowed")
        values[f.name] = _FIELDS[f.name](raw)
    if any(isinstance(values.get(name), int) and values[name] < 0 for name in ("offset", "uploads")):
        raise ValueError(f"{cls.__name__}: negative count")
    return cls(**values)


@dataclass(frozen=True)
class Decision:
    """What the node's decisions say a local miss should do: stream from ``holder``, or (None) fill from
    upstream with the client's own credentials."""

    holder: HostPort | None


UPSTREAM = Decision(None)


@dataclass
class SwarmStats:
    """Counters of burst coordination (exported as ``dnsmirror_swarm_*_total``)."""

    leases: int = 0            # fill leases this node granted as a digest's coordinator
    offers: int = 0            # askers this node sent to a holder as coordinator
    waits: int = 0             # askers this node told to ask again (every holder busy)
    upstream_fetches: int = 0  # coordinated pulls fetched from upstream here (lease, fallback or the rest)
    leases_taken: int = 0      # of those, under a fill lease (this node was the one sent upstream)
    peer_fetches: int = 0      # transfers from a holder this node started
    fallbacks: int = 0         # holders that died, stalled, lied or refused: the next source was asked
    messages_failed: int = 0   # coordination messages that could not be delivered


class _Session:
    """This node's I/O for one pull: the decision awaited, then the fill and the transfer feeding it."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.waiting: defer.Deferred | None = None
        self.pending: Decision | None = None  # a decision made before anyone waited for it
        self.decided = False
        self.fill: Fill | None = None
        self.transfer: _Transfer | None = None
        self.reported = 0
        self.ended = False

    def wait(self) -> defer.Deferred:
        """Fires with the next :class:`Decision`, or None when coordination gave up (upstream as usual)."""
        if self.decided:
            self.decided = False
            decision, self.pending = self.pending, None
            return defer.succeed(decision)
        self.waiting = defer.Deferred()
        return self.waiting

    def decide(self, decision: Decision | None) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(decision)
        else:
            self.decided, self.pending = True, decision


class SwarmDriver:
    """One process's burst coordination: a :class:`~dnsmirror.swarm.SwarmNode` wired to the peer network.

    ``me`` is this node's address as the others list it, or None when ``peers.listen`` does not say (then
    the member entry this node can bind, once static or discovered peers name it; no coordination before).
    ``peers`` is the membership (static or discovered). With ``tls`` (a client connection creator,
    :mod:`dnsmirror.peer_tls`) messages and blob requests go inside the peers' TLS.
    """

    def __init__(self, reactor, me: HostPort | None, peers: PeerSet, secret: bytes,
                 settings: swarm.SwarmSettings, timeout: float, read_timeout: float,
                 stats: SwarmStats | None = None, wall_clock: Callable[[], float] = time.time,
                 tls: IOpenSSLClientConnectionCreator | None = None) -> None:
        self.reactor = reactor
        self.peers = peers
        self.tls = tls
        self.secret = secret
        self.settings = settings
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.stats = stats or SwarmStats()
        self.wall_clock = wall_clock
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        self.pool.cachedConnectionTimeout = 30
        self.me: HostPort = None  # type: ignore[assignment]  # set by _ready
        self.node: swarm.SwarmNode = None  # type: ignore[assignment]
        self.agent: Agent = None  # type: ignore[assignment]
        self._fixed_me = me
        self.sessions: dict[str, _Session] = {}
        self._timers: set = set()
        self._rounds = 0
        self._maintenance = Periodic(reactor, MAINTENANCE_INTERVAL, self._maintain, "burst coordination")
        self.running = False

    # --- lifecycle ---------------------------------------------------------------------------------------

    def _ready(self) -> bool:
        """Whether this node knows its own address (and so takes part); builds its decision node then."""
        if self.node is not None:
            return True
        me = self._fixed_me or self.peers.own_address()
        if me is None:
            return False
        self.me = me
        self.node = swarm.SwarmNode(me, swarm.Membership([me, *self.peers.members()]), self.settings)
        # from this node's own address: the receiver knows the sender by the address it connects from
        self.agent = Agent.usingEndpointFactory(
            self.reactor, PeerEndpoints(self.reactor, self.timeout, (me.host, 0), self.tls), pool=self.pool
        )
        log.info("burst coordination as %s", me, extra=log_fields(event="swarm_ready", node=str(me)))
        return True

    def start(self) -> None:
        self.running = True
        self._ready()
        self._maintenance.start()

    def stop(self) -> defer.Deferred:
        """No more messages or timers; pulls waiting for a decision go upstream as without peers."""
        self.running = False
        self._maintenance.stop()
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers.clear()
        for session in list(self.sessions.values()):
            session.decide(None)
        return self.pool.closeCachedConnections()

    # --- what the content chain asks ---------------------------------------------------------------------

    def pull(self, digest: str) -> defer.Deferred:
        """A local miss of ``digest`` whose client upstream allowed: fires with the :class:`Decision`, or
        None when coordination cannot help (the chain then asks upstream as without peers)."""
        if not self.running or not self._ready():
            return defer.succeed(None)
        self._refresh_membership()
        old = self.sessions.pop(digest, None)
        if old is not None:
            old.ended = True
        pull = self.node.pulls.get(digest)
        if pull is not None and pull.phase not in (swarm.Phase.DONE, swarm.Phase.FAILED, swarm.Phase.REFUSED):
            self._handle(swarm.Abandoned(digest, swarm.Outcome.UNUSED))  # left over: start afresh
        session = self.sessions[digest] = _Session(digest)
        decided = session.wait()
        self._handle(swarm.Wanted(digest))
        return decided

    def holder_failed(self, digest: str, refused: bool) -> defer.Deferred:
        """The holder of the last decision could not start sending (before any byte): the next decision."""
        session = self.sessions.get(digest)
        if session is None:
            return defer.succeed(None)
        self.stats.fallbacks += 1
        if session.decided:
            return session.wait()  # its stall timer gave it up already, and the next decision is made
        decided = session.wait()
        outcome = swarm.Outcome.REFUSED if refused else swarm.Outcome.DIED
        self._handle(swarm.SourceFailed(digest, 0, outcome))
        return decided

    def abandon(self, digest: str, failed: bool = True) -> None:
        """The local pull took another way (``failed`` False: its source was fine) or failed: its lease and
        reservations go back."""
        session = self.sessions.pop(digest, None)
        if session is not None:
            session.ended = True
        if self.node is not None:
            self._handle(swarm.Abandoned(digest, swarm.Outcome.DIED if failed else swarm.Outcome.UNUSED))

    def filling(self, digest: str, fill: Fill, transfer: _Transfer | None = None) -> None:
        """``fill`` now receives ``digest`` (from upstream, or through ``transfer`` from holders): its bytes
        make this node a holder at once, its end completes or abandons the pull."""
        session = self.sessions.get(digest)
        if session is None:
            return
        session.fill, session.transfer = fill, transfer

        def progress(_: object = None) -> None:
            if session.ended:
                return
            if fill.received > session.reported:
                session.reported = fill.received
                self._handle(swarm.BytesReceived(digest, fill.received))
            if not fill.finished:
                fill.wait().addCallback(progress)

        progress()
        fill.settled().addCallback(lambda _: self._fill_ended(session, fill))

    def _fill_ended(self, session: _Session, fill: Fill) -> None:
        if session.ended:
            return
        session.ended = True
        if self.sessions.get(session.digest) is session:
            del self.sessions[session.digest]
        if fill.info is not None:
            if fill.received > session.reported:
                self._handle(swarm.BytesReceived(session.digest, fill.received))
            self._handle(swarm.Completed(session.digest))
            return
        cause = fill.failure.__cause__ if fill.failure is not None else None
        lied = any(isinstance(c, DigestMismatch) for c in (cause, getattr(cause, "__cause__", None)))
        self._handle(swarm.Abandoned(session.digest, swarm.Outcome.LIED if lied else swarm.Outcome.DIED))

    async def get(self, holder: HostPort, digest: str, offset: int) -> tuple[UpstreamResponse | None, bool]:
        """``holder``'s answer with the blob from ``offset`` (a 200, or a 206 of exactly that range), or
        (None, refused?) when it has no free slot (503) or cannot send it."""
        url = f"http://{holder}{BLOB_PATH}{digest}"
        headers = Headers({AUTH_HEADER: [sign(self.secret, "GET", digest, self.wall_clock())]})
        if offset:
            headers.setRawHeaders(b"range", [f"bytes={offset}-".encode()])
        request = self.agent.request(b"GET", url.encode("ascii"), headers)
        request.addTimeout(self.timeout, self.reactor)
        try:
            raw = await request
        except Exception as exc:  # noqa: BLE001 - any failure of a holder means: the next source
            log.info("holder %s did not answer: %s", holder, exc,
                     extra=log_fields(event="swarm_holder_failed", host=str(holder), digest=digest))
            return None, False
        response = UpstreamResponse(raw, url, "GET", (), self.reactor, self.read_timeout)
        ranged = (response.headers.getRawHeaders(b"content-range") or [b""])[0].decode("latin-1")
        if response.length is not None and (
            (offset == 0 and response.code == 200)
            or (response.code == 206 and ranged == f"bytes {offset}-{offset + response.length - 1}/"
                                                  f"{offset + response.length}")
        ):
            self.stats.peer_fetches += 1
            return response, False
        await response.discard(0)
        log.info("holder %s answered %d", holder, response.code,
                 extra=log_fields(event="swarm_holder_failed", host=str(holder), digest=digest))
        return None, response.code == 503

    # --- what the peer listener hears -------------------------------------------------------------------

    def receive(self, sender: HostPort, body: bytes) -> bytes:
        """A signed message from ``sender``: handled, and the messages for the sender returned as the
        answer's body (a JSON list). ``ValueError`` for a body that is not a message."""
        try:
            message = decode_message(json.loads(body))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # JSON nested too deep: bad input
            raise ValueError(str(exc) or type(exc).__name__) from exc
        if not self.running or not self._ready():
            raise ValueError("this node does not know its own peer address yet")
        if sender not in self.node.membership.nodes:
            self._refresh_membership()
        if sender not in self.node.membership.nodes or sender == self.me:
            raise ValueError(f"{sender} is not a member of this node's cluster")
        replies = self._apply(self.node.handle(swarm.MessageReceived(sender, message), self._now()), sender)
        return json.dumps([encode_message(reply) for reply in replies]).encode()

    def upload_started(self, digest: str, receiver: HostPort) -> None:
        """The peer listener streams ``digest`` to ``receiver`` (its upload slot taken)."""
        if self.node is not None and digest in self.node.pulls:
            self._handle(swarm.UploadRequested(digest, receiver))

    def upload_ended(self, digest: str, receiver: HostPort, complete: bool) -> None:
        if self.node is None:
            return
        outcome = swarm.Outcome.DONE if complete else swarm.Outcome.DIED
        self._handle(swarm.UploadEnded(digest, receiver, outcome))

    # --- carrying out the node's actions -----------------------------------------------------------------

    def _now(self) -> float:
        return self.reactor.seconds()

    def _handle(self, event: swarm.Event) -> None:
        if self.running and self.node is not None:
            self._apply(self.node.handle(event, self._now()))

    def _apply(self, actions: list[swarm.Action], reply_to: HostPort | None = None) -> list[swarm.Message]:
        replies: list[swarm.Message] = []
        for action in actions:
            match action:
                case swarm.Send(to, message):
                    self._count(message)
                    if to == reply_to:
                        replies.append(message)
                    elif to == self.me:
                        self._later(0, swarm.MessageReceived(self.me, message))
                    else:
                        self._post(to, message)
                case swarm.SetTimer(digest, kind, at):
                    self._later(at - self._now(), swarm.TimerFired(digest, kind))
                case swarm.CheckAccess(digest):
                    # the content chain checked the client's credentials upstream before it asked
                    replies += self._apply(self.node.handle(swarm.AccessChecked(digest, True), self._now()),
                                           reply_to)
                case swarm.FetchUpstream() | swarm.FetchPeer():
                    self._fetch(action)
                case swarm.Abort(digest):
                    session = self.sessions.get(digest)
                    if session is not None and session.transfer is not None:
                        self.stats.fallbacks += 1
                        session.transfer.abort_current()
                case swarm.FailPull(digest) | swarm.PassRefusal(digest):
                    session = self.sessions.get(digest)
                    if session is not None and session.transfer is not None:
                        session.transfer.fail("no source left")
                    elif session is not None:
                        session.decide(None)
        return replies

    def _count(self, message: swarm.Message) -> None:
        match message:
            case swarm.Lease():
                self.stats.leases += 1
            case swarm.Offer():
                self.stats.offers += 1
            case swarm.Wait():
                self.stats.waits += 1

    def _fetch(self, action: swarm.FetchUpstream | swarm.FetchPeer) -> None:
        session = self.sessions.get(action.digest)
        if session is None:
            self._handle(swarm.Abandoned(action.digest, swarm.Outcome.UNUSED))  # nobody local wants it now
            return
        if isinstance(action, swarm.FetchUpstream):
            self.stats.upstream_fetches += 1
            pull = self.node.pulls.get(action.digest)
            lease = pull is not None and pull.lease
            self.stats.leases_taken += lease
            log.info("fetching from upstream from byte %d (%s)", action.offset,
                     "the fill lease" if lease else "no holder could send it",
                     extra=log_fields(event="swarm_upstream", digest=action.digest, offset=action.offset,
                                      lease=lease))
        if session.transfer is not None:
            session.transfer.continue_from(action)
        elif session.fill is None:
            session.decide(UPSTREAM if isinstance(action, swarm.FetchUpstream) else Decision(action.holder))

    def _later(self, delay: float, event: swarm.Event) -> None:
        if not self.running:
            return

        def fire() -> None:
            self._timers.discard(call)
            if self.running:
                self._handle(event)

        call = self.reactor.callLater(max(delay, 0.0), fire)
        self._timers.add(call)

    def _post(self, to: HostPort, message: swarm.Message) -> None:
        if not self.running:
            return
        body = json.dumps(encode_message(message)).encode()
        signature = sign(self.secret, "POST", body_digest(body), self.wall_clock())
        headers = Headers({AUTH_HEADER: [signature], b"content-type": [b"application/json"]})
        sent = self.agent.request(b"POST", f"http://{to}{SWARM_PATH}".encode("ascii"), headers,
                                  FileBodyProducer(io.BytesIO(body)))
        sent.addTimeout(self.timeout, self.reactor)

        def answered(raw) -> defer.Deferred:
            url = f"http://{to}{SWARM_PATH}"
            response = UpstreamResponse(raw, url, "POST", (), self.reactor, self.timeout)
            if response.code != 200:
                response.discard()
                raise ValueError(f"answered {response.code}")  # e.g. a node of the old peer protocol: 404
            return response.read_body(MAX_ANSWER)

        def replies(data: bytes) -> None:
            for item in json.loads(data):
                if self.running:
                    self._handle(swarm.MessageReceived(to, decode_message(item)))

        def failed(failure: Failure) -> None:
            self.stats.messages_failed += 1
            log.info("coordination message to %s failed: %s", to, failure.getErrorMessage(),
                     extra=log_fields(event="swarm_message_failed", host=str(to)))
            if self.running:
                self._handle(swarm.Unreachable(to))

        sent.addCallback(answered).addCallback(replies).addErrback(failed)

    def _refresh_membership(self) -> None:
        nodes = frozenset([self.me, *self.peers.members()])
        if nodes != self.node.membership.nodes:
            self.node.membership = swarm.Membership(nodes)

    def _maintain(self) -> None:
        if not self._ready():
            return
        self._rounds += 1
        if self._rounds % FORGET_EVERY == 0:
            self.node.forget_idle(self._now())
            self._refresh_membership()
        for session in list(self.sessions.values()):
            fill = session.fill
            if session.transfer is None or fill is None or fill.finished:
                continue
            if fill.upstream_paused:  # paused for a slow local client: not a stalled holder
                self._handle(swarm.BytesReceived(session.digest, fill.received))

    # --- building transfers -------------------------------------------------------------------------------

    def feed(self, digest: str, fill: Fill, response: UpstreamResponse,
             upstream_rest: Callable[[int], defer.Deferred], on_source: Callable[[HostPort | None], None],
             holder: HostPort) -> _Transfer:
        """Feed ``fill`` from ``response`` (``holder``'s), and after a break from the next sources."""
        transfer = _Transfer(self, digest, fill, upstream_rest, on_source)
        self.filling(digest, fill, transfer)
        transfer.deliver(response, holder)
        return transfer


class _Transfer:
    """Feeds one :class:`~dnsmirror.streaming.Fill` from a holder and, after a break, a stall or a refusal,
    from whichever source the node's decisions name next, with a range from the byte reached."""

    def __init__(self, driver: SwarmDriver, digest: str, fill: Fill,
                 upstream_rest: Callable[[int], defer.Deferred],
                 on_source: Callable[[HostPort | None], None]) -> None:
        self.driver = driver
        self.digest = digest
        self.fill = fill
        self.inner = fill.body_protocol()
        self.upstream_rest = upstream_rest
        self.on_source = on_source
        self.generation = 0
        self.transport = None
        self.ended = False

    def deliver(self, response: UpstreamResponse, source: HostPort | None) -> None:
        self.generation += 1
        self.on_source(source)
        response.deliver_body(_Part(self, self.generation))

    def abort_current(self) -> None:
        """Drop the current source (it stalled): its bytes from now on are ignored."""
        self.generation += 1
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.stopProducing()

    def fail(self, why: str) -> None:
        """No source left: the fill fails, its readers are cut before their last byte."""
        if self.ended:
            return
        self.ended = True
        self.abort_current()
        self.inner.connectionLost(Failure(ConnectionLost(why)))

    def continue_from(self, action: swarm.FetchUpstream | swarm.FetchPeer) -> None:
        if self.ended or self.fill.failure is not None:
            return
        generation = self.generation
        offset = self.fill.received
        if isinstance(action, swarm.FetchPeer):
            holder = action.holder
            started = defer.ensureDeferred(self.driver.get(holder, self.digest, offset))
            started.addCallback(self._started, generation, holder)
        else:
            log.info("finishing a transfer from upstream", extra=log_fields(
                event="swarm_upstream_rest", digest=self.digest, offset=offset))
            rest = self.upstream_rest(offset)
            rest.addCallback(lambda response: (response, False))
            rest.addCallback(self._started, generation, None)

    def _started(self, answer: tuple[UpstreamResponse | None, bool], generation: int,
                 source: HostPort | None) -> None:
        response, refused = answer
        if self.ended or generation != self.generation:
            if response is not None:
                response.discard(0)
            return
        if response is None:
            self.driver.stats.fallbacks += 1
            outcome = swarm.Outcome.REFUSED if refused else swarm.Outcome.DIED
            self.driver._handle(swarm.SourceFailed(self.digest, self.fill.received, outcome))
            return
        self.deliver(response, source)

    def part_connected(self, generation: int, transport) -> None:
        if generation != self.generation:
            transport.stopProducing()
            return
        self.transport = transport
        self.inner.makeConnection(transport)
        if self.fill.upstream_paused:
            transport.pauseProducing()  # the fill's pause carries over to the new source

    def part_data(self, generation: int, data: bytes) -> None:
        if generation == self.generation and not self.ended:
            self.inner.dataReceived(data)

    def part_lost(self, generation: int, reason: Failure) -> None:
        if generation != self.generation or self.ended:
            return  # a source given up already
        self.transport = None
        fill = self.fill
        complete = fill.total is not None and fill.received >= fill.total
        if complete or reason.check(ResponseDone) or fill.failure is not None:
            self.ended = True
            self.inner.connectionLost(reason)
            return
        self.driver.stats.fallbacks += 1
        log.info("a holder broke off at byte %d: %s", fill.received, reason.getErrorMessage(),
                 extra=log_fields(event="swarm_source_broke", digest=self.digest, offset=fill.received))
        self.driver._handle(swarm.BytesReceived(self.digest, fill.received))
        self.driver._handle(swarm.SourceFailed(self.digest, fill.received, swarm.Outcome.DIED))


class _Part(Protocol):
    """The body protocol of one source of a :class:`_Transfer`."""

    def __init__(self, transfer: _Transfer, generation: int) -> None:
        self.transfer = transfer
        self.generation = generation

    def makeConnection(self, transport) -> None:
        self.transfer.part_connected(self.generation, transport)

    def dataReceived(self, data: bytes) -> None:
        self.transfer.part_data(self.generation, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.transfer.part_lost(self.generation, reason)
