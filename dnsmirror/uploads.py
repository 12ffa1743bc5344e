"""Request bodies (pushes) streamed to upstream as they arrive, instead of spooled to a file first.

twisted.web receives a whole request body before it renders a resource, writing large bodies to a
temporary file on the reactor thread. :class:`StreamingRequest` starts the upstream request as soon
as the headers of a body-carrying request are in, and feeds the body through a :class:`BodyPipe`:
upstream's pace pauses the client's connection (back-pressure), and nothing touches the disk.

When upstream answers before the body is all in (a 401 to a push whose token expired, say), that
answer goes to the client at once, whole and with its length, and the rest of the body is read and
dropped instead of being sent on: a client that stops sending (Go's HTTP client does) learns at once,
and one that keeps sending still gets a connection in a clean state. twisted.web renders the request
only once the body has been received; that render merely finishes the answer already sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import Request
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from dnsmirror.pulls import MAX_MANIFEST_BYTES

if TYPE_CHECKING:
    from dnsmirror.target import Target

log = logging.getLogger("dnsmirror.uploads")

STREAMED_METHODS = frozenset({b"PUT", b"PATCH", b"POST"})
# received before upstream is ready to take it: the client is paused beyond this
_EARLY_BUFFER = 1024 * 1024


class ClientGone(Exception):
    """The client's connection closed before its request body was complete."""


