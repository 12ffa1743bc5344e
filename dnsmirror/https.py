"""The HTTPS listener(s): TLS with per-SNI leaves (:mod:`dnsmirror.tls`) in front of a twisted.web site.

The web layer is injected (a :class:`~twisted.web.resource.Resource` or a whole
:class:`~twisted.web.server.Site`); until one is given, every request gets a 503 with an OCI error body.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from twisted.internet import error
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from dnsmirror import bulk, oci
from dnsmirror.config import HostPort
from dnsmirror.limits import ConnectionLimiter, ListenerCaps
from dnsmirror.logs import fields
from dnsmirror.respond import write_error
from dnsmirror.tls import SniServer

log = logging.getLogger("dnsmirror.https")


class UnavailableResource(resource.Resource):
    """Answers every request with 503 and an OCI distribution error body."""

    isLeaf = True

    def __init__(self, message: str = "dnsmirror's registry front is not available yet") -> None:
        super().__init__()
        self.error = oci.OCIError("UNAVAILABLE", message, status=503)

    def render(self, request: server.Request) -> int:
        write_error(request, self.error)
        return server.NOT_DONE_YET


class HttpsBindError(Exception):
    """A configured HTTPS address could not be bound; ``index`` is its position in ``https.listen``."""

    def __init__(self, index: int, address: HostPort, cause: error.CannotListenError) -> None:
        self.index = index
        self.address = address
        self.cause = cause
        super().__init__(f"https.listen[{index}]: cannot listen on {address}: {cause.socketError}")


class HttpsListener:
    """Binds every ``https.listen`` address with the SNI connection creator in front of ``site``; with
    ``caps``, the connections all addresses hold together are bounded by them (:mod:`dnsmirror.limits`)."""

    def __init__(
        self,
        reactor: Any,
        addresses: Sequence[HostPort],
        sni: SniServer,
        site: server.Site | resource.Resource | None = None,
        caps: ListenerCaps | None = None,
    ) -> None:
        self.reactor = reactor
        self.addresses = tuple(addresses)
        self.sni = sni
        if site is None:
            site = UnavailableResource()
        if isinstance(site, resource.Resource):
            site = server.Site(site)
        self.site = site
        self.caps = caps
        self.limiter: ConnectionLimiter | None = None
        self.ports: list[IListeningPort] = []

    def start(self) -> None:
        """Bind all addresses or none: raises :class:`HttpsBindError` after closing what was bound."""
        factory: IProtocolFactory = TLSMemoryBIOFactory(self.sni, False, self.site)
        if self.caps is not None:
            # counted before TLS: a connection that never finishes its handshake holds a descriptor too
            factory = self.limiter = ConnectionLimiter(factory, self.caps, "https", self.reactor)
        for index, address in enumerate(self.addresses):
            try:
                port = bulk.gather_writes(
                    self.reactor.listenTCP(address.port, factory, interface=address.host, backlog=1024))
            except error.CannotListenError as exc:
                self.stop()
                raise HttpsBindError(index, address, exc) from exc
            self.ports.append(port)
        log.info("HTTPS listening", extra=fields(https=[str(a) for a in self.bound_addresses()]))

    def bound_addresses(self) -> list[HostPort]:
        """The addresses actually bound (port 0 in the config becomes the real port)."""
        return [
            HostPort(a.host, p.getHost().port)  # type: ignore[attr-defined]  # an IPv4Address or IPv6Address
            for a, p in zip(self.addresses, self.ports, strict=False)
        ]

    def stop(self) -> None:
        """Close every listening port (open connections finish on their own)."""
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()
