"""The sources of content by digest, behind one interface: the cache, containerd's store, peers, upstream.

Each :class:`Source` resolves a request to an outcome (:mod:`dnsmirror.outcomes`): a body to stream, a
refusal to pass on, or :class:`~dnsmirror.outcomes.NotHere`. None writes to the request;
:class:`~dnsmirror.content.ContentChain` tries them in order and owns the single-flight table, the
access checks and the fills' outcomes, which the sources share through it.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer

from dnsmirror import failures, oci
from dnsmirror.contracts import BlobWriter
from dnsmirror.contracts import Source as Source  # declared in contracts.py; still importable from here
from dnsmirror.logs import fields
from dnsmirror.outcomes import (
    Failed,
    FromCache,
    FromFill,
    Manifest,
    NotHere,
    Outcome,
    PassOn,
    Relayed,
    Uncached,
)
from dnsmirror.respond import unavailable
from dnsmirror.store import BlobReader, ContainerdContentSource, StoreFull
from dnsmirror.streaming import FileFeed, ResumableBody
from dnsmirror.target import Target
from dnsmirror.uploads import StreamingRequest
from dnsmirror.upstream import UPSTREAM_FAILURES

if TYPE_CHECKING:
    from collections.abc import Callable

    from dnsmirror.config import HostPort
    from dnsmirror.content import ContentChain
    from dnsmirror.contracts import UpstreamAnswer
    from dnsmirror.streaming import Fill
    from dnsmirror.swarm_node import SwarmDriver

log = logging.getLogger("dnsmirror.sources")

# an unverified cached blob up to this size is hashed whole before a byte is sent (a damaged one is then
# replaced at once); a bigger one is hashed as it streams, its last bytes held back until the digest matches
VERIFY_BEFORE_SERVING = 16 * 1024 * 1024
# errors creating a cache file that say the disk itself cannot take files now
_DISK_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
# why a peer's manifest is refused: the peer is at fault, not the cache
_OVERSIZED = "oversized manifest"


def wants_range(request: StreamingRequest, target: Target) -> bool:
    """Whether the request asks for part of a blob."""
    return not target.is_manifest and request.getHeader(b"range") is not None


def upstream_headers(request: StreamingRequest, target: Target) -> dict[bytes, list[bytes]]:
    """What an upstream GET on the client's behalf carries: its credentials, Accept and User-Agent."""
    headers = target.auth_headers()
    for name in (b"accept", b"user-agent"):
        values = request.requestHeaders.getRawHeaders(name)
        if values:
            headers[name] = list(values)
    return headers


class CacheSource:
    """The local cache: served once the request's credentials are allowed; a damaged file is dropped."""

    name = "cache"

    def __init__(self, chain: ContentChain) -> None:
        self.chain = chain
        self.disk = chain.disk
        self.store = chain.store

    async def resolve(self, request: StreamingRequest, target: Target) -> Outcome:
        # the index is in memory: only a hit needs the disk thread (its sidecar may be read)
        if target.digest not in self.store or await self.disk.run(self.store.stat, target.digest) is None:
            return NotHere("not cached")
        refusal = await self.chain.may_read(target)
        if refusal is not None:
            return refusal
        return await self.open(request, target)

    async def open(self, request: StreamingRequest, target: Target, source: str = "cache") -> Outcome:
        """The cached blob, ready to stream (access already granted), or NotHere once evicted or damaged;
        ``source`` is where its bytes came from for this request (a fill just committed: not a cache hit)."""
        reader: BlobReader | None = await self.disk.run(self.store.open_blob, target.digest)
        if reader is None:
            return NotHere("evicted meanwhile")
        info = reader.info
        # manifests are answered whole (never in ranges); an oversized one streams like a blob
        if target.is_manifest and info.size <= oci.MANIFEST_MAX_SIZE:
            try:
                # small: hashed whole before a byte is sent, so a damaged copy is replaced, not served
                manifest: bytes | None = await self.disk.run(
                    self.store.read_verified, reader, oci.MANIFEST_MAX_SIZE
                )
            finally:
                self.disk.run(reader.close)
            if manifest is None:
                self.chain.damaged(target)
                return NotHere("damaged")
            self.chain.stats.cache_hits += source == "cache"
            return Manifest(manifest, info.content_type, source)
        ranged = target.method == "GET" and wants_range(request, target)
        small = target.method == "GET" and info.size <= VERIFY_BEFORE_SERVING
        if (ranged or small) and not reader.verified:
            # a range cannot be checked on its own: the whole file is, once, before any range is served
            if not await self.disk.run(self.store.verify_reader, reader):
                self.disk.run(reader.close)
                self.chain.damaged(target)
                return NotHere("damaged")
        self.chain.stats.cache_hits += source == "cache"
        return FromCache(
            reader,
            check_digest=not reader.verified,
            damaged=lambda: self.chain.damaged(target),
            finished=lambda intact: self.disk.run(self._close_checked, reader, intact),
            source=source,
        )

    def _close_checked(self, reader: BlobReader, intact: bool | None) -> None:
        """Close a cached blob's reader after a streamed check (disk pool): remember or drop the file
        first."""
        try:
            if intact:
                self.store.mark_verified(reader)
            elif intact is False:
                self.store.drop_damaged(reader, "blob content does not match its digest")
        finally:
            reader.close()