@implementer(IBodyProducer)
class BodyPipe:
    """An ``IBodyProducer`` fed with the client's body chunks as they arrive."""

    def __init__(
        self, length: int | None, pause_client: Callable[[], None], resume_client: Callable[[], None]
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._consumer: IConsumer | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._client_paused = False
        self._upstream_paused = False
        self._stopped = False
        self._finished = False
        self._failure: Failure | None = None
        self._done: defer.Deferred[None] | None = None

    # --- fed by the request ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._stopped or self._finished:
            return  # upstream gave up on the body: drain the rest
        if self._consumer is None or self._upstream_paused:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > _EARLY_BUFFER and not self._client_paused:
                self._client_paused = True
                self._pause_client()
            return
        self._consumer.write(data)

    def finish(self) -> None:
        """The client's body is complete."""
        self._finished = True
        self._settle()

    @property
    def complete(self) -> bool:
        """Whether the client's whole body has arrived."""
        return self._finished

    def fail(self, reason: Failure) -> None:
        """The client went away mid-body."""
        if self._finished or self._failure is not None:
            return
        self._failure = reason
        self._settle()

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        for chunk in buffered:
            consumer.write(chunk)
        if self._client_paused:
            self._client_paused = False
            self._resume_client()

    def _settle(self) -> None:
        if self._done is None or self._done.called:
            return
        if self._failure is not None:
            self._done.errback(self._failure)
        elif self._finished and not self._buffer:
            self._done.callback(None)

    # --- IBodyProducer, driven by the upstream request ------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._consumer = consumer
        self._done = defer.Deferred()
        if not self._upstream_paused:
            self._flush()
        self._settle()
        return self._done

    def pauseProducing(self) -> None:
        self._upstream_paused = True
        if not self._client_paused:
            self._client_paused = True
            self._pause_client()

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        if self._consumer is not None:
            self._flush()
            self._settle()

    def stopProducing(self) -> None:
        self._stopped = True
        self._buffer, self._buffered = [], 0
        if self._client_paused:
            self._client_paused = False
            self._resume_client()


@dataclass(frozen=True)
class RequestLine:
    """A request's first line: what the connection read, before the body is in."""

    method: bytes
    path: bytes
    version: bytes


class StreamingRequest(server.Request):
    """dnsmirror's request type: a twisted.web request whose body may be streamed to an exchange started
    at header time, and the one place that declares every field dnsmirror keeps on a request.

    The site's resource decides: ``resource.start_streaming(request, pipe)`` returns a Deferred of
    the upstream response (kept as :attr:`early_response`) or ``None`` to receive the body as usual.
    """

    early_response: defer.Deferred[Any] | None = None
    body_pipe: BodyPipe | None = None
    #: Fires once upstream's answer has been sent before the body was all in (see the module docstring).
    early_answer: defer.Deferred[None] | None = None
    #: Where the response came from, for the access log (set by the content chain / pass-through).
    source: str | None = None
    #: The request's :class:`~dnsmirror.target.Target`, once the registry front resolved it.
    target: Target | None = None
    #: The request line as the connection read it, known before twisted.web sets ``method`` and ``uri``
    #: (once the body is in); set by :class:`dnsmirror.web.RegistryChannel`. Without it, no body streams.
    request_line: RequestLine | None = None
    #: When the first body byte was written (monotonic), for the pull report.
    first_byte_at: float | None = None
    #: The body sent so far, kept (up to ``pulls.MAX_MANIFEST_BYTES``) when set to a bytearray: manifests.
    kept_body: bytearray | None = None

    #: The request body's file (twisted.web's own field, which its stubs declare as only None).
    content: IO[bytes] | None = None  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_at = time.monotonic()

    def write(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        if self.kept_body is not None:
            if len(self.kept_body) + len(data) <= MAX_MANIFEST_BYTES:
                self.kept_body += data
            else:
                self.kept_body = None
        super().write(data)

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        resource = getattr(getattr(channel, "site", None), "resource", None)
        start = getattr(resource, "start_streaming", None)
        line = self.request_line
        if start is None or line is None or line.method.upper() not in STREAMED_METHODS or length == 0:
            super().gotLength(length)
            return
        # what requestReceived will set, needed now to route the request
        self.method, self.uri = line.method, line.path
        transport = cast(IPushProducer, channel.transport)  # a TCP or TLS connection: a push producer
        pipe = BodyPipe(length, transport.pauseProducing, transport.resumeProducing)
        early = start(self, pipe)
        if early is None:
            super().gotLength(length)
            return
        self.content = BytesIO()
        self.body_pipe = pipe
        self.early_response = early
        # what requestReceived would set: needed to answer while the body is still arriving
        self.clientproto = line.version
        answer_early = getattr(resource, "answer_early", None)
        if answer_early is not None:
            early.addCallback(self._upstream_answered, answer_early)

    def _upstream_answered(self, outcome: tuple[str, Any], answer_early: Callable[..., Any]) -> Any:
        pipe = self.body_pipe
        if pipe is None or pipe.complete or self._disconnected or self.early_response is None:
            return outcome  # the usual render sends it
        # upstream has its answer and takes no more of the body: drop the rest, answer the client now
        self.early_response = None
        pipe.stopProducing()
        answered: defer.Deferred[None] = defer.Deferred()
        self.early_answer = answered

        def answer() -> None:
            sending = defer.ensureDeferred(answer_early(self, outcome))
            # fires with None either way: the render that follows the body only finishes the request
            sending.addErrback(lambda failure: log.error("early answer failed: %s", failure.getTraceback()))
            sending.chainDeferred(answered)

        # on the next turn: this may run inside gotLength, before twisted.web's own "100 Continue"
        self.channel.callLater(0, answer)  # the channel's clock, as twisted.web's own timers use
        return None

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_pipe is not None:
            self.body_pipe.write(data)
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body_pipe is not None:
            self.body_pipe.finish()
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        """Finish the response; a no-op once the client has gone (it may leave during any wait of a
        handler, and twisted.web would raise)."""
        if self._disconnected:
            return
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        if self.body_pipe is not None:
            self.body_pipe.fail(Failure(ClientGone("client closed the connection mid-body")))
        if self.early_response is not None:
            # never rendered: let go of upstream's answer so its connection is freed
            self.early_response.addCallback(_discard)
            self.early_response = None
        unfinished = getattr(getattr(self.channel, "site", None), "log_unfinished", None)
        if not self.finished and unfinished is not None and self.uri != Request.uri:
            unfinished(self)
        super().connectionLost(reason)


def _discard(outcome: tuple[str, Any]) -> None:
    kind, value = outcome
    if kind == "ok":
        value.discard()
