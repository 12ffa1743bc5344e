"""Transparent pass-through to the upstream registry, and what dnsmirror learns on the way.

Everything that is not a read by digest (``GET /v2/``, auth challenges, tokens, manifests by tag,
tag lists, referrers, pushes) goes upstream with the client's own headers and comes back unchanged.
Manifests by tag are also *observed*: the tag -> digest answer is remembered, the manifest is cached
by digest, and the credential is granted that manifest's digest, and nothing it references (see
:mod:`dnsmirror.authz`).
When upstream cannot be reached, a manifest by tag is answered from the last known digest.
"""

from __future__ import annotations

import hashlib
import logging

from twisted.internet import defer
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from dnsmirror import oci
from dnsmirror.authz import Grants, granted_by_answer
from dnsmirror.contracts import UpstreamAnswer
from dnsmirror.logs import fields
from dnsmirror.streaming import DiskIO
from dnsmirror.tags import TagAnswer, TagMemory, accepted_types
from dnsmirror.target import Target
from dnsmirror.upstream import UPSTREAM_FAILURES, BodyTooLarge, UpstreamClient, UpstreamResponse

log = logging.getLogger("dnsmirror.proxy")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# an answer sent while the request body is still arriving is read whole first (error documents are small)
EARLY_ANSWER_LIMIT = 1024 * 1024


def write_error(request, error: oci.OCIError, headers: dict[bytes, bytes] | None = None) -> None:
    """Answer ``request`` with an OCI error body (unless the response already started)."""
    if request.startedWriting or request.finished:
        return
    send_error(request, error, headers)
    request.finish()


def send_error(request, error: oci.OCIError, headers: dict[bytes, bytes] | None = None) -> None:
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


def unavailable(reason: str) -> oci.OCIError:
    return oci.OCIError("UNAVAILABLE", f"upstream registry unreachable: {reason}", status=502)


def copy_headers(request, headers: Headers) -> None:
    """Set every end-to-end response header on ``request``, repeated ones as separate lines."""
    for name, values in headers.getAllRawHeaders():
        request.responseHeaders.setRawHeaders(name, list(values))


async def relay(request, response: UpstreamAnswer) -> None:
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
        if request.channel is not None and request.channel.transport is not None:
            request.channel.transport.abortConnection()
        return
    if not request.finished and request.channel is not None:
        request.finish()


