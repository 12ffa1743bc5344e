"""A client and dnsmirror's SNI server over Twisted's TLS protocol on an in-memory transport: what the TLS
tests and the bulk byte path's tests share."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from harness.pki import mirror_ca
from twisted.internet import protocol, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from dnsmirror import config, tls
from dnsmirror.patterns import HostMatcher

PATTERNS = config.load().capture


@implementer(IHandshakeListener)
class Recorder(protocol.Protocol):
    """One side's application: the pieces it was handed, its handshakes and why it was lost."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.handshakes = 0
        self.lost = None

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason) -> None:
        self.lost = reason


class MemoryTLS:
    """dnsmirror's CA in a temporary directory (removed by ``cleanup``), its SNI server and a clock."""

    def __init__(self, cleanup) -> None:
        directory = Path(tempfile.mkdtemp(prefix="dnsmirror-memory-tls-"))
        cleanup(shutil.rmtree, directory, True)
        self.authority = mirror_ca(directory, PATTERNS)
        self.root = Certificate.loadPEM((directory / "root.crt").read_bytes())
        self.sni = tls.SniServer(HostMatcher(PATTERNS), tls.prepare_signing(self.authority))
        self.clock = task.Clock()

    def connect(self, server_name: str, *, protocol_class=None, alpn: list[bytes] | None = None,
                greet: bool = True):
        """A client for ``server_name`` connected to the SNI server (both with ``protocol_class`` as their TLS
        protocol when given), the handshake pumped; returns (client, server, recorders by side, pump)."""
        recorders: dict[str, Recorder] = {}

        def recording(side: str) -> protocol.Factory:
            factory = protocol.Factory()
            factory.buildProtocol = lambda addr: recorders.setdefault(side, Recorder())
            return factory

        server_factory = TLSMemoryBIOFactory(self.sni, False, recording("server"), clock=self.clock)
        options = optionsForClientTLS(server_name, trustRoot=self.root, acceptableProtocols=alpn)
        client_factory = TLSMemoryBIOFactory(options, True, recording("client"), clock=self.clock)
        if protocol_class is not None:
            server_factory.protocol = client_factory.protocol = protocol_class
        client, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None),
            greet=greet)
        return client, server, recorders, pump
