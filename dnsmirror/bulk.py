"""Fewer, larger pieces on the TLS byte path: the per-piece Python work is what a blob's bytes cost.

Twisted's ``TLSMemoryBIOProtocol`` hands the protocol above it one TLS record (at most 16 KiB) per call,
and reads the socket 64 KiB at a time. A blob then crosses the HTTP client's parser, the body protocols
and the fill some 65,000 times per GiB. :class:`BulkTLSProtocol` decrypts every record of one socket read
and hands their plaintext on in one piece, and reads the socket in larger pieces once the handshake is
done, so each layer above runs once per socket read. On the way out it encrypts a large write in
pieces of :data:`SEND_PIECE` (memoryview slices, no copies) and hands the transport all ciphertext
of a piece at once, instead of copying, encrypting and writing one 16 KiB record at a time. Nothing else
changes: the same records are decrypted in the same order, errors and the TLS shutdown are handled as
Twisted does, after the plaintext that came before them was delivered.

:func:`install` makes every TLS connection of the process (the HTTPS listener, upstream and egress
connections) use it; it is called once at start by :mod:`dnsmirror.app`. :class:`PlainEndpoints` gives
plain HTTP connections (between peer nodes) the same large socket reads.
"""

from __future__ import annotations

from typing import Any, cast

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

# plaintext asked of OpenSSL per call: one record at most is returned, whatever the size asked
RECORD_READ = 32 * 1024
# socket reads of a connection after its handshake (Twisted's default is 64 KiB)
SOCKET_READ = 256 * 1024
# plaintext encrypted per call when sending (Twisted: one 16 KiB record per call, copied first)
SEND_PIECE = 256 * 1024
# ciphertext taken out of OpenSSL per call: a SEND_PIECE's records and their headers
CIPHER_READ = SEND_PIECE + 64 * 1024


class BulkTLSProtocol(TLSMemoryBIOProtocol):
    """A ``TLSMemoryBIOProtocol`` that delivers the plaintext of one socket read in one piece."""

    def _flushReceiveBIO(self) -> None:
        pieces: list[bytes] = []
        connection = self._tlsConnection
        while not self._lostTLSConnection:
            try:
                pieces.append(connection.recv(RECORD_READ))
            except WantReadError:
                break
            except ZeroReturnError:
                # what came before the close_notify is delivered first, as it would have been record by record
                self._deliver(pieces)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(pieces)
                self._tlsShutdownFinished(failure)
        self._deliver(pieces)
        self._flushSendBIO()

    def _deliver(self, pieces: list[bytes]) -> None:
        if not pieces:
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        if not self._aborted:
            ProtocolWrapper.dataReceived(self, data)

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += self._tlsConnection.send(view[sent:sent + SEND_PIECE])
            except WantReadError:
                self._bufferedWrite(bytes(view[sent:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            else:
                self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        connection, transport = self._tlsConnection, cast(Any, self.transport)
        while True:
            try:
                data = connection.bio_read(CIPHER_READ)
            except WantReadError:
                return
            transport.write(data)
            if len(data) < CIPHER_READ:
                return

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        if self._handshakeDone:
            grow_reads(self)  # bulk data follows the handshake: fewer, larger socket reads


def install() -> None:
    """Every TLS connection made or accepted from now on uses :class:`BulkTLSProtocol`."""
    TLSMemoryBIOFactory.protocol = BulkTLSProtocol


def grow_reads(protocol):
    """A connected protocol's socket is read :data:`SOCKET_READ` bytes at a time (returns ``protocol``)."""
    transport = protocol.transport
    if getattr(transport, "bufferSize", SOCKET_READ) < SOCKET_READ:
        transport.bufferSize = SOCKET_READ
    return protocol


@implementer(IStreamClientEndpoint)
class _LargeReads:
    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner

    def connect(self, protocol_factory):
        return self.inner.connect(protocol_factory).addCallback(grow_reads)


class PlainEndpoints:
    """An ``Agent`` endpoint factory for plain HTTP whose connections read the socket in large pieces (from
    ``bind_address`` when given: a peer knows a node by the address it connects from)."""

    def __init__(self, reactor, connect_timeout: float, bind_address: tuple[str, int] | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.bind_address = bind_address

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        return _LargeReads(HostnameEndpoint(self.reactor, host, uri.port, timeout=self.connect_timeout,
                                            bindAddress=self.bind_address))