class PassThrough:
    """Forwards requests upstream unchanged; observes manifests by tag."""

    def __init__(self, reactor, upstream: UpstreamClient, disk: DiskIO, grants: Grants, tags: TagMemory,
                 stale_tags: bool) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.disk = disk
        self.grants = grants
        self.tags = tags
        self.stale_tags = stale_tags
        self.stale_answers = 0
        self.streamed_bodies = 0

    def start(self, target: Target, headers, body) -> defer.Deferred:
        """Start the upstream exchange of a request whose body is still arriving (see
        :mod:`dnsmirror.uploads`); fires with ``("ok", response)`` or ``("failed", failure)``, never fails."""
        self.streamed_bodies += 1
        return self.upstream.request(target.method, target.url, headers, body).addCallbacks(
            lambda response: ("ok", response), lambda failure: ("failed", failure))

    async def answer_early(self, request, outcome) -> None:
        """Send upstream's answer to a request whose body is still arriving: whole, with its length (an
        answer longer than :data:`EARLY_ANSWER_LIMIT` becomes a 502). The request is finished by
        :meth:`forward` once the rest of the body has been read and dropped."""
        request.source = "passthrough"
        kind, value = outcome
        if kind == "ok":
            try:
                body = await value.read_body(EARLY_ANSWER_LIMIT)
            except UPSTREAM_FAILURES as exc:
                send_error(request, unavailable(str(exc)))
                return
            request.setResponseCode(value.code, value.phrase)
            copy_headers(request, value.headers)
            request.responseHeaders.removeHeader(b"transfer-encoding")
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            log.info("%s: upstream answered %s before the request body was complete", value.description,
                     value.code, extra=fields(event="early_answer", status=value.code))
        elif value.check(*UPSTREAM_FAILURES):
            send_error(request, unavailable(value.getErrorMessage()))
        else:
            send_error(request, oci.OCIError("UNKNOWN", "internal error", status=500))
            log.error("streamed request failed: %s", value.getTraceback())

    async def forward(self, request, target: Target) -> None:
        """Send ``request`` upstream and its answer back; tag fallback when upstream is unreachable."""
        request.source = "passthrough"
        answered = request.early_answer  # declared on StreamingRequest, as every field of dnsmirror's own
        if answered is not None:
            await answered
            if not request.finished and request.channel is not None:
                request.finish()
            return
        early = request.early_response
        if early is not None:
            request.early_response = None
            outcome, value = await early
            if outcome == "ok":
                await relay(request, value)
            elif value.check(*UPSTREAM_FAILURES):
                write_error(request, unavailable(value.getErrorMessage()))
            else:
                value.raiseException()
            return
        body = None
        if target.method in BODY_METHODS or request.getHeader(b"content-length") not in (None, b"0"):
            request.content.seek(0, 2)
            length = request.content.tell()
            request.content.seek(0)
            body = FileBodyProducer(request.content)
            body.length = length
        tag_request = target.is_manifest and target.path.tag is not None and target.method in ("GET", "HEAD")
        try:
            response = await self.upstream.request(target.method, target.url, request.requestHeaders, body)
        except UPSTREAM_FAILURES as exc:
            if tag_request and await self._answer_stale_tag(request, target, str(exc)):
                return
            write_error(request, unavailable(str(exc)))
            return
        if tag_request and response.code >= 500 and await self._answer_stale_tag(
                request, target, f"upstream answered {response.code}", response):
            return
        if tag_request and response.code == 200:
            await self._observe_tag(request, target, response)
            return
        await relay(request, response)

    async def _observe_tag(self, request, target: Target, response: UpstreamResponse) -> None:
        accepted = accepted_types(request.requestHeaders.getRawHeaders(b"accept"))
        header_digest = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0].decode("ascii", "replace")
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
        media_type = oci.bare_media_type(content_type) or ""
        now = self.reactor.seconds()
        if target.method == "HEAD":
            if header_digest:
                self._remember(target, accepted, header_digest, media_type, response.length or 0, now)
            await relay(request, response)
            return
        if media_type not in oci.MANIFEST_TYPES:
            await relay(request, response)
            return
        try:
            manifest = await response.read_body(oci.MANIFEST_MAX_SIZE)
        except BodyTooLarge:
            write_error(request, oci.OCIError("MANIFEST_INVALID", "manifest larger than 4 MiB", status=502))
            return
        except UPSTREAM_FAILURES as exc:
            write_error(request, unavailable(str(exc)))
            return
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            log.warning("upstream manifest does not match its Docker-Content-Digest; not cached",
                        extra=fields(host=target.upstream_host, repository=target.repository))
        else:
            self._remember(target, accepted, digest, media_type, len(manifest), now)
            self.disk.run(self._store_manifest, digest, media_type, manifest).addErrback(
                lambda f: log.info("manifest not cached: %s", f.getErrorMessage()))
        request.setResponseCode(response.code, response.phrase)
        copy_headers(request, response.headers)
        request.setHeader(b"content-length", str(len(manifest)).encode())
        request.write(manifest)
        request.finish()

    def _remember(self, target: Target, accepted, digest: str, media_type: str, size: int, now: float) -> None:
        """Upstream answered 200 for this tag with the manifest ``digest``: remember it, grant that digest."""
        granted = granted_by_answer(target.path.tag, 200, digest)
        if granted is None:
            return  # not a digest this mirror can serve (or a malformed header): nothing to remember
        self.tags.remember(target.upstream_host, target.repository, target.path.tag, accepted,
                           TagAnswer(digest=granted, media_type=media_type, size=size, seen=now))
        self.grants.grant(target.credential, target.upstream_host, target.repository, [granted], now)

    def _store_manifest(self, digest: str, media_type: str, manifest: bytes) -> None:
        store = self.disk.store
        if store is None or digest in store:
            return
        with store.writer(digest, content_type=media_type, expected_size=len(manifest)) as writer:
            writer.write(manifest)
            writer.commit()

    async def _answer_stale_tag(self, request, target: Target, reason: str,
                                response: UpstreamResponse | None = None) -> bool:
        """Answer a manifest by tag from the last known digest; False when that is not possible."""
        if not self.stale_tags or self.disk.store is None:
            return False
        accepted = accepted_types(request.requestHeaders.getRawHeaders(b"accept"))
        answer = self.tags.recall(target.upstream_host, target.repository, target.path.tag, accepted)
        now = self.reactor.seconds()
        if answer is None or not self.grants.allows_offline(target.credential, target.upstream_host,
                                                            target.repository, answer.digest, now):
            return False
        reader = await self.disk.run(self.disk.store.open_blob, answer.digest)
        if reader is None:
            return False
        try:
            manifest = await self.disk.run(reader.read, oci.MANIFEST_MAX_SIZE + 1)
        finally:
            self.disk.run(reader.close)
        if response is not None:
            await response.discard()
        self.stale_answers += 1
        request.source = "stale_tag"
        log.warning("upstream unreachable; answering a tag from its last known digest",
                    extra=fields(event="stale_tag", host=target.upstream_host, repository=target.repository,
                                 tag=target.path.tag, digest=answer.digest, reason=reason))
        request.setResponseCode(200)
        request.setHeader(b"content-type", answer.media_type.encode())
        request.setHeader(b"docker-content-digest", answer.digest.encode())
        request.setHeader(b"etag", f'"{answer.digest}"'.encode())
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        request.setHeader(b"content-length", str(len(manifest)).encode())
        if target.method == "GET":
            request.write(manifest)
        request.finish()
        return True

