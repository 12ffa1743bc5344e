"""Sharing cached content between nodes: membership, rendezvous order, signed requests, the peer listener.

- A node asks peers for a digest only after upstream confirmed (or recently granted) that the
  requesting client may read it (:mod:`dnsmirror.content` decides); the peer never sees the client's
  credentials, and the bytes it sends are verified against the digest like any other source's.
- Peers serve their own cache and their fills under way, nothing else: a peer request never makes a
  node contact upstream, and a request without a valid signature (HMAC-SHA256 over method, digest and time
  with the cluster's shared secret) gets 401.
- Who holds what: when a node starts filling a digest, and again when it has cached it, it announces
  itself to the digest's first ``lookup`` peers in rendezvous order (highest hash of digest and
  address first); it also announces its whole cache, in batches, soon after start and every few
  hours. A lookup asks the same peers, which answer with the blob or with the holders they were told
  about, so one or two requests find a copy whatever the size of the cluster. A fill still under way
  is served as it grows (its last byte once verified), so nodes pulling the same new image a moment
  apart share one upstream fetch.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import logging
import os
import re
import socket
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, cast

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from dnsmirror import failures
from dnsmirror.bulk import PeerEndpoints
from dnsmirror.config import HostPort, host_port
from dnsmirror.logs import fields
from dnsmirror.periodic import Periodic
from dnsmirror.sources import VERIFY_BEFORE_SERVING
from dnsmirror.store import Store, digest_hex
from dnsmirror.streaming import BlobStreamer, DiskIO, Fill
from dnsmirror.upstream import UpstreamResponse

log = logging.getLogger("dnsmirror.peers")

BLOB_PATH = "/peer/v1/blobs/"
HOLDER_PATH = "/peer/v1/holders/"
BATCH_PATH = "/peer/v1/holders"  # POST: a newline-separated list of digests this node holds
SWARM_PATH = "/peer/v1/swarm"  # POST: one burst-coordination message (dnsmirror.swarm_node)
AUTH_HEADER = b"x-dnsmirror-peer-auth"
HOLDERS_HEADER = b"x-dnsmirror-holders"
# a signature is accepted this long around its timestamp (node clocks are NTP-synchronised)
CLOCK_SKEW = 60.0
MIN_SECRET_BYTES = 16
# concurrent streams of one blob this node sends to peers, unless peers.max_uploads says otherwise
MAX_UPLOADS = 4
# a peer that failed (refused, timed out, sent a wrong body) is skipped this long
PEER_BACKOFF = 30.0
# an announced copy is remembered this long (a node announces when a fill starts and when it commits);
# a holder that evicted it meanwhile answers 404 and the next one is asked
HOLDERS_TTL = 6 * 3600.0
MAX_HOLDER_DIGESTS = 50_000
MAX_HOLDERS_PER_DIGEST = 4
MAX_BATCH = 10_000  # digests per batch announcement
MAX_BODY = MAX_BATCH * 72  # bytes of a batch announcement's body (71-character digests, newlines)
# a node re-announces its whole cache this often (and once soon after start), so that announcements
# outlive HOLDERS_TTL and restarts of the nodes that keep them
REANNOUNCE_INTERVAL = HOLDERS_TTL / 2
FIRST_REANNOUNCE = 5.0
# a batch announcement that got no answer (peers starting together, one restarting) is sent again after
# 5, 10, 20 and 40 s: a peer that comes up within a minute or so still learns this node's cache
ANNOUNCE_RETRY = 5.0
ANNOUNCE_ATTEMPTS = 5
# a cached blob up to this size that this process has not verified yet is hashed whole before it is sent to
# a peer, as for local clients; a larger one is hashed as it streams, its last bytes held back
VERIFY_BEFORE_SENDING = VERIFY_BEFORE_SERVING
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


class PeerSecretError(Exception):
    """The shared secret file is missing, unreadable, too short or readable by others."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"peers.secret_file: {path} {problem}")


