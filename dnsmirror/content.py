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

import errno
import logging
import os
import time
from dataclasses import dataclass

from twisted.internet import defer
from twisted.python.failure import Failure

from dnsmirror import failures, oci
from dnsmirror.authz import Access, Grants, access_from_answer
from dnsmirror.logs import fields
from dnsmirror.peers import PeerClient
from dnsmirror.proxy import PassThrough, relay, unavailable, write_error
from dnsmirror.store import BlobInfo, ContainerdContentSource, DigestMismatch, StoreFull
from dnsmirror.store import digest_hex as oci_hex
from dnsmirror.streaming import BlobStreamer, DiskIO, FileFeed, Fill, ResumableBody, VerifiedRelay
from dnsmirror.target import Target
from dnsmirror.upstream import UPSTREAM_FAILURES, UpstreamClient

log = logging.getLogger("dnsmirror.content")

_ATTEMPTS = 3
# after the disk filled up mid-fill, blobs are streamed uncached for this long before trying again
UNCACHED_BACKOFF = 60.0
# an unverified cached blob up to this size is hashed whole before a byte is sent (a damaged one is then
# replaced at once); a bigger one is hashed as it streams, its last bytes held back until the digest matches
VERIFY_BEFORE_SERVING = 16 * 1024 * 1024
# errors creating a cache file that say the disk itself cannot take files now
_DISK_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


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


class _SharedCheck:
    """One authorisation HEAD under way; every request that needs the same answer waits for it."""

    def __init__(self, answer: defer.Deferred) -> None:
        self._waiters: list[defer.Deferred] = []
        self._result = None
        self.settled = False
        answer.addBoth(self._settle)

    def _settle(self, result) -> None:
        self._result, self.settled = result, True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:  # a waiter whose client left was cancelled
                d.callback(result)

    def wait(self) -> defer.Deferred:
        if self.settled:
            return defer.succeed(self._result) if not isinstance(self._result, Failure) else defer.fail(self._result)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d


class _Slot:
    """A fill being started: waiters learn the Fill, or None if the starter got no 200 upstream."""

    def __init__(self, target: Target, source: str = "upstream") -> None:
        # a joiner with the starter's credential, host and repository needs no access check of its own
        self.owner = _owner(target)
        self.source = source
        self.peer = None  # the peer node a fill streams from, if any
        self.fill: Fill | None = None
        self.settled = False
        self._waiters: list[defer.Deferred] = []

    def wait(self) -> defer.Deferred:
        if self.settled:
            return defer.succeed(self.fill)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

    def settle(self, fill: Fill | None) -> None:
        self.fill = fill
        self.settled = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(fill)


