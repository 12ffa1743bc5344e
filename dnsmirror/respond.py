"""Responses: outcomes of the content chain, upstream's answers passed through, OCI errors.

The one module that writes to a request: the content chain's :class:`Responder` renders outcomes
(:mod:`dnsmirror.outcomes` says what each means) with headers, ranges and streamed bodies, and the
pass-through (:mod:`dnsmirror.proxy`), the registry front (:mod:`dnsmirror.web`) and the listener
(:mod:`dnsmirror.https`) answer through the functions here. A body streams from disk with back-pressure
(:class:`~dnsmirror.streaming.BlobStreamer`) or, uncached, from upstream verified as it streams
(:class:`~dnsmirror.streaming.VerifiedRelay`).
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
from dnsmirror.store import digest_hex as oci_hex
from dnsmirror.streaming import BlobStreamer, DiskIO, VerifiedRelay
from dnsmirror.target import Target
from dnsmirror.uploads import StreamingRequest

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers
    from twisted.web.server import Request

    from dnsmirror.content import ContentStats
    from dnsmirror.contracts import UpstreamAnswer
    from dnsmirror.proxy import PassThrough

log = logging.getLogger("dnsmirror.respond")


# --- answers of dnsmirror's own, and upstream's passed on -----------------------------------------------


def unavailable(reason: str) -> oci.OCIError:
    """The error a client gets when upstream gave no answer."""
    return oci.OCIError("UNAVAILABLE", f"upstream registry unreachable: {reason}", status=502)


def write_error(request: Request, error: oci.OCIError, headers: dict[bytes, bytes] | None = None) -> None:
    """Answer ``request`` with an OCI error body (unless the response already started)."""
    if request.startedWriting or request.finished:
        return
    send_error(request, error, headers)
    request.finish()


def send_error(request: Request, error: oci.OCIError, headers: dict[bytes, bytes] | None = None) -> None:
    """Write an OCI error response, status to body, without finishing the request."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", oci.ERROR_CONTENT_TYPE.encode())
    request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    body = error.body()
    request.setHeader(b"content-length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)


def copy_headers(request: Request, headers: Headers) -> None:
    """Set every end-to-end response header on ``request``, repeated ones as separate lines."""
    for name, values in headers.getAllRawHeaders():
        request.responseHeaders.setRawHeaders(name, list(values))


def finish(request: Request) -> None:
    """Finish the response unless it is finished already or its connection is gone."""
    if not request.finished and request.channel is not None:
        request.finish()


def abort(request: Request) -> None:
    """Cut the connection: after the status line, the only way to tell a client its body is incomplete."""
    transport = getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


async def relay(request: Request, response: UpstreamAnswer) -> None:
    """Send an upstream response to the client as it is: status, headers, streamed body."""
    request.setResponseCode(response.code, response.phrase)
    copy_headers(request, response.headers)
    if request.method == b"HEAD" or response.code in (204, 304):
        await response.discard()
        request.finish()
        return
    try:
        await response.stream_to(request)
    except Exception as exc:  # noqa: BLE001 - the client cannot be told more than a cut stream
        log.info("relay of %s ended early: %s", response.description, exc)
        abort(request)
        return
    finish(request)


def send_read_answer(request: Request, response: UpstreamAnswer, body: bytes, *, last: bool = True) -> None:
    """Send upstream's answer whose body was read whole: its status and headers, the body with its
    length; ``last=False`` leaves the request open (the rest of a client's body is still arriving)."""
    request.setResponseCode(response.code, response.phrase)
    copy_headers(request, response.headers)
    request.responseHeaders.removeHeader(b"transfer-encoding")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    if last:
        request.finish()


def send_manifest(request: Request, digest: str, media_type: str, body: bytes, *, head: bool) -> None:
    """Answer with a manifest dnsmirror holds (a tag's last known one), with its digest."""
    request.setResponseCode(200)
    request.setHeader(b"content-type", media_type.encode())
    request.setHeader(b"docker-content-digest", digest.encode())
    request.setHeader(b"etag", f'"{digest}"'.encode())
    request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
    request.setHeader(b"content-length", str(len(body)).encode())
    if not head:
        request.write(body)
    request.finish()


# --- reads by digest --------------------------------------------------------------------------------------


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