def load_secret(path: Path) -> bytes:
    """The shared secret in ``path`` (surrounding whitespace removed); raises :class:`PeerSecretError`."""
    try:
        mode = os.stat(path).st_mode
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise PeerSecretError(path, f"cannot be read: {exc.strerror or exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PeerSecretError(
            path,
            f"is accessible by group or others (mode {stat.S_IMODE(mode):04o}); chmod 600 "
            "(Kubernetes: defaultMode: 0400 on the Secret volume)",
        )
    if len(data) < MIN_SECRET_BYTES:
        raise PeerSecretError(path, f"holds {len(data)} bytes; a secret needs at least {MIN_SECRET_BYTES} "
                                    "(e.g. `head -c 32 /dev/urandom | base64`)")
    return data


def _mac(secret: bytes, stamp: int, method: str, digest: str) -> str:
    return hmac.new(secret, f"{stamp} {method} {digest}".encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, digest: str, now: float) -> bytes:
    """The auth header value for ``method`` of ``digest`` at ``now`` (Unix time)."""
    stamp = int(now)
    return f"{stamp} {_mac(secret, stamp, method, digest)}".encode()


def signature_valid(secret: bytes, header: bytes | None, method: str, digest: str, now: float) -> bool:
    """True when ``header`` signs ``method`` of ``digest`` with ``secret`` within :data:`CLOCK_SKEW`."""
    if not header:
        return False
    try:
        stamp_text, mac = header.decode("ascii").split(" ", 1)
        stamp = int(stamp_text)
    except (UnicodeDecodeError, ValueError):
        return False
    if abs(now - stamp) > CLOCK_SKEW:
        return False
    return hmac.compare_digest(mac, _mac(secret, stamp, method, digest))


def rendezvous(digest: str, peers: Iterable[HostPort]) -> list[HostPort]:
    """``peers`` in rendezvous order for ``digest``: every node computes the same order, and adding or
    removing a peer moves only the digests whose first choices it was."""
    def weight(peer: HostPort) -> bytes:
        return hashlib.sha256(f"{digest}|{peer}".encode()).digest()
    return sorted(set(peers), key=weight, reverse=True)


