"""The interfaces the content chain is written against: the upstream client, its response, the disk.

Each has one real implementation (:class:`~dnsmirror.upstream.UpstreamClient`,
:class:`~dnsmirror.upstream.UpstreamResponse`, :class:`~dnsmirror.store.Store` and its
:class:`~dnsmirror.store.Writer`), one in-memory fake in ``tests/fakes.py``, and one conformance suite
(``tests/test_contracts.py``) that runs the same checks against both, so a test on the fake says
something about the real thing. The sources of content by digest share :class:`Source`
(:mod:`dnsmirror.sources`). Only what the chain uses is declared here; the real classes offer more.

The store's calls block (file I/O, hashing): callers run them on the disk pool
(:class:`~dnsmirror.streaming.DiskIO`), off the reactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from dnsmirror.store import BlobInfo, BlobReader

if TYPE_CHECKING:
    from dnsmirror.outcomes import Outcome
    from dnsmirror.target import Target
    from dnsmirror.upstream import HeaderInput


class UpstreamAnswer(Protocol):
    """Status, end-to-end headers and a body that can be consumed once (see
    :class:`~dnsmirror.upstream.UpstreamResponse`)."""

    @property
    def code(self) -> int: ...

    @property
    def phrase(self) -> bytes: ...

    @property
    def headers(self) -> Headers:
        """End-to-end headers only, repeated ones as separate values; ``content-length`` when known."""
        ...

    @property
    def length(self) -> int | None:
        """The body's length, or None when upstream did not say."""
        ...

    @property
    def description(self) -> str:
        """Method and URL for logs (query strings hidden)."""
        ...

    def deliver_body(self, protocol: Any) -> None:
        """To ``protocol`` (an ``IProtocol``; not every body consumer declares it): ``makeConnection``
        (a transport that pauses upstream), ``dataReceived`` per chunk, then ``connectionLost`` with
        ``ResponseDone`` (the whole body) or the reason it broke off."""
        ...

    def stream_to(self, consumer: IConsumer) -> defer.Deferred[Any]:
        """Write the body into ``consumer`` with back-pressure; fires once it is all written."""
        ...

    def read_body(self, limit: int) -> defer.Deferred[bytes]:
        """The whole body; fails with :class:`~dnsmirror.upstream.BodyTooLarge` beyond ``limit``."""
        ...

    def discard(self, limit: int = ...) -> defer.Deferred[None]:
        """Read and drop the body; never fails."""
        ...


class Upstream(Protocol):
    """Requests to upstream registries (see :class:`~dnsmirror.upstream.UpstreamClient`)."""

    def request(
        self,
        method: str | bytes,
        url: str | bytes,
        headers: HeaderInput = None,
        body_producer: IBodyProducer | None = None,
        *,
        follow_redirects: bool = False,
    ) -> defer.Deferred[Any]:
        """Fires with an :class:`UpstreamAnswer` once its headers are in, whatever its status; fails
        with one of :data:`~dnsmirror.upstream.UPSTREAM_FAILURES` when there is no answer."""
        ...


class BlobWriter(Protocol):
    """One blob being written, hashed as it goes; nothing is visible before :meth:`commit`."""

    @property
    def temp_path(self) -> Path:
        """A file other threads may open read-only while it is written: it holds the first
        :attr:`bytes_in_file` bytes; it is gone once the writer committed or aborted."""
        ...

    @property
    def bytes_in_file(self) -> int: ...

    @property
    def failure(self) -> BaseException | None:
        """Why bytes stopped going to the file (they are still hashed), or None."""
        ...

    @property
    def room(self) -> int | None:
        """Bytes the disk had room for when the writer was created, if known."""
        ...

    def describe(self, content_type: str | None, expected_size: int | None) -> None:
        """What a writer created before its response arrived could not know."""
        ...

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; past its expected size: ``SizeMismatch``, and the writer is aborted."""
        ...

    def verify(self, rest: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        """The accepted bytes then ``rest`` (written next) checked against the digest, without file I/O:
        ``DigestMismatch`` aborts, ``SizeMismatch`` when the size is not the expected one."""
        ...

    def commit(self) -> BlobInfo:
        """Verify and make the blob visible; a failed writer raises its failure, nothing is kept."""
        ...

    def abort(self) -> None:
        """Drop what was written; safe twice."""
        ...


class BlobStore(Protocol):
    """The content-addressed cache, as the content chain uses it (see :class:`~dnsmirror.store.Store`).

    Readers are :class:`~dnsmirror.store.BlobReader` handles: ``file`` has ``fileno`` for streaming."""

    @property
    def max_size(self) -> int: ...

    def __contains__(self, digest: object) -> bool:
        """Whether the index holds ``digest`` (in memory: no disk access)."""
        ...

    def stat(self, digest: object) -> BlobInfo | None: ...

    def open_blob(self, digest: object) -> BlobReader | None:
        """An open reader of a committed blob, or None; ``verified`` says if its file is known intact."""
        ...

    def verify_reader(self, reader: BlobReader) -> bool:
        """Hash the whole file: True remembers it intact, False drops the blob."""
        ...

    def read_verified(self, reader: BlobReader, limit: int) -> bytes | None:
        """The whole content, hashed; None when damaged (then dropped) or longer than ``limit``."""
        ...

    def mark_verified(self, reader: BlobReader) -> None: ...

    def drop_damaged(self, reader: BlobReader, reason: str) -> bool: ...

    def make_room(self, size: int) -> bool:
        """Evict until ``size`` bytes fit on the disk; False when they cannot."""
        ...

    def writer(
        self, digest: object, *, content_type: str | None = None, expected_size: int | None = None
    ) -> BlobWriter:
        """Start a blob; ``StoreFull`` at once when ``expected_size`` cannot fit."""
        ...


class Source(Protocol):
    """Somewhere content by digest may come from (:mod:`dnsmirror.sources`)."""

    name: str

    async def resolve(self, request: Any, target: Target) -> Outcome:
        """What this source answers for ``request`` (never written to here)."""
        ...


if TYPE_CHECKING:
    from dnsmirror.store import Store
    from dnsmirror.upstream import UpstreamClient, UpstreamResponse

    def _real_ones_conform(
        client: UpstreamClient, answer: UpstreamResponse, store: Store
    ) -> tuple[Upstream, UpstreamAnswer, BlobStore]:
        """Checked by mypy only: the real implementations satisfy these contracts."""
        return client, answer, store
