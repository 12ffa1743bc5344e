"""Outcomes of the content chain rendered as responses: headers, ranges, OCI errors, streamed bodies.

The one place of the content path that writes to the request (:mod:`dnsmirror.outcomes` says what
each outcome means). A body streams from disk with back-pressure (:class:`~dnsmirror.streaming.BlobStreamer`)
or, uncached, from upstream verified as it streams (:class:`~dnsmirror.streaming.VerifiedRelay`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dnsmirror import oci
from dnsmirror.logs import fields
from dnsmirror.outcomes import (
    FromCache,
    FromFill,
    Manifest,
    NotHere,
    Outcome,
    PassOn,
    Relayed,
    Uncached,
    UncachedWanted,
)
from dnsmirror.proxy import PassThrough, relay, write_error
from dnsmirror.store import digest_hex as oci_hex
from dnsmirror.streaming import BlobStreamer, DiskIO, VerifiedRelay
from dnsmirror.target import Target
from dnsmirror.uploads import StreamingRequest

if TYPE_CHECKING:
    from dnsmirror.content import ContentStats

log = logging.getLogger("dnsmirror.respond")


def set_headers(request: StreamingRequest, target: Target, content_type: str | None) -> None:
    """The headers of an answer by digest."""
    request.setHeader(b"docker-content-digest", target.digest.encode())
    request.setHeader(b"etag", f'"{target.digest}"'.encode())
    request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
    request.setHeader(b"content-type", (content_type or "application/octet-stream").encode("latin-1"))
    if not target.is_manifest:
        request.setHeader(b"accept-ranges", b"bytes")


def set_range(request: StreamingRequest, target: Target, total: int | None) -> tuple[int, int | None] | None:
    """Set status and length headers; returns [start, end) or None when answered (416)."""
    header = None if target.is_manifest or total is None else request.getHeader(b"range")
    try:
        byte_range = oci.parse_range(header, total) if header is not None and total is not None else None
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


class Responder:
    """Renders outcomes. ``fetch_uncached`` answers a request from upstream without the cache;
    ``reopen`` finds a just-committed fill's blob in the cache (access already granted)."""

    def __init__(
        self,
        disk: DiskIO,
        passthrough: PassThrough,
        stats: ContentStats,
        fetch_uncached: Callable[[StreamingRequest, Target], Awaitable[None]],
        reopen: Callable[[StreamingRequest, Target, str], Awaitable[Outcome]],
    ) -> None:
        self.disk = disk
        self.passthrough = passthrough
        self.stats = stats
        self.fetch_uncached = fetch_uncached
        self.reopen = reopen

    async def render(self, request: StreamingRequest, target: Target, outcome: Outcome) -> bool:
        """Answer ``request`` with ``outcome``. False when nothing was sent because the body was gone
        before it could be read (the chain then looks again)."""
        source = getattr(outcome, "source", None)
        if source is not None:
            request.source = source
        if isinstance(outcome, FromFill):
            return await self._fill(request, target, outcome)
        if isinstance(outcome, FromCache):
            await self._stored(request, target, outcome)
        elif isinstance(outcome, Manifest):
            set_headers(request, target, outcome.content_type)
            set_range(request, target, len(outcome.body))
            if target.method == "GET":
                request.write(outcome.body)
            request.finish()
        elif isinstance(outcome, Uncached):
            await self._uncached(request, target, outcome)
        elif isinstance(outcome, UncachedWanted):
            await self.fetch_uncached(request, target)
        elif isinstance(outcome, PassOn):
            await self.passthrough.forward(request, target)
        elif isinstance(outcome, Relayed):
            await relay(request, outcome.response)
        elif isinstance(outcome, NotHere):
            return False
        else:
            write_error(request, outcome.error, outcome.headers)
        return True

    async def _stored(self, request: StreamingRequest, target: Target, outcome: FromCache) -> None:
        reader = outcome.reader
        info = reader.info
        set_headers(request, target, info.content_type)
        span = set_range(request, target, info.size)
        if span is None or target.method == "HEAD":
            self.disk.run(reader.close)
            if span is not None:
                request.finish()
            return
        check = None
        if outcome.check_digest and span == (0, info.size):
            check = oci_hex(target.digest)  # hashed as it streams; its last bytes wait for the digest

        result: list[bool] = []  # set when a streamed check ends: intact or damaged

        def damaged() -> None:
            outcome.damaged()
            result.append(False)

        def closed() -> None:
            outcome.finished(result[0] if result else None)

        streamer = BlobStreamer(
            self.disk,
            request,
            reader.file.fileno(),
            span[0],
            span[1],
            on_close=closed,
            verify=check,
            on_damaged=damaged,
            on_intact=lambda: result.append(True),
        )
        sent = await streamer.start()
        if sent and span[1] is not None:
            self.stats.bytes_served += span[1] - span[0]

    async def _fill(self, request: StreamingRequest, target: Target, outcome: FromFill) -> bool:
        """Stream a fill to the request; False when its blob is gone (the fill failed, or its committed blob
        was evicted before this reader could open it)."""
        fill = outcome.fill
        if target.method == "HEAD":
            set_headers(request, target, fill.content_type)
            if set_range(request, target, fill.total) is not None:
                request.finish()
            return True
        if fill.uncached:
            await self.fetch_uncached(request, target)
            return True
        try:
            fd = await self.disk.run(os.open, fill.temp_path, os.O_RDONLY)
        except FileNotFoundError:
            if fill.uncached or fill.writer.failure is not None:  # its disk failed and its file is gone
                await self.fetch_uncached(request, target)
                return True
            # the fill ended (renamed into the cache, or removed) before the open: a small blob's commit
            # can win that race, and its outcome reaches the reactor only after the rename
            await fill.settled()
            # still this fill's bytes (from upstream, a peer, containerd): not a cache hit
            if fill.info is not None and await self.render(
                request, target, await self.reopen(request, target, outcome.source)
            ):
                return True
            log.info(
                "blob gone before its reader opened it; looking again",
                extra=fields(event="fill_gone", digest=target.digest, host=target.upstream_host),
            )
            return False
        if not fill.can_serve(0):
            self.disk.run(os.close, fd)
            await self.fetch_uncached(request, target)
            return True
        set_headers(request, target, fill.content_type)
        span = set_range(request, target, fill.total)
        if span is None:
            self.disk.run(os.close, fd)
            return True

        def close() -> None:
            self.disk.run(os.close, fd)

        streamer = BlobStreamer(self.disk, request, fd, span[0], span[1], fill=fill, on_close=close)
        sent = await streamer.start()
        if sent and span[1] is not None:
            self.stats.bytes_served += span[1] - span[0]
        return True

    async def _uncached(self, request: StreamingRequest, target: Target, outcome: Uncached) -> None:
        set_headers(request, target, outcome.content_type)
        request.setResponseCode(200)
        response = outcome.response
        if response.length is not None:
            request.setHeader(b"content-length", str(response.length).encode())
        verified = VerifiedRelay(request, target.digest)
        response.deliver_body(verified)
        await verified.done
