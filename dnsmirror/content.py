"""Blobs and manifests by digest: the local cache, then peer nodes, then upstream.

For each ``GET``/``HEAD /v2/<name>/(blobs|manifests)/<digest>``:

1. cached (or being filled) and the request's credentials are allowed (:mod:`dnsmirror.authz`: a grant
   from upstream's own answer for this digest in this repository, else one ``HEAD`` upstream, merged
   with any other check of the same credential, repository and digest under way): served from disk,
   ranges included, also while the fill is still running;
2. otherwise one fill per digest (single-flight): from a peer node that has it, once upstream confirmed
   that the request's credentials may read it (:mod:`dnsmirror.peers`), else from upstream. Every
   waiter streams from the growing file; the blob is committed only when its sha256 matches, and a
   mismatch aborts every waiter's connection before its last byte;
3. any refusal from upstream (401/403/404, ...) reaches the client exactly as upstream sent it.

A cached file not known to be intact (see :mod:`dnsmirror.store`) is hashed before a client may keep
it: a manifest or a range is verified whole before it is sent, a whole blob while it streams (its last
bytes wait for the digest). A damaged file is dropped and the content fetched again. When the cache
cannot take a blob (no room, a full, read-only or failing disk), the blob streams uncached, and a range
is passed through to upstream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from dnsmirror import failures, oci
from dnsmirror.authz import Access, Grants, access_from_answer
from dnsmirror.config import HostPort
from dnsmirror.contracts import BlobStore, BlobWriter, Source, Upstream
from dnsmirror.flight import Flight
from dnsmirror.logs import fields
from dnsmirror.outcomes import Failed, FromFill, NotHere, Outcome, PassOn, Refusal, UncachedWanted
from dnsmirror.peers import PeerClient
from dnsmirror.proxy import PassThrough
from dnsmirror.respond import Responder, unavailable
from dnsmirror.sources import CacheSource, ContainerdSource, PeerSource, UpstreamSource, wants_range
from dnsmirror.store import ContainerdContentSource, DigestMismatch, StoreFull
from dnsmirror.streaming import DiskIO, Fill
from dnsmirror.swarm_node import SwarmDriver
from dnsmirror.target import Target
from dnsmirror.uploads import StreamingRequest
from dnsmirror.upstream import UPSTREAM_FAILURES

log = logging.getLogger("dnsmirror.content")

_ATTEMPTS = 3
# after the cache disk failed (full, read-only, failing), blobs are streamed uncached this long before trying
# again
UNCACHED_BACKOFF = 60.0


@dataclass
class ContentStats:
    """Counters for the metrics endpoint."""

    cache_hits: int = 0
    cache_misses: int = 0
    fills_started: int = 0
    fills_joined: int = 0
    fills_failed: int = 0
    digest_mismatches: int = 0
    access_checks: int = 0          # authorisation HEADs sent upstream
    access_checks_merged: int = 0   # checks that waited for the same credential's HEAD already under way
    access_denied: int = 0
    offline_served: int = 0
    uncached_streams: int = 0
    damaged_entries: int = 0  # cached files found not to match their digest (dropped)
    containerd_hits: int = 0
    peer_fills: int = 0
    peer_resumes: int = 0  # peer transfers that broke off and were finished from upstream
    bytes_served: int = 0


def _owner(target: Target) -> tuple[str, str, str]:
    """Whose access a fill's start proved: the same credential in another repository proves nothing."""
    return target.credential, target.upstream_host, target.repository


class _Slot(Flight[Fill | None]):
    """A fill being started: waiters learn the Fill, or None if the starter got no 200 upstream."""

    def __init__(self, target: Target, source: str = "upstream") -> None:
        super().__init__()
        # a joiner with the starter's credential, host and repository needs no access check of its own
        self.owner = _owner(target)
        self.digest = target.digest
        self.source = source
        self.peer: HostPort | None = None  # the peer node a fill streams from, if any

    @property
    def fill(self) -> Fill | None:
        return self.result


