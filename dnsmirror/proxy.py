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
from typing import Any

from twisted.internet import defer
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from dnsmirror import oci
from dnsmirror.authz import Grants, granted_by_answer
from dnsmirror.contracts import Upstream, UpstreamAnswer
from dnsmirror.logs import fields
from dnsmirror.respond import (
    finish,
    relay,
    send_error,
    send_manifest,
    send_read_answer,
    unavailable,
    write_error,
)
from dnsmirror.store import BlobReader
from dnsmirror.streaming import DiskIO
from dnsmirror.tags import TagAnswer, TagMemory, accepted_types
from dnsmirror.target import Target
from dnsmirror.uploads import StreamingRequest
from dnsmirror.upstream import UPSTREAM_FAILURES, BodyTooLarge, HeaderInput

log = logging.getLogger("dnsmirror.proxy")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# an answer sent while the request body is still arriving is read whole first (error documents are small)
EARLY_ANSWER_LIMIT = 1024 * 1024


class PassThrough:
    """Forwards requests upstream unchanged; observes manifests by tag."""

    def __init__(
        self,
        reactor: Any,
        upstream: Upstream,
        disk: DiskIO,
        grants: Grants,
        tags: TagMemory,
        stale_tags: bool,
    ) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.disk = disk
        self.grants = grants
        self.tags = tags
        self.stale_tags = stale_tags
        self.stale_answers = 0
        self.streamed_bodies = 0

    def start(self, target: Target, headers: HeaderInput, body: IBodyProducer) -> defer.Deferred[Any]:
        """Start the upstream exchange of a request whose body is still arriving (see
        :mod:`dnsmirror.uploads`); fires with ``("ok", response)`` or ``("failed", failure)``, never
        fails."""
        self.streamed_bodies += 1
        return self.upstream.request(target.method, target.url, headers, body).addCallbacks(
            lambda response: ("ok", response), lambda failure: ("failed", failure)
        )

    async def answer_early(self, request: StreamingRequest, outcome: tuple[str, Any]) -> None:
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
            send_read_answer(request, value, body, last=False)
            log.info(
                "%s: upstream answered %s before the request body was complete",
                value.description,
                value.code,
                extra=fields(event="early_answer", status=value.code),
            )
        elif value.check(*UPSTREAM_FAILURES):
            send_error(request, unavailable(value.getErrorMessage()))
        else:
            send_error(request, oci.OCIError("UNKNOWN", "internal error", status=500))
            log.error("streamed request failed: %s", value.getTraceback())

    async def forward(self, request: StreamingRequest, target: Target) -> None:
        """Send ``request`` upstream and its answer back; tag fallback when upstream is unreachable."""
        request.source = "passthrough"
        answered = request.early_answer  # declared on StreamingRequest, as every field of dnsmirror's own
        if answered is not None:
            await answered
            finish(request)
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
        content = request.content
        if content is not None and (
            target.method in BODY_METHODS or request.getHeader(b"content-length") not in (None, b"0")
        ):
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
            body = FileBodyProducer(content)
            body.length = length
        # a manifest by tag: observed on the way, answered from its last digest when upstream is gone
        tag = target.tag if target.is_manifest and target.method in ("GET", "HEAD") else None
        try:
            response: UpstreamAnswer = await self.upstream.request(
                target.method, target.url, request.requestHeaders, body
            )
        except UPSTREAM_FAILURES as exc:
            if tag is not None and await self._answer_stale_tag(request, target, tag, str(exc)):
                return
            write_error(request, unavailable(str(exc)))
            return
        if tag is not None and response.code >= 500:
            reason = f"upstream answered {response.code}"
            if await self._answer_stale_tag(request, target, tag, reason, response):
                return
        if tag is not None and response.code == 200:
            await self._observe_tag(request, target, tag, response)
            return
        await relay(request, response)

    async def _observe_tag(
        self, request: StreamingRequest, target: Target, tag: str, response: UpstreamAnswer
    ) -> None:
        accepted = accepted_types(request.requestHeaders.getRawHeaders(b"accept"))
        header_digest = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0].decode(
            "ascii", "replace"
        )
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
        media_type = oci.bare_media_type(content_type) or ""
        now = self.reactor.seconds()
        if target.method == "HEAD":
            if header_digest:
                self._remember(target, tag, accepted, header_digest, media_type, response.length or 0, now)
            await relay(request, response)
            return
        if media_type not in oci.MANIFEST_TYPES:
            await relay(request, response)
            return
        try:
            manifest: bytes = await response.read_body(oci.MANIFEST_MAX_SIZE)
        except BodyTooLarge:
            write_error(request, oci.OCIError("MANIFEST_INVALID", "manifest larger than 4 MiB", status=502))
            return
        except UPSTREAM_FAILURES as exc:
            write_error(request, unavailable(str(exc)))
            return
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            log.warning(
                "upstream manifest does not match its Docker-Content-Digest; not cached",
                extra=fields(host=target.upstream_host, repository=target.repository),
            )
        else:
            self._remember(target, tag, accepted, digest, media_type, len(manifest), now)
            self.disk.run(self._store_manifest, digest, media_type, manifest).addErrback(
                lambda f: log.info("manifest not cached: %s", f.getErrorMessage())
            )
        send_read_answer(request, response, manifest)

    def _remember(
        self,
        target: Target,
        tag: str,
        accepted: frozenset[str],
        digest: str,
        media_type: str,
        size: int,
        now: float,
    ) -> None:
        """Upstream answered 200 for ``tag`` with the manifest ``digest``: remember it, grant that
        digest."""
        granted = granted_by_answer(tag, 200, digest)
        if granted is None:
            return  # not a digest this mirror can serve (or a malformed header): nothing to remember
        answer = TagAnswer(digest=granted, media_type=media_type, size=size, seen=now)
        self.tags.remember(target.upstream_host, target.repository, tag, accepted, answer)
        self.grants.grant(target.credential, target.upstream_host, target.repository, [granted], now)

    def _store_manifest(self, digest: str, media_type: str, manifest: bytes) -> None:
        store = self.disk.store
        if store is None or digest in store:
            return
        with store.writer(digest, content_type=media_type, expected_size=len(manifest)) as writer:
            writer.write(manifest)
            writer.commit()

    async def _answer_stale_tag(
        self,
        request: StreamingRequest,
        target: Target,
        tag: str,
        reason: str,
        response: UpstreamAnswer | None = None,
    ) -> bool:
        """Answer a manifest by ``tag`` from the last known digest; False when that is not possible."""
        store = self.disk.store
        if not self.stale_tags or store is None:
            return False
        accepted = accepted_types(request.requestHeaders.getRawHeaders(b"accept"))
        answer = self.tags.recall(target.upstream_host, target.repository, tag, accepted)
        now = self.reactor.seconds()
        if answer is None or not self.grants.allows_offline(
            target.credential, target.upstream_host, target.repository, answer.digest, now
        ):
            return False
        reader: BlobReader | None = await self.disk.run(store.open_blob, answer.digest)
        if reader is None:
            return False
        try:
            manifest: bytes = await self.disk.run(reader.read, oci.MANIFEST_MAX_SIZE + 1)
        finally:
            self.disk.run(reader.close)
        if response is not None:
            await response.discard()
        self.stale_answers += 1
        request.source = "stale_tag"
        log.warning(
            "upstream unreachable; answering a tag from its last known digest",
            extra=fields(
                event="stale_tag",
                host=target.upstream_host,
                repository=target.repository,
                tag=tag,
                digest=answer.digest,
                reason=reason,
            ),
        )
        send_manifest(request, answer.digest, answer.media_type, manifest, head=target.method != "GET")
        return True