class ContentChain:
    """Serves reads by digest from the cache or a single upstream fill."""

    def __init__(self, reactor, disk: DiskIO, upstream: UpstreamClient, grants: Grants, passthrough: PassThrough,
                 stats: ContentStats | None = None, containerd: ContainerdContentSource | None = None,
                 peers: PeerClient | None = None) -> None:
        self.reactor = reactor
        self.disk = disk
        self.store = disk.store
        self.upstream = upstream
        self.grants = grants
        self.passthrough = passthrough
        self.stats = stats or ContentStats()
        self.slots: dict[str, _Slot] = {}
        # authorisation HEADs under way, by (credential, host, repository, digest, manifest?)
        self.checks: dict[tuple[str, str, str, str, bool], _SharedCheck] = {}
        self.uncached_until = 0.0
        self.containerd = containerd
        self.peers = peers
        # digests whose copy in containerd's store failed verification: fetched upstream instead
        self.containerd_rejected: set[str] = set()

    async def serve(self, request, target: Target) -> None:
        """Answer one GET/HEAD by digest."""
        for _ in range(_ATTEMPTS):
            slot = self.slots.get(target.digest)
            if slot is not None:
                fill = await slot.wait()
                if fill is None or fill.failure is not None:
                    continue
                if not await self._may_read(request, target, granted_by_fill=slot.owner == _owner(target)):
                    return
                if fill.uncached:  # its disk failed: it keeps only what its own readers still need
                    await self._fetch_uncached(request, target)
                    return
                self.stats.fills_joined += 1
                request.source = "fill"
                if await self._serve_fill(request, target, fill):
                    return
                continue
            # the index is in memory: only a hit needs the disk thread (its sidecar may be read)
            info = await self.disk.run(self.store.stat, target.digest) if target.digest in self.store else None
            if info is not None:
                if not await self._may_read(request, target):
                    return
                if await self._serve_stored(request, target):
                    return
                continue  # evicted meanwhile
            if target.digest in self.slots:
                continue
            if await self._from_containerd(request, target):
                return
            if target.digest in self.slots:
                continue
            if await self._fetch(request, target):
                return
        write_error(request, unavailable("content could not be fetched"))

    def running_fill(self, digest: str) -> Fill | None:
        """The fill of ``digest`` under way on this node, if its length is known (peers may stream it)."""
        slot = self.slots.get(digest)
        fill = slot.fill if slot is not None else None
        if fill is None or fill.failure is not None or fill.total is None or fill.uncached:
            return None
        return fill

    # --- authorisation -------------------------------------------------------------------------------

    async def _may_read(self, request, target: Target, granted_by_fill: bool = False) -> bool:
        """True when the request may read cached content; otherwise the request has been answered."""
        access = Access.ALLOWED if granted_by_fill else await self.check_access(target)
        if access is Access.ALLOWED:
            return True
        if access is Access.DENIED:
            self.stats.access_denied += 1
            await self.passthrough.forward(request, target)
        else:
            write_error(request, unavailable("cannot confirm access to cached content"))
        return False

    async def check_access(self, target: Target) -> Access:
        """Would upstream serve this digest to this request's credentials, in this repository?

        A fresh grant answers at once; otherwise one ``HEAD`` upstream with the request's credentials,
        shared by every request of the same credential for the same digest and repository meanwhile (a
        pull's parallel reads, a client's retries)."""
        now = self.reactor.seconds()
        if self.grants.is_fresh(target.credential, target.upstream_host, target.repository, target.digest, now):
            return Access.ALLOWED
        key = (target.credential, target.upstream_host, target.repository, target.digest, target.is_manifest)
        check = self.checks.get(key)
        if check is None:
            check = _SharedCheck(defer.ensureDeferred(self._ask_upstream(target, now)))
            if not check.settled:
                self.checks[key] = check
                check.wait().addBoth(lambda _: self.checks.pop(key, None))
        else:
            self.stats.access_checks_merged += 1
        return await check.wait()

    async def _ask_upstream(self, target: Target, now: float) -> Access:
        """One authorisation ``HEAD`` upstream; its 200 grants exactly this digest in this repository."""
        self.stats.access_checks += 1
        url = f"https://{target.upstream_host}/v2/{target.repository}/{'manifests' if target.is_manifest else 'blobs'}/{target.digest}"
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
            self.grants.grant(target.credential, target.upstream_host, target.repository, [target.digest], now)
        elif access is Access.DENIED:
            self.grants.revoke(target.credential, target.upstream_host, target.repository, target.digest)
        else:
            return self._offline(target, now, f"upstream answered {response.code}")
        return access

    def _offline(self, target: Target, now: float, reason: str) -> Access:
        if self.grants.allows_offline(target.credential, target.upstream_host, target.repository, target.digest, now):
            self.stats.offline_served += 1
            log.warning("upstream unreachable; serving cached content to a recently granted credential",
                        extra=fields(event="offline_serve", host=target.upstream_host,
                                     repository=target.repository, digest=target.digest, reason=reason))
            return Access.ALLOWED
        return Access.UNREACHABLE

    # --- serving -------------------------------------------------------------------------------------

    def _headers(self, request, target: Target, content_type: str | None) -> None:
        request.setHeader(b"docker-content-digest", target.digest.encode())
        request.setHeader(b"etag", f'"{target.digest}"'.encode())
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        request.setHeader(b"content-type", (content_type or "application/octet-stream").encode("latin-1"))
        if not target.is_manifest:
            request.setHeader(b"accept-ranges", b"bytes")

    def _range(self, request, target: Target, total: int | None) -> tuple[int, int | None] | None:
        """Set status and length headers; returns [start, end) or None when answered (416)."""
        header = None if target.is_manifest or total is None else request.getHeader(b"range")
        try:
            byte_range = oci.parse_range(header, total) if header is not None else None
        except oci.RangeNotSatisfiable as exc:
            write_error(request, exc, {b"content-range": exc.content_range.encode()})
            return None
        if byte_range is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", byte_range.content_range.encode())
            request.setHeader(b"content-length", str(byte_range.length).encode())
            return byte_range.start, byte_range.end + 1
        request.setResponseCode(200)
        if total is not None:
            request.setHeader(b"content-length", str(total).encode())
        return 0, total

    def _damaged(self, target: Target) -> None:
        """A cached file did not match its digest: it is dropped, and the request looks again."""
        self.stats.damaged_entries += 1
        failures.report("cache", "damaged", "cached file does not match its digest; dropped", host=target.upstream_host,
                        repository=target.repository, digest=target.digest)

    async def _serve_stored(self, request, target: Target, source: str = "cache") -> bool:
        """Serve a committed blob; ``source`` is where its bytes came from for this request (the access log's)."""
        reader = await self.disk.run(self.store.open_blob, target.digest)
        if reader is None:
            return False
        info: BlobInfo = reader.info
        # manifests are answered whole (never in ranges); an oversized one streams like a blob
        if target.is_manifest and info.size <= oci.MANIFEST_MAX_SIZE:
            try:
                # small: hashed whole before a byte is sent, so a damaged copy is replaced, not served
                manifest = await self.disk.run(self.store.read_verified, reader, oci.MANIFEST_MAX_SIZE)
            finally:
                self.disk.run(reader.close)
            if manifest is None:
                self._damaged(target)
                return False
            self.stats.cache_hits += source == "cache"
            request.source = source
            self._headers(request, target, info.content_type)
            self._range(request, target, len(manifest))
            if target.method == "GET":
                request.write(manifest)
            request.finish()
            return True
        ranged = target.method == "GET" and not target.is_manifest and request.getHeader(b"range") is not None
        small = target.method == "GET" and info.size <= VERIFY_BEFORE_SERVING
        if (ranged or small) and not reader.verified:
            # a range cannot be checked on its own: the whole file is, once, before any range is served
            if not await self.disk.run(self.store.verify_reader, reader):
                self.disk.run(reader.close)
                self._damaged(target)
                return False
        self.stats.cache_hits += source == "cache"
        request.source = source
        self._headers(request, target, info.content_type)
        span = self._range(request, target, info.size)
        if span is None or target.method == "HEAD":
            self.disk.run(reader.close)
            if span is not None:
                request.finish()
            return True
        check = None
        if not reader.verified and span == (0, info.size):
            check = oci_hex(target.digest)  # hashed as it streams; its last bytes wait for the digest

        outcome: list[bool] = []  # set when a streamed check ends: intact or damaged

        def close() -> None:
            # one trip to the disk pool, in order: remember (or drop) the file, then close it
            self.disk.run(self._close_checked, reader, outcome[0] if outcome else None)

        def damaged() -> None:
            self._damaged(target)
            outcome.append(False)

        streamer = BlobStreamer(self.disk, request, reader.file.fileno(), span[0], span[1], on_close=close,
                                verify=check, on_damaged=damaged, on_intact=lambda: outcome.append(True))
        sent = await streamer.start()
        if sent:
            self.stats.bytes_served += span[1] - span[0]
        return True

    def _close_checked(self, reader, intact: bool | None) -> None:
        """Close a cached blob's reader after a streamed check (disk pool): remember or drop the file first."""
        try:
            if intact:
                self.store.mark_verified(reader)
            elif intact is False:
                self.store.drop_damaged(reader, "blob content does not match its digest")
        finally:
            reader.close()

    async def _serve_fill(self, request, target: Target, fill: Fill) -> bool:
        """Stream a fill (or, once it has ended, the blob it committed) to the request.

        False when nothing was sent because the blob is gone: the fill failed, or its committed blob was
        evicted before this reader could open it. The caller then looks for the content again."""
        if target.method == "HEAD":
            self._headers(request, target, fill.content_type)
            if self._range(request, target, fill.total) is not None:
                request.finish()
            return True
        if fill.uncached:
            await self._fetch_uncached(request, target)
            return True
        try:
            fd = await self.disk.run(os.open, fill.temp_path, os.O_RDONLY)
        except FileNotFoundError:
            if fill.uncached or fill.writer.failure is not None:  # its disk failed and its file is gone
                await self._fetch_uncached(request, target)
                return True
            # the fill ended (renamed into the cache, or removed) before the open: a small blob's commit
            # can win that race, and its outcome reaches the reactor only after the rename
            await fill.settled()
            # still this fill's bytes (from upstream, a peer, containerd): not a cache hit
            if fill.info is not None and await self._serve_stored(request, target, getattr(request, "source", "cache")):
                return True
            log.info("blob gone before its reader opened it; looking again",
                     extra=fields(event="fill_gone", digest=target.digest, host=target.upstream_host))
            return False
        if not fill.can_serve(0):
            self.disk.run(os.close, fd)
            await self._fetch_uncached(request, target)
            return True
        self._headers(request, target, fill.content_type)
        span = self._range(request, target, fill.total)
        if span is None:
            self.disk.run(os.close, fd)
            return True
        streamer = BlobStreamer(self.disk, request, fd, span[0], span[1], fill=fill,
                                on_close=lambda: self.disk.run(os.close, fd))
        fill.waiters += 1
        try:
            sent = await streamer.start()
        finally:
            fill.waiters -= 1
        if sent and span[1] is not None:
            self.stats.bytes_served += span[1] - span[0]
        return True

    # --- filling -------------------------------------------------------------------------------------

    async def _from_containerd(self, request, target: Target) -> bool:
        """Serve a blob found in containerd's content store (copied into the cache, verified).

        True when the request was answered. Manifests are skipped: containerd does not keep their
        media type, which clients need."""
        if self.containerd is None or target.is_manifest or target.method != "GET" \
                or target.digest in self.containerd_rejected:
            return False
        reader = await self.disk.run(self.containerd.open_blob, target.digest)
        if reader is None:
            return False
        # containerd's store holds every team's content: the same access check as the cache
        allowed = await self._may_read(request, target)
        if not allowed or target.digest in self.slots:
            self.disk.run(reader.close)
            return not allowed  # denied: answered; a fill started meanwhile: join it
        slot = _Slot(target, source="containerd")
        self.slots[target.digest] = slot
        try:
            writer = await self.disk.run(self.store.writer, target.digest, expected_size=reader.size)
        except Exception:
            slot.settle(None)
            del self.slots[target.digest]
            self.disk.run(reader.close)
            return False
        fill = Fill(self.disk, writer, target.digest, reader.size, "application/octet-stream")
        slot.settle(fill)
        self.stats.containerd_hits += 1
        request.source = "containerd"
        fill.done.addBoth(self._fill_finished, target, slot, fill)
        FileFeed(self.disk, reader, fill).start()
        return await self._serve_fill(request, target, fill)

    async def _fetch_uncached(self, request, target: Target) -> None:
        """Answer from upstream without the cache: a whole body verified as it streams, a range passed through."""
        if target.method == "HEAD" or self._wants_range(request, target):
            await self.passthrough.forward(request, target)
            return
        await self._start_fill(request, target, cache=False)

    @staticmethod
    def _wants_range(request, target: Target) -> bool:
        return not target.is_manifest and request.getHeader(b"range") is not None

    async def _fetch(self, request, target: Target) -> bool:
        """Fill from upstream and serve the fill; False when its blob was gone before it could be read."""
        if target.method == "HEAD":
            await self.passthrough.forward(request, target)
            return True
        if self._wants_range(request, target) and self.reactor.seconds() < self.uncached_until:
            # the cache disk failed recently: upstream answers the range itself, with the client's credentials
            self.stats.uncached_streams += 1
            await self.passthrough.forward(request, target)
            return True
        self.stats.cache_misses += 1
        request.source = "upstream"  # until a peer or the cache disk says otherwise (also for upstream's refusals)
        slot = _Slot(target)
        self.slots[target.digest] = slot
        fill = None
        try:
            answered = False
            # a cache disk that was full recently: upstream's answer is streamed uncached instead
            if self.peers is not None and self.peers.available() and self.reactor.seconds() >= self.uncached_until:
                fill, answered = await self._start_peer_fill(request, target, slot)
            if fill is None and not answered:
                fill = await self._start_fill(request, target)
        finally:
            slot.settle(fill)
            if fill is None and self.slots.get(target.digest) is slot:
                del self.slots[target.digest]
        if fill is None:
            return True
        self.stats.fills_started += 1
        request.source = slot.source
        fill.done.addBoth(self._fill_finished, target, slot, fill)
        if self.peers is not None and fill.total is not None:
            self.peers.announce(target.digest)  # other nodes may stream this fill while it runs
        return await self._serve_fill(request, target, fill)

    async def _start_peer_fill(self, request, target: Target, slot: _Slot) -> tuple[Fill | None, bool]:
        """(a fill from a peer node that holds the digest, answered): the fill starts once upstream
        confirmed (or recently granted) that this request may read it. A refusal from upstream is passed
        to the client, which is then answered; otherwise, without a fill, upstream is asked next."""
        access = await self.check_access(target)
        if access is Access.DENIED:
            self.stats.access_denied += 1
            await self.passthrough.forward(request, target)
            return None, True
        if access is not Access.ALLOWED:
            return None, False  # upstream is asked next, and says why
        found = await self.peers.fetch(target.digest)
        if found is None:
            return None, False
        peer, response = found
        content_type = (response.headers.getRawHeaders(b"content-type") or [b"application/octet-stream"])[0]
        if target.is_manifest and response.length > oci.MANIFEST_MAX_SIZE:
            await response.discard(0)
            self.peers.failed(peer, target.digest, f"manifest of {response.length} bytes")
            return None, False
        try:
            writer = await self.disk.run(self.store.writer, target.digest,
                                         content_type=content_type.decode("latin-1"), expected_size=response.length)
        except (StoreFull, OSError):
            await response.discard(0)
            return None, False  # upstream's answer is streamed without caching
        self.stats.peer_fills += 1
        slot.source, slot.peer = "peer", peer
        fill = Fill(self.disk, writer, target.digest, response.length, content_type.decode("latin-1"))
        headers = self._upstream_headers(request, target)

        def broke(reason: str) -> None:
            self.peers.failed(peer, target.digest, f"body broke off at byte {fill.received}: {reason}")
            self.stats.peer_resumes += 1
            slot.peer = None  # reported: the fill's outcome is upstream's from here

        # a peer that goes away mid-blob costs its clients nothing: upstream sends the rest
        response.deliver_body(ResumableBody(fill, lambda offset: defer.ensureDeferred(
            self._upstream_rest(target, headers, offset, fill.total)), broke))
        return fill, False

    async def _upstream_rest(self, target: Target, headers: dict, offset: int, total: int):
        """Upstream's answer for bytes ``offset``- of the blob (206 with the matching range), or None."""
        ranged = {**headers, b"range": [f"bytes={offset}-".encode()]}
        try:
            response = await self.upstream.request("GET", target.url, ranged, follow_redirects=True)
        except UPSTREAM_FAILURES as exc:
            log.warning("cannot resume a broken peer transfer upstream", extra=fields(
                event="peer_resume_failed", digest=target.digest, reason=str(exc)))
            return None
        answered = (response.headers.getRawHeaders(b"content-range") or [b""])[0].decode("latin-1")
        if response.code != 206 or answered != f"bytes {offset}-{total - 1}/{total}":
            await response.discard(0)
            log.warning("cannot resume a broken peer transfer upstream", extra=fields(
                event="peer_resume_failed", digest=target.digest,
                reason=f"upstream answered {response.code} {answered!r} to a range from byte {offset}"))
            return None
        return response

    def _upstream_headers(self, request, target: Target) -> dict:
        """What an upstream GET on the client's behalf carries: its credentials, Accept and User-Agent."""
        headers = target.auth_headers()
        for name in (b"accept", b"user-agent"):
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                headers[name] = values
        return headers

    async def _start_fill(self, request, target: Target, cache: bool = True) -> Fill | None:
        """Ask upstream; returns a running Fill, or None once the request has been answered otherwise
        (always so without ``cache``: the body is then relayed, verified, without the cache)."""
        headers = self._upstream_headers(request, target)
        # the cache file is created while upstream answers, off the response's critical path
        early_writer = None
        if cache and self.reactor.seconds() >= self.uncached_until:
            early_writer = self.disk.run(self.store.writer, target.digest)
        try:
            response = await self.upstream.request("GET", target.url, headers, follow_redirects=True)
        except UPSTREAM_FAILURES as exc:
            self._drop_writer(early_writer)
            write_error(request, unavailable(str(exc)))
            return None
        except BaseException:
            self._drop_writer(early_writer)
            raise
        if response.code != 200:
            self._drop_writer(early_writer)
            await relay(request, response)
            return None
        content_type = (response.headers.getRawHeaders(b"content-type") or [b"application/octet-stream"])[0]
        if target.is_manifest and response.length is not None and response.length > oci.MANIFEST_MAX_SIZE:
            self._drop_writer(early_writer)
            await response.discard(0)
            write_error(request, oci.OCIError("MANIFEST_INVALID", "manifest larger than 4 MiB", status=502))
            return None
        self.grants.grant(target.credential, target.upstream_host, target.repository, [target.digest],
                          self.reactor.seconds())
        try:
            if early_writer is None:
                raise StoreFull("the cache disk failed recently" if cache else "the fill under way is not cached")
            if response.length is not None and response.length > self.store.max_size:
                self._drop_writer(early_writer)
                raise StoreFull(f"blob of {response.length} bytes is larger than the cache ({self.store.max_size} bytes)")
            try:
                writer = await early_writer
            except OSError as exc:  # no room for even a new file (inodes), or no access: serve uncached
                if exc.errno in _DISK_FAULTS:  # the disk, not a passing mishap: leave it alone a while
                    self.uncached_until = self.reactor.seconds() + UNCACHED_BACKOFF
                raise StoreFull(f"cannot create a cache file: {exc.strerror or exc}") from exc
            if response.length is not None and writer.room is not None and response.length > writer.room:
                self.disk.run(writer.abort)
                # evicting old blobs may let the next request for it be cached
                self.disk.run(self.store.make_room, response.length)
                raise StoreFull(f"no room for {response.length} bytes on the cache's filesystem")
            writer.describe(content_type.decode("latin-1"), response.length)
        except StoreFull as exc:
            if cache:
                failures.report("cache", "full", f"{exc}; streaming without caching", host=target.upstream_host,
                                repository=target.repository, digest=target.digest)
            self.stats.uncached_streams += 1
            request.source = "relay"
            if self._wants_range(request, target):
                await response.discard(0)
                await self.passthrough.forward(request, target)
                return None
            await self._stream_uncached(request, target, response, content_type.decode("latin-1"))
            return None
        fill = Fill(self.disk, writer, target.digest, response.length, content_type.decode("latin-1"))
        response.deliver_body(fill.body_protocol())
        return fill

    def _drop_writer(self, pending: defer.Deferred | None) -> None:
        """Abort a cache writer created ahead of an answer that will not fill the cache."""
        if pending is not None:
            pending.addCallback(lambda writer: self.disk.run(writer.abort))
            pending.addErrback(lambda _: None)

    async def _stream_uncached(self, request, target: Target, response, content_type: str) -> None:
        self._headers(request, target, content_type)
        request.setResponseCode(200)
        if response.length is not None:
            request.setHeader(b"content-length", str(response.length).encode())
        relay = VerifiedRelay(request, target.digest)
        response.deliver_body(relay)
        await relay.done

    def _fill_finished(self, result, target: Target, slot: _Slot, fill: Fill):
        if self.slots.get(target.digest) is slot:
            del self.slots[target.digest]
        if isinstance(result, Failure):
            cause = result.value.__cause__
            self.stats.fills_failed += 1
            if isinstance(cause, DigestMismatch):
                self.stats.digest_mismatches += 1
            # a full, read-only or failing disk (the fill's own writes, or its commit): leave it alone a while
            disk_fault = isinstance(cause, StoreFull) or (cause is not None and cause is fill.writer.failure) or (
                fill.verified and isinstance(cause, OSError))
            if disk_fault:
                self.uncached_until = self.reactor.seconds() + UNCACHED_BACKOFF
            elif slot.source == "containerd" and len(self.containerd_rejected) < 100_000:
                self.containerd_rejected.add(target.digest)
            # info: the failure itself is reported (once, at warning) where it happened
            log.info("fill failed; nothing cached", extra=fields(event="fill_failed", digest=target.digest,
                                                                host=target.upstream_host, source=slot.source,
                                                                reason=str(result.value)))
            failures.report_fill_failure(slot.source, cause, str(result.value), host=target.upstream_host,
                                         repository=target.repository, digest=target.digest)
            if slot.peer is not None and not disk_fault:
                self.peers.failed(slot.peer, target.digest, str(result.value))
            return None
        log.info("cached", extra=fields(event="fill_done", digest=target.digest, host=target.upstream_host,
                                        repository=target.repository, source=slot.source, bytes=fill.written,
                                        seconds=round(time.monotonic() - fill.started, 3)))
        if self.peers is not None:
            self.peers.announce(target.digest)
        # nothing a manifest refers to is granted: a reference is the pusher's claim, not upstream's answer
        return None