def is_local_address(host: str) -> bool:
    """True when ``host`` is one of this machine's addresses (binding to it succeeds); raises ``OSError``
    when no socket can be made to check (out of descriptors), so that no wrong answer is remembered."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


class Holders:
    """Bounded memory of which peers announced a digest, each entry expiring after ``ttl``."""

    def __init__(self, ttl: float = HOLDERS_TTL, max_digests: int = MAX_HOLDER_DIGESTS) -> None:
        self.ttl = ttl
        self.max_digests = max_digests
        self._entries: OrderedDict[str, dict[HostPort, float]] = OrderedDict()

    def record(self, digest: str, peer: HostPort, now: float) -> None:
        holders = self._entries.pop(digest, {})
        holders[peer] = now + self.ttl
        if len(holders) > MAX_HOLDERS_PER_DIGEST:
            del holders[min(holders, key=holders.__getitem__)]
        self._entries[digest] = holders
        while len(self._entries) > self.max_digests:
            self._entries.popitem(last=False)

    def forget(self, digest: str, peer: HostPort) -> None:
        holders = self._entries.get(digest)
        if holders is not None:
            holders.pop(peer, None)

    def lookup(self, digest: str, now: float) -> list[HostPort]:
        holders = self._entries.get(digest)
        if not holders:
            return []
        alive = {peer: until for peer, until in holders.items() if until > now}
        if alive:
            self._entries[digest] = alive
        else:
            del self._entries[digest]
        return sorted(alive, key=alive.__getitem__, reverse=True)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class PeerStats:
    """Counters of peer traffic (exported as ``dnsmirror_peers_*_total``)."""

    lookups: int = 0            # digests looked for at peers
    hits: int = 0               # lookups that found a peer sending the blob
    failures: int = 0           # peer requests refused, timed out or broken
    served: int = 0             # blobs this node sent to peers
    served_while_filling: int = 0  # of those, sent from a fill still under way
    refused: int = 0            # peer requests without a valid signature
    damaged: int = 0            # cached files found damaged when a peer asked for them (dropped, not sent)
    announcements_sent: int = 0
    announcements_received: int = 0
    uploads_refused: int = 0    # blob requests refused with 503: peers.max_uploads streams of it already
    uploads_per_blob_max: int = 0  # the most concurrent streams of one blob to peers since start (a gauge)


class UploadSlots:
    """At most ``limit`` concurrent streams of one blob to peers: beyond that a peer is refused (503) and
    goes elsewhere, so no node becomes the bottleneck of a hot blob. ``on_start``/``on_end`` hear of each
    stream (the burst coordinator counts them in its registrations)."""

    def __init__(self, stats: PeerStats, limit: int = MAX_UPLOADS) -> None:
        self.stats = stats
        self.limit = limit
        self.active: dict[str, int] = {}
        self.on_start: Callable[[str, HostPort], None] = lambda digest, receiver: None
        self.on_end: Callable[[str, HostPort, bool], None] = lambda digest, receiver, complete: None

    def acquire(self, digest: str, receiver: HostPort) -> bool:
        """Take a slot for a stream of ``digest`` to ``receiver``; False when all ``limit`` are taken."""
        count = self.active.get(digest, 0)
        if count >= self.limit:
            self.stats.uploads_refused += 1
            return False
        self.active[digest] = count + 1
        self.stats.uploads_per_blob_max = max(self.stats.uploads_per_blob_max, count + 1)
        self.on_start(digest, receiver)
        return True

    def release(self, digest: str, receiver: HostPort, complete: bool) -> None:
        count = self.active.get(digest, 0) - 1
        if count > 0:
            self.active[digest] = count
        else:
            self.active.pop(digest, None)
        self.on_end(digest, receiver, complete)

    @property
    def total(self) -> int:
        """Streams to peers now."""
        return sum(self.active.values())

    @property
    def busiest(self) -> int:
        """The most concurrent streams of one blob now."""
        return max(self.active.values(), default=0)


class PeerSet:
    """The current peers: ``static`` addresses plus the A/AAAA records of ``dns_name`` (re-resolved every
    ``refresh`` seconds), without this node's own addresses and without peers that failed recently."""

    def __init__(self, reactor, static: Sequence[HostPort], dns_name: str | None, port: int,
                 resolve: Callable[[str], defer.Deferred] | None = None, refresh: float = 30.0,
                 is_local: Callable[[str], bool] = is_local_address) -> None:
        self.reactor = reactor
        self.static = tuple(static)
        self.dns_name = dns_name
        self.port = port
        self.resolve = resolve
        self.refresh = refresh
        self.is_local = is_local
        self.discovered: tuple[HostPort, ...] = ()
        self._local: dict[str, bool] = {}
        self._down: dict[HostPort, float] = {}
        self._loop: Periodic | None = None

    def start(self) -> None:
        if self.dns_name and self.resolve is not None:
            self._loop = Periodic(self.reactor, self.refresh, self._discover, "peer discovery", first=0)
            self._loop.start()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
        self._loop = None

    def _discover(self) -> defer.Deferred:
        def found(addresses: list[str]) -> None:
            self.discovered = tuple(HostPort(address, self.port) for address in addresses)

        def failed(failure) -> None:
            # keep the last known peers: a DNS hiccup must not empty the cluster
            log.warning(
                "peer discovery failed; keeping %d known peers: %s",
                len(self.discovered),
                failure.getErrorMessage(),
                extra=fields(event="peer_discovery_failed", name=self.dns_name),
            )

        # only called when peers.dns_name is set, and with it the resolver
        return self.resolve(self.dns_name).addCallbacks(found, failed)  # type: ignore[arg-type, misc]

    def _is_self(self, peer: HostPort) -> bool:
        if peer.port != self.port:
            return False
        if peer.host not in self._local:
            try:
                self._local[peer.host] = self.is_local(peer.host)
            except OSError:
                return False  # no socket to check with (out of descriptors): ask again next time
        return self._local[peer.host]

    def own_address(self) -> HostPort | None:
        """This node's address as its peers list it (a static or discovered entry it can bind), if any."""
        return next((peer for peer in dict.fromkeys((*self.static, *self.discovered)) if self._is_self(peer)),
                    None)

    def members(self) -> list[HostPort]:
        """Every known peer but this node, healthy or not."""
        return [peer for peer in dict.fromkeys((*self.static, *self.discovered)) if not self._is_self(peer)]

    def healthy(self, peers: Iterable[HostPort]) -> list[HostPort]:
        now = self.reactor.seconds()
        return [peer for peer in peers if self._down.get(peer, 0.0) <= now and not self._is_self(peer)]

    def failed(self, peer: HostPort) -> None:
        """``peer`` refused, timed out or sent a wrong body: skip it for :data:`PEER_BACKOFF`."""
        self._down[peer] = self.reactor.seconds() + PEER_BACKOFF
        if len(self._down) > 10_000:
            now = self.reactor.seconds()
            self._down = {p: until for p, until in self._down.items() if until > now}