class ContainerdSource:
    """A blob in containerd's content store, copied into the cache as it is served, verified.

    Manifests are skipped: containerd does not keep their media type, which clients need."""

    name = "containerd"

    def __init__(self, chain: ContentChain, containerd: ContainerdContentSource) -> None:
        self.chain = chain
        self.containerd = containerd
        # digests whose copy in containerd's store failed verification: fetched upstream instead
        self.rejected: set[str] = set()

    async def resolve(self, request: StreamingRequest, target: Target) -> Outcome:
        chain = self.chain
        if target.is_manifest or target.method != "GET" or target.digest in self.rejected:
            return NotHere("not asked of containerd")
        reader: BlobReader | None = await chain.disk.run(self.containerd.open_blob, target.digest)
        if reader is None:
            return NotHere("not in containerd's store")
        # containerd's store holds every team's content: the same access check as the cache
        refusal = await chain.may_read(target)
        if refusal is not None or target.digest in chain.slots:
            chain.disk.run(reader.close)
            return refusal or NotHere("a fill started meanwhile")
        slot = chain.open_slot(target, source=self.name)
        try:
            writer: BlobWriter = await chain.disk.run(
                chain.store.writer, target.digest, expected_size=reader.size
            )
        except Exception:  # noqa: BLE001 - any failure to create the file: containerd's copy is simply not used
            chain.close_slot(slot, None)
            chain.disk.run(reader.close)
            return NotHere("the cache cannot take it")
        fill = chain.new_fill(writer, target, reader.size, "application/octet-stream")
        chain.close_slot(slot, fill)
        chain.stats.containerd_hits += 1
        chain.fill_started(target, slot, fill)
        FileFeed(chain.disk, reader, fill).start()
        return FromFill(fill, self.name)

    def failed(self, digest: str) -> None:
        """Its copy of ``digest`` did not verify: never asked for it again."""
        if len(self.rejected) < 100_000:
            self.rejected.add(digest)


