"""The registry front behind the TLS listener: routes each request to the content chain or upstream.

The request must name the same captured host in SNI and in ``Host`` (421 otherwise), so nothing is
ever proxied to a host the client did not connect to. Reads by digest go to
:class:`~dnsmirror.content.ContentChain`; everything else passes through unchanged
(:class:`~dnsmirror.proxy.PassThrough`).
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.iweb import IBodyProducer

from dnsmirror import oci
from dnsmirror.authz import credential_key
from dnsmirror.content import ContentChain
from dnsmirror.patterns import HostMatcher, normalize_host
from dnsmirror.proxy import PassThrough
from dnsmirror.pulls import PullReporter
from dnsmirror.respond import abort, write_error
from dnsmirror.target import Target
from dnsmirror.uploads import RequestLine, StreamingRequest

log = logging.getLogger("dnsmirror.web")

MAX_URI = 8192


def server_name(request: server.Request) -> str | None:
    """The TLS SNI name of the connection ``request`` arrived on, or None (plain TCP, no SNI)."""
    transport = getattr(request.channel, "transport", None)
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        name = get_handle().get_servername()
    except Exception:  # noqa: BLE001 - not a TLS connection
        return None
    return name.decode("ascii", "replace") if name else None


def request_host(request: server.Request) -> str | None:
    """The Host header without port, normalised; None when absent or unusable."""
    values = request.requestHeaders.getRawHeaders(b"host") or []
    if len(values) != 1:
        return None
    host = values[0].decode("ascii", "replace").strip()
    if host.startswith("["):
        return None  # an IP literal is never a captured name
    return normalize_host(host.rsplit(":", 1)[0] if ":" in host else host)


class RegistryChannel(http.HTTPChannel):
    """twisted.web's HTTP connection, answering an overlong request or header line with 400 too."""

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted.web only closes, which over TLS can leave a client waiting for an answer
        self._respondToBadRequestAndDisconnect()

    def lineReceived(self, line: bytes) -> None:
        known = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > known:
            # a request line: twisted.web keeps it private until the body is in; an upload is routed at
            # header time
            parts = line.split()
            request = self.requests[-1]
            if len(parts) == 3 and isinstance(request, StreamingRequest):
                request.request_line = RequestLine(*parts)


class RegistryResource(resource.Resource):
    """Every path of the HTTPS listener."""

    isLeaf = True

    def __init__(
        self,
        matcher: HostMatcher,
        content: ContentChain,
        passthrough: PassThrough,
        pulls: PullReporter | None = None,
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.content = content
        self.passthrough = passthrough
        self.pulls = pulls  # a PullReporter told of each request as it begins, or None

    def start_streaming(self, request: StreamingRequest, body: IBodyProducer) -> defer.Deferred[Any] | None:
        """Start the upstream exchange of a body-carrying request at header time (pushes), with
        ``body`` producing the client's bytes as they arrive; None to receive the body first (a request
        that will be refused)."""
        target = self.target_of(request)
        if isinstance(target, oci.OCIError):
            return None
        return self.passthrough.start(target, request.requestHeaders, body)

    def answer_early(self, request: StreamingRequest, outcome: tuple[str, Any]) -> defer.Deferred[None]:
        """Send upstream's answer to a push whose body is still arriving (see :mod:`dnsmirror.uploads`)."""
        return defer.ensureDeferred(self.passthrough.answer_early(request, outcome))

    def render(self, request: StreamingRequest) -> int:
        done = defer.ensureDeferred(self._handle(request))
        done.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _failed(self, failure: Failure, request: StreamingRequest) -> None:
        log.error("request %s %s failed: %s", request.method.decode("ascii", "replace"),
                  request.uri[:200].decode("ascii", "replace"), failure.getTraceback())
        if request.startedWriting and not request.finished:
            abort(request)  # the status line is gone: only a cut connection says the body is incomplete
            return
        write_error(request, oci.OCIError("UNKNOWN", "internal error", status=500))

    def target_of(self, request: server.Request) -> Target | oci.OCIError:
        """Resolve a request to its upstream target, or the error to answer it with."""
        sni = server_name(request)
        host = request_host(request)
        if host is None:
            return oci.OCIError("UNSUPPORTED", "the request needs exactly one Host header", status=400)
        if sni is None or normalize_host(sni) != host:
            return oci.OCIError("DENIED", "Host does not match the TLS server name", status=421)
        if not self.matcher.captures(host):
            return oci.OCIError("DENIED", f"{host} is not a captured registry", status=421)
        if len(request.uri) > MAX_URI:
            return oci.OCIError("UNSUPPORTED", "request URI too long", status=414)
        if not request.uri.isascii() or not request.uri.startswith(b"/"):
            return oci.OCIError("UNSUPPORTED", "request URI must be an ASCII absolute path", status=400)
        raw_path = request.uri.split(b"?", 1)[0]
        try:
            path = oci.parse_path(raw_path)
        except oci.OCIError as exc:
            return exc
        authorization = list(request.requestHeaders.getRawHeaders(b"authorization") or [])
        return Target(
            host=host,
            upstream_host=oci.upstream_host(host),
            uri=request.uri,
            method=request.method.decode("ascii", "replace").upper(),
            path=path,
            credential=credential_key(b"\n".join(authorization) if authorization else None),
            authorization=authorization,
        )

    async def _handle(self, request: StreamingRequest) -> None:
        target = self.target_of(request)
        if isinstance(target, oci.OCIError):
            write_error(request, target)
            return
        request.target = target
        if self.pulls is not None:
            self.pulls.request_started(request, target)
        if target.path is not None and target.path.by_digest and target.method in ("GET", "HEAD"):
            await self.content.serve(request, target)
        else:
            await self.passthrough.forward(request, target)