class PeerClient:
    """Looks digests up at peers and announces what this node cached (inside the peers' TLS with ``tls``,
    a client connection creator from :mod:`dnsmirror.peer_tls`)."""

    def __init__(self, reactor, peers: PeerSet, holders: Holders, secret: bytes, lookup: int, timeout: float,
                 read_timeout: float, stats: PeerStats, wall_clock: Callable[[], float] = time.time,
                 tls: IOpenSSLClientConnectionCreator | None = None) -> None:
        self.reactor = reactor
        self.peers = peers
        self.holders = holders
        self.secret = secret
        self.lookup = lookup
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.stats = stats
        self.wall_clock = wall_clock
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self.pool.cachedConnectionTimeout = 30
        # blobs come over these connections: large socket reads, fewer trips through the HTTP client
        endpoints = PeerEndpoints(reactor, timeout, tls=tls)  # inside the peers' TLS with ``tls``
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        self._announcing: Periodic | None = None
        self._retries: set = set()  # delayed calls sending a failed batch announcement again

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()

    def available(self) -> bool:
        """True when some peer could be asked now."""
        return bool(self.peers.healthy(self.peers.members()))

    def _headers(self, method: str, digest: str) -> Headers:
        return Headers({AUTH_HEADER: [sign(self.secret, method, digest, self.wall_clock())]})

    async def fetch(self, digest: str) -> tuple[HostPort, UpstreamResponse] | None:
        """A 200 response with the blob's body from some peer, or None when no peer has it.

        Holders announced to this node come first (it may be one of the digest's first peers itself),
        then the first ``lookup`` peers in rendezvous order; a peer without the blob may name holders,
        which are asked next. Each request gets ``timeout`` for its answer; no new one starts after
        twice that."""
        members = self.peers.members()
        if not members:
            return None
        self.stats.lookups += 1
        asked: set[HostPort] = set()
        # holders named by announcements or by other peers are asked only if they are members: a peer
        # cannot send this node's signed requests anywhere else
        member_set = set(members)
        known = [
            holder for holder in self.holders.lookup(digest, self.reactor.seconds()) if holder in member_set
        ]
        queue = self.peers.healthy([*known, *rendezvous(digest, members)[:self.lookup]])
        # a lookup never delays a pull by more than about three peer timeouts before upstream is asked
        deadline = self.reactor.seconds() + 2 * self.timeout
        while (
            queue and len(asked) < self.lookup + MAX_HOLDERS_PER_DIGEST and self.reactor.seconds() < deadline
        ):
            peer = queue.pop(0)
            if peer in asked:
                continue
            asked.add(peer)
            response, holders = await self._ask(peer, digest)
            if response is not None:
                self.stats.hits += 1
                return peer, response
            self.holders.forget(digest, peer)  # an announced holder that no longer has it
            named = [holder for holder in self.peers.healthy(holders) if holder in member_set]
            queue[:0] = [holder for holder in named if holder not in asked]
        return None

    async def _ask(self, peer: HostPort, digest: str) -> tuple[UpstreamResponse | None, list[HostPort]]:
        url = f"http://{peer}{BLOB_PATH}{digest}"
        request = self.agent.request(b"GET", url.encode("ascii"), self._headers("GET", digest))
        request.addTimeout(self.timeout, self.reactor)
        try:
            raw = await request
        except Exception as exc:  # noqa: BLE001 - any failure of a peer means: ask the next one
            self.failed(peer, digest, f"{type(exc).__name__}: {exc}")
            return None, []
        response = UpstreamResponse(raw, url, "GET", (), self.reactor, self.read_timeout)
        if response.code == 200 and response.length is not None:
            return response, []
        await response.discard()
        if response.code == 404:
            return None, _parse_holders(raw.headers.getRawHeaders(HOLDERS_HEADER) or [])
        if response.code == 503:
            return None, []  # busy: peers.max_uploads streams of it already; not a failure of the peer
        self.failed(peer, digest, f"answered {response.code}")
        return None, []

    def _discard(self, raw, url: str, method: str) -> defer.Deferred:
        """Read and drop a peer's answer body, so its connection can be reused."""
        return UpstreamResponse(raw, url, method, (), self.reactor, self.read_timeout).discard()

    def failed(self, peer: HostPort, digest: str, reason: str) -> None:
        """``peer`` refused, timed out, or sent a body that broke off or failed verification: it is
        skipped for :data:`PEER_BACKOFF`."""
        self.stats.failures += 1
        self.peers.failed(peer)
        failures.report("peer", failures.peer_kind(reason), f"{reason}; trying others, then upstream",
                        host=str(peer), digest=digest)

    def announce(self, digest: str) -> None:
        """Tell the digest's first ``lookup`` peers that this node holds it (best effort)."""
        for peer in self.peers.healthy(rendezvous(digest, self.peers.members())[:self.lookup]):
            url = f"http://{peer}{HOLDER_PATH}{digest}"
            sent = self.agent.request(b"POST", url.encode("ascii"), self._headers("POST", digest))
            sent.addTimeout(self.timeout, self.reactor)
            sent.addCallback(self._discard, url, "POST")
            sent.addErrback(partial(_announcement_failed, peer))
            self.stats.announcements_sent += 1

    def send_announcements(self, per_peer: dict[HostPort, list[str]]) -> int:
        """Tell each peer the digests it is a first peer of (:func:`group_by_first_peers`), one request
        per :data:`MAX_BATCH` digests; returns how many requests were sent. A request that gets no answer
        (the peer is starting too, or restarting) is sent again later, :data:`ANNOUNCE_ATTEMPTS` times at
        most."""
        sent = 0
        for peer, held in per_peer.items():
            for start in range(0, len(held), MAX_BATCH):
                self._send_batch(peer, "\n".join(held[start:start + MAX_BATCH]).encode(), 1)
                sent += 1
        return sent

    def _send_batch(self, peer: HostPort, body: bytes, attempt: int) -> None:
        url = f"http://{peer}{BATCH_PATH}"
        headers = self._headers("POST", body_digest(body))  # signed anew: a retry carries a fresh time
        request = self.agent.request(
            b"POST", url.encode("ascii"), headers, FileBodyProducer(io.BytesIO(body))
        )
        request.addTimeout(max(self.timeout, 10.0), self.reactor)
        request.addCallback(self._discard, url, "POST")
        request.addErrback(self._batch_failed, peer, body, attempt)
        self.stats.announcements_sent += 1

    def _batch_failed(self, failure, peer: HostPort, body: bytes, attempt: int) -> None:
        retry = attempt < ANNOUNCE_ATTEMPTS and self._announcing is not None and peer in self.peers.members()
        log.info("announcing this node's cache to %s failed (attempt %d)%s: %s", peer, attempt,
                 "; trying again" if retry else "", failure.getErrorMessage(),
                 extra=fields(event="announcement_failed", host=str(peer), attempt=attempt, retry=retry))
        if not retry:
            return
        delay = ANNOUNCE_RETRY * 2 ** (attempt - 1)

        def again() -> None:
            self._retries.discard(call)
            if self._announcing is not None:
                self._send_batch(peer, body, attempt + 1)

        call = self.reactor.callLater(delay, again)
        self._retries.add(call)

    def start_announcing(self, cached: Callable[[], Sequence[str]],
                         in_thread: Callable[..., defer.Deferred]) -> None:
        """Announce the cache soon after start, then every :data:`REANNOUNCE_INTERVAL`; while no peer is
        known yet (discovery still running), try again every :data:`FIRST_REANNOUNCE` seconds.

        ``cached()`` lists the cached digests; it runs with the grouping in ``in_thread`` (a thread
        pool), since a big cache times many peers is seconds of hashing."""
        def announce() -> float | None:
            members = self.peers.healthy(self.peers.members())
            if not members:
                return FIRST_REANNOUNCE
            grouped = in_thread(lambda: group_by_first_peers(cached(), members, self.lookup))
            grouped.addCallback(self.send_announcements).addErrback(
                lambda failure: log.warning("cannot announce the cache: %s", failure.getErrorMessage()))
            return None

        self._announcing = Periodic(self.reactor, REANNOUNCE_INTERVAL, announce, "cache announcement",
                                    first=FIRST_REANNOUNCE)
        self._announcing.start()

    def stop_announcing(self) -> None:
        if self._announcing is not None:
            self._announcing.stop()
            self._announcing = None
        for call in self._retries:
            if call.active():
                call.cancel()
        self._retries.clear()