class PeerSource:
    """A peer node that holds the digest, once upstream confirmed (or recently granted) that the request
    may read it; a peer that breaks off mid-blob is finished from upstream.

    A blob no peer has yet is coordinated (``swarm``, :mod:`dnsmirror.swarm_node`): the coordinator's fill
    lease means this node fills from upstream (and others stream from it while it grows); an offer means
    streaming from that holder, and on from the next source after a failure."""

    name = "peer"

    def __init__(self, chain: ContentChain, peers, swarm: SwarmDriver | None = None) -> None:
        self.chain = chain
        self.peers = peers
        self.swarm = swarm

    async def resolve(self, request, target: Target) -> Outcome:
        chain = self.chain
        # a cache disk that was full recently: upstream's answer is streamed uncached instead
        if not self.peers.available() or chain.caching_paused():
            return NotHere("no peers")
        refusal = await chain.may_read(target)
        if isinstance(refusal, PassOn):
            return refusal
        if refusal is not None:
            return NotHere("access unconfirmed")  # upstream is asked next, and says why
        if self.swarm is not None:
            return await self._coordinated(request, target)
        return await self._looked_up(request, target)

    async def _looked_up(self, request, target: Target) -> Outcome:
        """A copy found by a lookup (cached or filling at a peer that announced it), or NotHere."""
        chain = self.chain
        found = await self.peers.fetch(target.digest)
        if found is None:
            return NotHere("no peer has it")
        peer, response = found
        fill = await self._start_fill(target, peer, response)
        if isinstance(fill, NotHere):
            return fill
        slot = chain.slots[target.digest]

        def broke(reason: str) -> None:
            self.peers.failed(peer, target.digest, f"body broke off at byte {fill.received}: {reason}")
            chain.stats.peer_resumes += 1
            slot.peer = None  # reported: the fill's outcome is upstream's from here

        # a peer that goes away mid-blob costs its clients nothing: upstream sends the rest
        response.deliver_body(ResumableBody(fill, self._rest_from_upstream(request, target, fill), broke))
        return FromFill(fill, self.name)

    async def _coordinated(self, request, target: Target) -> Outcome:
        """What the node's coordination decides: stream from a holder, or (the fill lease, or coordination
        could not help) fill this node, from a copy peers announced (cached before a restart, an older
        node's) or else from upstream; the fill is this node's to register as a holder."""
        swarm = cast("SwarmDriver", self.swarm)
        decision = await swarm.pull(target.digest)
        while decision is not None and decision.holder is not None:
            response, refused = await swarm.get(decision.holder, target.digest, 0)
            if response is not None:
                return await self._from_holder(request, target, decision.holder, response)
            decision = await swarm.holder_failed(target.digest, refused)
        outcome = await self._looked_up(request, target)
        if isinstance(outcome, NotHere):
            outcome = await self.chain.upstream_source.resolve(request, target)
        if isinstance(outcome, FromFill) and not outcome.fill.uncached and outcome.fill.total is not None:
            swarm.filling(target.digest, outcome.fill)
        else:
            swarm.abandon(target.digest)
        return outcome

    async def _from_holder(self, request, target: Target, holder, response) -> Outcome:
        """Stream ``holder``'s answer into a fill; after a break the next source sends the rest."""
        chain = self.chain
        swarm = cast("SwarmDriver", self.swarm)
        fill = await self._start_fill(target, holder, response)
        if isinstance(fill, NotHere):
            swarm.abandon(target.digest, failed=fill.why == _OVERSIZED)
            return fill
        slot = chain.slots[target.digest]

        def source_changed(source) -> None:
            slot.peer = source  # the peer blamed if the fill fails (None: upstream sends the rest)
            if source is None:
                chain.stats.peer_resumes += 1

        swarm.feed(target.digest, fill, response, self._rest_from_upstream(request, target, fill),
                   source_changed, holder)
        return FromFill(fill, self.name)

    def _rest_from_upstream(self, request, target: Target,
                            fill: Fill) -> Callable[[int], defer.Deferred[UpstreamAnswer | None]]:
        """What a fill fed by a peer asks for the rest of the blob from a byte: upstream, with the client's
        request headers (its credentials) and a range."""
        headers = upstream_headers(request, target)
        return lambda offset: defer.ensureDeferred(self._upstream_rest(target, headers, offset, fill.total))

    async def _start_fill(self, target: Target, peer: HostPort, response: UpstreamAnswer) -> Fill | NotHere:
        """A fill of ``target`` fed by ``peer``'s answer, or NotHere: a manifest too big (blamed on the peer),
        or a cache that cannot take it (then upstream's answer is streamed uncached)."""
        chain = self.chain
        content_type = (response.headers.getRawHeaders(b"content-type") or [b"application/octet-stream"])[0]
        if target.is_manifest and (response.length is None or response.length > oci.MANIFEST_MAX_SIZE):
            await response.discard(0)
            self.peers.failed(peer, target.digest, f"manifest of {response.length or 'unknown'} bytes")
            return NotHere(_OVERSIZED)
        try:
            writer = await chain.disk.run(chain.store.writer, target.digest,
                                          content_type=content_type.decode("latin-1"),
                                          expected_size=response.length)
        except (StoreFull, OSError):
            await response.discard(0)
            return NotHere("the cache cannot take it")
        chain.stats.peer_fills += 1
        slot = chain.slots[target.digest]
        slot.source, slot.peer = self.name, peer
        return chain.new_fill(writer, target, response.length, content_type.decode("latin-1"))

    async def _upstream_rest(self, target: Target, headers: dict, offset: int, total: int | None):
        """Upstream's answer for bytes ``offset``- of the blob (206 with the matching range), or None (also
        when the blob's size is unknown: the range answered could not be checked)."""
        if total is None:
            return None
        ranged = {**headers, b"range": [f"bytes={offset}-".encode()]}
        try:
            response = await self.chain.upstream.request("GET", target.url, ranged, follow_redirects=True)
        except UPSTREAM_FAILURES as exc:
            log.warning(
                "cannot resume a broken peer transfer upstream",
                extra=fields(event="peer_resume_failed", digest=target.digest, reason=str(exc)),
            )
            return None
        answered = (response.headers.getRawHeaders(b"content-range") or [b""])[0].decode("latin-1")
        if response.code != 206 or answered != f"bytes {offset}-{total - 1}/{total}":
            await response.discard(0)
            log.warning(
                "cannot resume a broken peer transfer upstream",
                extra=fields(
                    event="peer_resume_failed",
                    digest=target.digest,
                    reason=f"upstream answered {response.code} {answered!r} to a range from byte {offset}",
                ),
            )
            return None
        return response