class ContentChain:
    """Serves reads by digest: tries its sources in order, one fill per digest at a time.

    The sources (:mod:`dnsmirror.sources`) decide, :class:`~dnsmirror.respond.Responder` answers; the chain
    owns what they share: the single-flight table of fills, the authorisation checks and the backoff
    of a failing cache disk."""

    def __init__(
        self,
        reactor: Any,
        disk: DiskIO,
        upstream: Upstream,
        grants: Grants,
        passthrough: PassThrough,
        stats: ContentStats | None = None,
        containerd: ContainerdContentSource | None = None,
        peers: PeerClient | None = None,
        swarm: SwarmDriver | None = None,
    ) -> None:
        if disk.store is None:
            raise ValueError("the content chain needs a cache store")
        self.reactor = reactor
        self.disk = disk
        self.store: BlobStore = disk.store
        self.upstream = upstream
        self.grants = grants
        self.passthrough = passthrough
        self.stats = stats or ContentStats()
        self.slots: dict[str, _Slot] = {}
        # authorisation HEADs under way, by (credential, host, repository, digest, manifest?)
        self.checks: dict[tuple[str, str, str, str, bool], Flight[Access]] = {}
        self.uncached_until = 0.0
        self.peers = peers
        self.cache = CacheSource(self)
        self.containerd = ContainerdSource(self, containerd) if containerd is not None else None
        self.peer_source = PeerSource(self, peers, swarm) if peers is not None else None
        self.upstream_source = UpstreamSource(self)
        # tried in order while no fill of the digest runs; the filling ones under one single-flight slot
        self.local_sources: list[Source] = [self.cache]
        if self.containerd is not None:
            self.local_sources.append(self.containerd)
        self.fill_sources: list[Source] = [self.upstream_source]
        if self.peer_source is not None:
            self.fill_sources.insert(0, self.peer_source)
        self.respond = Responder(disk, passthrough, self.stats, self._fetch_uncached, self.cache.open)

    async def serve(self, request: StreamingRequest, target: Target) -> None:
        """Answer one GET/HEAD by digest."""
        for _ in range(_ATTEMPTS):
            outcome, held = await self._resolve(request, target)
            try:
                if await self.respond.render(request, target, outcome):
                    return
            finally:
                if held is not None:
                    self.close_slot(held, None)
        await self.respond.render(request, target, Failed(unavailable("content could not be fetched")))

    async def _resolve(self, request: StreamingRequest, target: Target) -> tuple[Outcome, _Slot | None]:
        """One look through the sources: the outcome, and a slot the chain holds until it is answered."""
        slot = self.slots.get(target.digest)
        if slot is not None:
            return await self._join(target, slot), None
        for source in self.local_sources:
            outcome = await source.resolve(request, target)
            if not isinstance(outcome, NotHere):
                return outcome, None
            if target.digest in self.slots:
                return NotHere("a fill started meanwhile"), None
        if target.method == "HEAD":
            return PassOn(), None
        if wants_range(request, target) and self.caching_paused():
            # the cache disk failed recently: upstream answers the range itself, with the client's credentials
            self.stats.uncached_streams += 1
            return PassOn(), None
        self.stats.cache_misses += 1
        slot = self.open_slot(target)
        outcome = NotHere("no source")
        try:
            for source in self.fill_sources:
                outcome = await source.resolve(request, target)
                if not isinstance(outcome, NotHere):
                    break
        except BaseException:
            self.close_slot(slot, None)
            raise
        if not isinstance(outcome, FromFill):
            return outcome, slot  # joiners wait until it is answered, as they would for a fill
        self.close_slot(slot, outcome.fill)
        self.stats.fills_started += 1
        self.fill_started(target, slot, outcome.fill)
        if self.peers is not None and outcome.fill.total is not None:
            self.peers.announce(target.digest)  # other nodes may stream this fill while it runs
        return outcome, None

    async def _join(self, target: Target, slot: _Slot) -> Outcome:
        """A fill of the digest is being started or running: stream from it."""
        fill = await slot.wait()
        if fill is None or fill.failure is not None:
            return NotHere("the fill failed")
        refusal = await self.may_read(target, granted_by_fill=slot.owner == _owner(target))
        if refusal is not None:
            return refusal
        if fill.uncached:  # its disk failed: it keeps only what its own readers still need
            return UncachedWanted()
        self.stats.fills_joined += 1
        return FromFill(fill, "fill")

    async def _fetch_uncached(self, request: StreamingRequest, target: Target) -> None:
        """Answer from upstream without the cache: a whole body verified as it streams, a range passed
        through."""
        if target.method == "HEAD" or wants_range(request, target):
            outcome: Outcome = PassOn()
        else:
            outcome = await self.upstream_source.resolve(request, target, cache=False)
        await self.respond.render(request, target, outcome)

    # --- the single-flight table ---------------------------------------------------------------------

    def open_slot(self, target: Target, source: str = "upstream") -> _Slot:
        """Claim the fill of ``target.digest``: requests for it meanwhile wait for its outcome."""
        slot = _Slot(target, source)
        self.slots[target.digest] = slot
        return slot

    def close_slot(self, slot: _Slot, fill: Fill | None) -> None:
        """Tell the slot's waiters the fill (or None: none started, and the slot is let go)."""
        slot.settle(fill)
        if fill is None and self.slots.get(slot.digest) is slot:
            del self.slots[slot.digest]

    def fill_started(self, target: Target, slot: _Slot, fill: Fill) -> None:
        """A fill runs: its end (committed or failed) is the chain's to record."""
        fill.done.addBoth(self._fill_finished, target, slot, fill)

    def new_fill(self, writer: BlobWriter, target: Target, total: int | None, content_type: str) -> Fill:
        """A fill of ``target.digest`` into ``writer``, paced on the chain's clock."""
        return Fill(self.disk, writer, target.digest, total, content_type, clock=self.reactor)

    # --- the failing-disk backoff ------------------------------------------------------------------

    def caching_paused(self) -> bool:
        """Whether the cache disk failed recently: content is streamed uncached, ranges passed through."""
        return self.reactor.seconds() < self.uncached_until

    def pause_caching(self) -> None:
        """The cache disk failed (full, read-only, failing): leave it alone for :data:`UNCACHED_BACKOFF`."""
        self.uncached_until = self.reactor.seconds() + UNCACHED_BACKOFF

    def damaged(self, target: Target) -> None:
        """A cached file did not match its digest: it is dropped, and the request looks again."""
        self.stats.damaged_entries += 1
        failures.report(
            "cache",
            "damaged",
            "cached file does not match its digest; dropped",
            host=target.upstream_host,
            repository=target.repository,
            digest=target.digest,
        )

    def running_fill(self, digest: str) -> Fill | None:
        """The fill of ``digest`` under way on this node, if its length is known (peers may stream it)."""
        slot = self.slots.get(digest)
        fill = slot.fill if slot is not None else None
        if fill is None or fill.failure is not None or fill.total is None or fill.uncached:
            return None
        return fill

    # --- authorisation -------------------------------------------------------------------------------

    async def may_read(self, target: Target, granted_by_fill: bool = False) -> Refusal | None:
        """None when the request may read cached content; otherwise what it gets instead."""
        access = Access.ALLOWED if granted_by_fill else await self.check_access(target)
        if access is Access.ALLOWED:
            return None
        if access is Access.DENIED:
            self.stats.access_denied += 1
            return PassOn()  # upstream's own refusal, to the client's own request
        return Failed(unavailable("cannot confirm access to cached content"))

    async def check_access(self, target: Target) -> Access:
        """Would upstream serve this digest to this request's credentials, in this repository?

        A fresh grant answers at once; otherwise one ``HEAD`` upstream with the request's credentials,
        shared by every request of the same credential for the same digest and repository meanwhile (a
        pull's parallel reads, a client's retries)."""
        now = self.reactor.seconds()
        if self.grants.is_fresh(
            target.credential, target.upstream_host, target.repository, target.digest, now
        ):
            return Access.ALLOWED
        key = (target.credential, target.upstream_host, target.repository, target.digest, target.is_manifest)
        check = self.checks.get(key)
        if check is None:
            check = Flight[Access]()
            defer.ensureDeferred(self._ask_upstream(target, now)).addBoth(check.settle)
            if not check.settled:
                self.checks[key] = check
                check.wait().addBoth(lambda _: self.checks.pop(key, None))
        else:
            self.stats.access_checks_merged += 1
        return await check.wait()

    async def _ask_upstream(self, target: Target, now: float) -> Access:
        """One authorisation ``HEAD`` upstream; its 200 grants exactly this digest in this repository."""
        self.stats.access_checks += 1
        kind = "manifests" if target.is_manifest else "blobs"
        url = f"https://{target.upstream_host}/v2/{target.repository}/{kind}/{target.digest}"
        headers = target.auth_headers()
        if target.is_manifest:
            headers[b"accept"] = [", ".join(sorted(oci.MANIFEST_TYPES)).encode()]
        try:
            response = await self.upstream.request("HEAD", url, headers, follow_redirects=True)
            await response.discard()
        except UPSTREAM_FAILURES as exc:
            return self._offline(target, now, str(exc))
        access = access_from_answer(response.code)
        if access is Access.ALLOWED:
            self.grants.grant(
                target.credential, target.upstream_host, target.repository, [target.digest], now
            )
        elif access is Access.DENIED:
            self.grants.revoke(target.credential, target.upstream_host, target.repository, target.digest)
        else:
            return self._offline(target, now, f"upstream answered {response.code}")
        return access

    def _offline(self, target: Target, now: float, reason: str) -> Access:
        if self.grants.allows_offline(
            target.credential, target.upstream_host, target.repository, target.digest, now
        ):
            self.stats.offline_served += 1
            log.warning("upstream unreachable; serving cached content to a recently granted credential",
                        extra=fields(event="offline_serve", host=target.upstream_host,
                                     repository=target.repository, digest=target.digest, reason=reason))
            return Access.ALLOWED
        return Access.UNREACHABLE

    def _fill_finished(self, result: object, target: Target, slot: _Slot, fill: Fill) -> None:
        if self.slots.get(target.digest) is slot:
            del self.slots[target.digest]
        if isinstance(result, Failure):
            cause = result.value.__cause__
            self.stats.fills_failed += 1
            if isinstance(cause, DigestMismatch):
                self.stats.digest_mismatches += 1
            # a full, read-only or failing disk (the fill's own writes, or its commit): leave it alone a while
            disk_fault = (
                isinstance(cause, StoreFull)
                or (cause is not None and cause is fill.writer.failure)
                or (fill.verified and isinstance(cause, OSError))
            )
            if disk_fault:
                self.pause_caching()
            elif slot.source == "containerd" and self.containerd is not None:
                self.containerd.failed(target.digest)
            # info: the failure itself is reported (once, at warning) where it happened
            log.info("fill failed; nothing cached", extra=fields(event="fill_failed", digest=target.digest,
                                                                host=target.upstream_host, source=slot.source,
                                                                reason=str(result.value)))
            failures.report_fill_failure(slot.source, cause, str(result.value), host=target.upstream_host,
                                         repository=target.repository, digest=target.digest)
            if slot.peer is not None and not disk_fault and self.peers is not None:
                self.peers.failed(slot.peer, target.digest, str(result.value))
            return None
        log.info("cached", extra=fields(event="fill_done", digest=target.digest, host=target.upstream_host,
                                        repository=target.repository, source=slot.source, bytes=fill.written,
                                        seconds=round(time.monotonic() - fill.started, 3)))
        if self.peers is not None:
            self.peers.announce(target.digest)
        # nothing a manifest refers to is granted: a reference is the pusher's claim, not upstream's answer
        return None