def group_by_first_peers(digests: Iterable[str], members: Sequence[HostPort],
                         lookup: int) -> dict[HostPort, list[str]]:
    """For each member, the digests it is one of the first ``lookup`` peers of (pure; any thread)."""
    per_peer: dict[HostPort, list[str]] = {}
    for digest in digests:
        for peer in rendezvous(digest, members)[:lookup]:
            per_peer.setdefault(peer, []).append(digest)
    return per_peer


def body_digest(body: bytes) -> str:
    """The digest a signed POST's signature covers: sha256 of its body."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _parse_holders(values: list[bytes]) -> list[HostPort]:
    holders = []
    for value in values:
        for item in value.decode("ascii", "replace").split(","):
            try:
                holders.append(host_port(item.strip()))
            except ValueError:
                continue  # not IP:port: nothing to ask
    return holders[:MAX_HOLDERS_PER_DIGEST]


def _announcement_failed(peer: HostPort, failure: Any) -> None:
    """A single digest's announcement is best effort: a failed one is logged, not retried (the next
    batch announcement carries the digest again)."""
    log.debug("announcement to %s failed: %s", peer, failure.getErrorMessage())


class PeerRequest(server.Request):
    """A request on the peer listener. No more of a body than a batch announcement is kept (a longer one
    then fails its signature check), so no client can make a node store more than :data:`MAX_BODY`."""

    def handleContentChunk(self, data: bytes) -> None:
        kept = cast(BinaryIO, self.content).tell()
        if kept < MAX_BODY:
            super().handleContentChunk(data[:MAX_BODY - kept])


class PeerResource(resource.Resource):
    """The peer listener: cached blobs and fills under way to signed requests, and holder announcements."""

    isLeaf = True

    def __init__(self, reactor, disk: DiskIO, secret: bytes, holders: Holders, stats: PeerStats,
                 port: int, wall_clock: Callable[[], float] = time.time,
                 running_fill: Callable[[str], Fill | None] = lambda digest: None,
                 uploads: UploadSlots | None = None) -> None:
        super().__init__()
        self.uploads = uploads if uploads is not None else UploadSlots(stats)
        # burst coordination: (sender, signed body) -> the answer's body; None when this node does not
        # take part
        self.on_message: Callable[[HostPort, bytes], bytes] | None = None
        self.reactor = reactor
        self.disk = disk
        self.secret = secret
        self.holders = holders
        self.stats = stats
        self.port = port
        self.wall_clock = wall_clock
        self.running_fill = running_fill

    def render(self, request) -> bytes | int:
        path = request.path.decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        if path == BATCH_PATH:
            return self._batch(request, method)
        if path == SWARM_PATH and self.on_message is not None:
            return self._swarm_message(request, method, self.on_message)
        for prefix, methods in ((BLOB_PATH, ("GET", "HEAD")), (HOLDER_PATH, ("POST",))):
            if not path.startswith(prefix):
                continue
            digest = path[len(prefix):]
            if _SHA256.fullmatch(digest) is None:
                return _plain(request, 400, "not a sha256 digest")
            if method not in methods:
                return _plain(request, 405, "method not allowed")
            if not signature_valid(
                self.secret, request.getHeader(AUTH_HEADER), method, digest, self.wall_clock()
            ):
                self.stats.refused += 1
                return _plain(request, 401, "peer signature missing or invalid")
            if prefix == HOLDER_PATH:
                return self._announced(request, digest)
            defer.ensureDeferred(self._send(request, digest)).addErrback(self._send_failed, request)
            return server.NOT_DONE_YET
        return _plain(request, 404, "not a peer path")

    def _signed_post(self, request, method: str) -> tuple[bytes, bytes | None]:
        """(the body, None) of a POST signed with the cluster's secret (read up to MAX_BODY + 1 bytes: a
        longer one fails the signature), or (b"", the refusal to answer with)."""
        if method != "POST":
            return b"", _plain(request, 405, "method not allowed")
        body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if not signature_valid(self.secret, request.getHeader(AUTH_HEADER), "POST", body_digest(body),
                               self.wall_clock()):
            self.stats.refused += 1
            return b"", _plain(request, 401, "peer signature missing or invalid")
        return body, None

    def _batch(self, request, method: str) -> bytes:
        body, refusal = self._signed_post(request, method)
        if refusal is not None:
            return refusal
        holder = HostPort(request.getClientAddress().host, self.port)
        now = self.reactor.seconds()
        lines = body.decode("ascii", "replace").split("\n")[:MAX_BATCH]
        for digest in lines:
            if _SHA256.fullmatch(digest):
                self.holders.record(digest, holder, now)
        self.stats.announcements_received += 1
        return _plain(request, 204, "")

    def _swarm_message(self, request, method: str, on_message: Callable[[HostPort, bytes], bytes]) -> bytes:
        body, refusal = self._signed_post(request, method)
        if refusal is not None:
            return refusal
        try:
            # the sender is the peer that signed it, at the port every node of the cluster listens on
            answer = on_message(HostPort(request.getClientAddress().host, self.port), body)
        except ValueError as exc:
            return _plain(request, 400, f"not a coordination message: {exc}")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(answer)).encode())
        return answer

    def _announced(self, request, digest: str) -> bytes:
        self.stats.announcements_received += 1
        # the announcing node listens on the same port as every peer of the cluster
        self.holders.record(
            digest, HostPort(request.getClientAddress().host, self.port), self.reactor.seconds()
        )
        return _plain(request, 204, "")

    def _close_later(self, close: Callable[..., object], *args: object) -> None:
        """Close a served file on the disk pool once its streamer is done with it."""
        self.disk.run(close, *args)

    async def _send(self, request, digest: str) -> None:
        fill = self.running_fill(digest)
        if fill is not None and await self._send_fill(request, digest, fill):
            return
        store = cast(Store, self.disk.store)
        reader = await self.disk.run(store.open_blob, digest) if digest in store else None
        if reader is None:
            holders = self.holders.lookup(digest, self.reactor.seconds())
            if holders:
                request.setHeader(HOLDERS_HEADER, ", ".join(map(str, holders)).encode())
            request.write(_plain(request, 404, "not cached here"))
            request.finish()
            return
        info = reader.info
        if request.method == b"GET" and not reader.verified and info.size <= VERIFY_BEFORE_SENDING:
            # small: hashed whole before a byte is sent, so a damaged copy is a clean miss for the asker
            if not await self.disk.run(store.verify_reader, reader):
                self.disk.run(reader.close)
                self._damaged(digest)
                request.write(_plain(request, 404, "not cached here"))
                request.finish()
                return
        start = _range_start(request)
        receiver = self._begin_upload(request, digest, info.size, start)
        if receiver is None:
            self.disk.run(reader.close)
            return
        request.setHeader(
            b"content-type", (info.content_type or "application/octet-stream").encode("latin-1")
        )
        request.setHeader(b"docker-content-digest", digest.encode())
        if request.method == b"HEAD":
            self.disk.run(reader.close)
            request.finish()
            return
        self.stats.served += 1
        outcome: list[bool] = []  # set when a streamed check ends: intact or damaged

        def damaged() -> None:
            self._damaged(digest)
            outcome.append(False)

        def close() -> None:
            self.disk.run(_close_checked, store, reader, outcome[0] if outcome else None)

        # large and not yet verified in this process: hashed as it streams, its last bytes wait for the digest
        check = None if reader.verified or start else digest_hex(digest)
        streamer = BlobStreamer(self.disk, request, reader.file.fileno(), start, info.size, on_close=close,
                                verify=check, on_damaged=damaged, on_intact=lambda: outcome.append(True))
        await self._stream(streamer, digest, receiver)

    def _damaged(self, digest: str) -> None:
        """A cached file failed its digest while a peer asked for it: dropped, never sent as a success."""
        self.stats.damaged += 1
        failures.report("cache", "damaged",
                        "cached file does not match its digest; dropped, not sent to a peer", digest=digest)

    async def _send_fill(self, request, digest: str, fill: Fill) -> bool:
        """Stream a fill under way (False when it ended before its file could be opened)."""
        try:
            fd = await self.disk.run(os.open, fill.temp_path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # committed (the cache has it now) or failed
        start = _range_start(request)
        receiver = self._begin_upload(request, digest, cast(int, fill.total), start)
        if receiver is None:
            self.disk.run(os.close, fd)
            return True
        request.setHeader(
            b"content-type", (fill.content_type or "application/octet-stream").encode("latin-1")
        )
        request.setHeader(b"docker-content-digest", digest.encode())
        if request.method == b"HEAD":
            self.disk.run(os.close, fd)
            request.finish()
            return True
        self.stats.served += 1
        self.stats.served_while_filling += 1
        streamer = BlobStreamer(self.disk, request, fd, start, fill.total, fill=fill,
                                on_close=partial(self._close_later, os.close, fd))
        await self._stream(streamer, digest, receiver)
        return True

    def _begin_upload(self, request, digest: str, size: int, start: int) -> HostPort | None:
        """Length (and range) headers of a blob about to be sent from ``start``, and for a GET an upload
        slot; None when answered already (no free slot: 503; a range past the end: 416)."""
        if start >= size > 0:
            request.write(_plain(request, 416, "range starts past the end"))
            request.finish()
            return None
        receiver = HostPort(request.getClientAddress().host, self.port)
        if request.method == b"GET" and not self.uploads.acquire(digest, receiver):
            request.write(_plain(request, 503, "busy: no upload slot free for this blob"))
            request.finish()
            return None
        request.setHeader(b"content-length", str(size - start).encode())
        if start:
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{size - 1}/{size}".encode())
        return receiver

    async def _stream(self, streamer: BlobStreamer, digest: str, receiver: HostPort) -> None:
        """Send with ``streamer``, holding the upload slot taken for it until it ends."""
        try:
            complete = await streamer.start()
        except BaseException:
            self.uploads.release(digest, receiver, False)
            raise
        self.uploads.release(digest, receiver, bool(complete))

    def _send_failed(self, failure, request) -> None:
        log.error("peer request failed: %s", failure.getTraceback())
        if not request.startedWriting:
            request.write(_plain(request, 500, "internal error"))
            request.finish()


def _range_start(request) -> int:
    """N of a ``Range: bytes=N-`` header (what peers send to resume), else 0: a whole body."""
    value = request.getHeader(b"range")
    match = re.fullmatch(rb"bytes=(\d{1,15})-", value.strip()) if value else None
    return int(match.group(1)) if match else 0


def _close_checked(store, reader, intact: bool | None) -> None:
    """Close a cached blob's reader after a streamed check (disk pool): remember or drop the file first."""
    try:
        if intact:
            store.mark_verified(reader)
        elif intact is False:
            store.drop_damaged(reader, "blob content does not match its digest")
    finally:
        reader.close()


def _plain(request, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    if code == 204:
        return b""
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    body = (message + "\n").encode()
    request.setHeader(b"content-length", str(len(body)).encode())
    return body