class UpstreamSource:
    """The registry itself, with the client's credentials: its 200 fills the cache (or, when the cache
    cannot take it, streams uncached), anything else reaches the client as upstream sent it."""

    name = "upstream"

    def __init__(self, chain: ContentChain) -> None:
        self.chain = chain

    async def resolve(self, request: StreamingRequest, target: Target, cache: bool = True) -> Outcome:
        """Ask upstream. Without ``cache`` the answer never fills the cache (a whole body is relayed,
        verified; a range passed through)."""
        chain, store = self.chain, self.chain.store
        headers = upstream_headers(request, target)
        # the cache file is created while upstream answers, off the response's critical path
        early_writer: defer.Deferred[Any] | None = None
        if cache and not chain.caching_paused():
            early_writer = chain.disk.run(store.writer, target.digest)
        try:
            response = await chain.upstream.request("GET", target.url, headers, follow_redirects=True)
        except UPSTREAM_FAILURES as exc:
            self._drop_writer(early_writer)
            return Failed(unavailable(str(exc)), self.name)
        except BaseException:
            self._drop_writer(early_writer)
            raise
        if response.code != 200:
            self._drop_writer(early_writer)
            return Relayed(response, self.name)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b"application/octet-stream"])[0]
        if target.is_manifest and response.length is not None and response.length > oci.MANIFEST_MAX_SIZE:
            self._drop_writer(early_writer)
            await response.discard(0)
            return Failed(
                oci.OCIError("MANIFEST_INVALID", "manifest larger than 4 MiB", status=502), self.name
            )
        chain.grants.grant(
            target.credential,
            target.upstream_host,
            target.repository,
            [target.digest],
            chain.reactor.seconds(),
        )
        try:
            if early_writer is None:
                raise StoreFull(
                    "the cache disk failed recently" if cache else "the fill under way is not cached"
                )
            if response.length is not None and response.length > store.max_size:
                self._drop_writer(early_writer)
                raise StoreFull(
                    f"blob of {response.length} bytes is larger than the cache ({store.max_size} bytes)"
                )
            try:
                writer: BlobWriter = await early_writer
            except OSError as exc:  # no room for even a new file (inodes), or no access: serve uncached
                if exc.errno in _DISK_FAULTS:  # the disk, not a passing mishap: leave it alone a while
                    chain.pause_caching()
                raise StoreFull(f"cannot create a cache file: {exc.strerror or exc}") from exc
            if response.length is not None and writer.room is not None and response.length > writer.room:
                chain.disk.run(writer.abort)
                # evicting old blobs may let the next request for it be cached
                chain.disk.run(store.make_room, response.length)
                raise StoreFull(f"no room for {response.length} bytes on the cache's filesystem")
            writer.describe(content_type.decode("latin-1"), response.length)
        except StoreFull as exc:
            if cache:
                failures.report(
                    "cache",
                    "full",
                    f"{exc}; streaming without caching",
                    host=target.upstream_host,
                    repository=target.repository,
                    digest=target.digest,
                )
            chain.stats.uncached_streams += 1
            if wants_range(request, target):
                await response.discard(0)
                return PassOn()
            return Uncached(response, content_type.decode("latin-1"))
        fill = chain.new_fill(writer, target, response.length, content_type.decode("latin-1"))
        response.deliver_body(fill.body_protocol())
        return FromFill(fill, self.name)

    def _drop_writer(self, pending: defer.Deferred[Any] | None) -> None:
        """Abort a cache writer created ahead of an answer that will not fill the cache."""
        if pending is not None:
            pending.addCallback(lambda writer: self.chain.disk.run(writer.abort))
            pending.addErrback(lambda _: None)
