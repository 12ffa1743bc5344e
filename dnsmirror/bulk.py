"""Fewer, larger pieces and fewer copies on the byte path: the per-piece Python work and each copy of a
blob's bytes are what a cold fill costs.

Twisted's ``TLSMemoryBIOProtocol`` hands the protocol above it one TLS record (at most 16 KiB) per call,
and reads the socket 64 KiB at a time. A blob then crosses the HTTP client's parser, the body protocols
and the fill some 65,000 times per GiB. :class:`BulkTLSProtocol` decrypts every record of one socket read
straight into one buffer (OpenSSL's ``SSL_read`` through pyOpenSSL's binding, as pyOpenSSL's own ``recv``
does, without its buffer and copy per record) and hands the plaintext on in one piece, and reads the
socket in larger pieces once the handshake is done, so each layer above runs once per socket read.
OpenSSL reads each socket read where it lies: a read-only memory BIO over those bytes becomes the
connection's receiving BIO (:meth:`BulkTLSProtocol.receive_from`). Twisted's protocol writes them into the
connection's memory BIO instead: a copy, after OpenSSL clears the room for it.

On the way out it encrypts a large write in pieces of :data:`SEND_PIECE` without copying them first (one C
call per piece: the connection does not allow partial writes, which would make it one call per 16 KiB
record), and sends the ciphertext from the memory BIO OpenSSL wrote it into when nothing is queued before it
(:func:`send_now`; only what the socket does not take is copied into the connection's queue); the BIO is then
emptied by reading its bytes onto themselves, which the C library does not copy. Nothing else changes: the
same records are decrypted in the same order, errors and the TLS shutdown are handled as Twisted does, after
the plaintext that came before them was delivered.

:class:`GatherServer` sends what a connection has queued with one ``sendmsg`` of the queued pieces as
they are, where Twisted joins them into one new string first (a copy of every byte sent) and sends at
most 128 KiB per call; :func:`gather_writes` gives a listening port's connections that transport.

:func:`install` makes every TLS connection of the process (the HTTPS listener, upstream and egress
connections) use :class:`BulkTLSProtocol`; it is called once at start by :mod:`dnsmirror.app`.
:class:`PeerEndpoints` gives connections between peer nodes (plain HTTP, or inside the peers' TLS) the same
large socket reads.
"""

from __future__ import annotations

from errno import ENOBUFS, EWOULDBLOCK
from typing import Any, cast

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError, _ffi, _lib
from twisted.internet import main, tcp
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.python.util import untilConcludes
from zope.interface import implementer

# room left for one more record's plaintext (16 KiB) before the buffer is handed on
RECORD_READ = 32 * 1024
# socket reads of a connection after its handshake (Twisted's default is 64 KiB): each read costs the layers
# above it a pass of Python, so a GiB in 1 MiB reads costs a quarter of what it does in 256 KiB ones
SOCKET_READ = 1024 * 1024
# plaintext encrypted per call when sending (Twisted: one 16 KiB record per call, copied first)
SEND_PIECE = 1024 * 1024
# plaintext decrypted from one socket read before it is handed on
PLAIN_BUFFER = SOCKET_READ + 2 * RECORD_READ
# most pieces one sendmsg takes (the kernel's limit is 1024)
GATHER_PIECES = 64

# One for the whole reactor: what OpenSSL puts in is copied out before any other code runs, so a
# connection's call nested in another's (a write while a read's plaintext is handed on) finds it free
_uncleared = _ffi.new_allocator(should_clear_after_alloc=False)
_PLAIN = _uncleared("char[]", PLAIN_BUFFER)
# where BIO_get_mem_data says a memory BIO's unread bytes start
_PENDING = _ffi.new("char **")


class BulkTLSProtocol(TLSMemoryBIOProtocol):
    """A ``TLSMemoryBIOProtocol`` that delivers the plaintext of one socket read in one piece."""

    # the bytes the receiving BIO reads: they must live as long as it does
    _received: bytes = b""

    def makeConnection(self, transport) -> None:
        super().makeConnection(transport)
        # pyOpenSSL's contexts allow partial writes: one SSL_write per 16 KiB record. Into a memory BIO, which
        # takes any amount, a whole write either writes every record or fails before the first (a handshake
        # not done yet: Twisted retries it with the same bytes, which OpenSSL accepts from a moved buffer).
        # Nothing can have been written yet: the handshake needs the peer's answer first.
        _lib.SSL_clear_mode(self._tlsConnection._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)

    def dataReceived(self, data: bytes) -> None:
        # as Twisted's, but OpenSSL reads the bytes where they are instead of from a copy in its BIO
        self.receive_from(data)
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    def receive_from(self, data: bytes) -> None:
        """Makes a read-only memory BIO over ``data`` the connection's receiving BIO (OpenSSL frees the one
        before it). Bytes the one before still held (none, when every read ran until OpenSSL wanted more)
        come first, copied."""
        connection = self._tlsConnection
        unread = _lib.BIO_get_mem_data(connection._into_ssl, _PENDING)
        if unread > 0:
            data = _ffi.buffer(_PENDING[0], unread)[:] + data
        bio = _lib.BIO_new_mem_buf(_ffi.from_buffer(data), len(data))
        if bio == _ffi.NULL:
            raise MemoryError("OpenSSL could not make a memory BIO")
        # read out, it asks for more (as the memory BIO it replaces does) instead of reporting an end
        _lib.BIO_set_mem_eof_return(bio, -1)
        _lib.SSL_set_bio(connection._ssl, bio, connection._from_ssl)
        connection._into_ssl = bio  # where pyOpenSSL marks the end of input (bio_shutdown)
        self._received = data

    def _flushReceiveBIO(self) -> None:
        connection = self._tlsConnection
        ssl = connection._ssl
        filled = 0
        while not self._lostTLSConnection:
            if PLAIN_BUFFER - filled < RECORD_READ:
                self._deliver(filled)
                filled = 0
            result = _lib.SSL_read(ssl, _PLAIN + filled, PLAIN_BUFFER - filled)
            if result > 0:
                filled += result
                continue
            try:
                connection._raise_ssl_error(ssl, result)  # pyOpenSSL's exception for OpenSSL's error
            except WantReadError:
                break
            except ZeroReturnError:
                # what came before the close_notify is delivered first, as it would have been record by record
                self._deliver(filled)
                filled = 0
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(filled)
                filled = 0
                self._tlsShutdownFinished(failure)
            else:
                break  # no error to report: nothing more to read now
        self._deliver(filled)
        self._flushSendBIO()

    def _deliver(self, size: int) -> None:
        """Hands the first ``size`` bytes of the plaintext buffer on as one string."""
        if size and not self._aborted:
            ProtocolWrapper.dataReceived(self, _ffi.buffer(_PLAIN, size)[:])

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        ssl, size, sent = self._tlsConnection._ssl, len(data), 0
        # one SSL_write encrypts every record of a SEND_PIECE (see makeConnection); their ciphertext goes once
        with _ffi.from_buffer(data) as plaintext:
            while sent < size:
                result = _lib.SSL_write(ssl, plaintext + sent, min(size - sent, SEND_PIECE))
                if result <= 0:
                    self._flushSendBIO()  # the records encrypted before the error go first
                    self._write_failed(result, memoryview(data)[sent:])
                    return
                sent += result
                self._flushSendBIO()

    def _write_failed(self, result: int, unsent: memoryview) -> None:
        """An ``SSL_write`` returned ``result``: the rest waits for the peer's data, or the connection fails,
        as Twisted's ``_write`` handles them."""
        connection = self._tlsConnection
        try:
            connection._raise_ssl_error(connection._ssl, result)  # pyOpenSSL's exception for OpenSSL's error
        except WantReadError:
            self._bufferedWrite(unsent.tobytes())
        except Error:
            self._tlsShutdownFinished(Failure())

    def _flushSendBIO(self) -> None:
        source, transport = self._tlsConnection._from_ssl, cast(Any, self.transport)
        size = _lib.BIO_get_mem_data(source, _PENDING)
        if size <= 0:
            return
        start = _PENDING[0]
        with memoryview(_ffi.buffer(start, size)) as ciphertext:
            sent = send_now(transport, ciphertext)
            rest = ciphertext[sent:].tobytes() if sent < size else None
        # read onto themselves, the bytes leave the BIO without being copied (memcpy skips a copy in place);
        # before any other code runs, since a write into the BIO may move or free its memory
        if _lib.BIO_read(source, start, size) != size:
            raise RuntimeError("a memory BIO gave fewer bytes than it said it held")
        if rest is not None:
            transport.write(rest)  # queued as it would have been: a write nested in this one queues after it

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        if self._handshakeDone:
            grow_reads(self)  # bulk data follows the handshake: fewer, larger socket reads


def send_now(transport: Any, data: memoryview) -> int:
    """Sends what the socket takes of ``data`` at once, when ``transport`` is a TCP connection with nothing
    queued before it and not closing; returns how many bytes went (0 when it sent nothing), and the caller
    queues the rest. A connection that keeps up then sends straight from the caller's buffer, where queuing
    would first copy every byte into a string of its own. A wrapper that only passes writes on (a listener's
    connection limiter) is looked through."""
    while isinstance(transport, ProtocolWrapper) and type(transport).write is ProtocolWrapper.write:
        transport = transport.transport
    # an aborted connection sends nothing more: Twisted drops what is queued on it
    if (not isinstance(transport, tcp.Connection) or not transport.connected or transport.disconnecting
            or transport._aborting or transport._writeDisconnecting or transport._tempDataLen
            or transport.offset < len(transport.dataBuffer)):
        return 0
    try:
        return untilConcludes(transport.socket.send, data)
    except OSError:
        return 0  # the queued bytes meet the error again, and Twisted reports it as it would have


def install() -> None:
    """Every TLS connection made or accepted from now on uses :class:`BulkTLSProtocol`."""
    TLSMemoryBIOFactory.protocol = BulkTLSProtocol


def sent_through(buffer: bytes, offset: int, pending: list[bytes], sent: int) -> tuple[bytes, int, int]:
    """After ``sent`` bytes of ``buffer[offset:]`` and then of ``pending`` left: the new (buffer, offset),
    and how many bytes were taken off ``pending`` (the pieces fully sent are removed from it; one sent in
    part becomes the buffer, no bytes copied)."""
    remaining = len(buffer) - offset
    if sent < remaining:
        return buffer, offset + sent, 0
    sent -= remaining
    taken = 0
    while pending and sent >= len(pending[0]):
        piece = pending.pop(0)
        sent -= len(piece)
        taken += len(piece)
    if sent:
        piece = pending.pop(0)
        return piece, sent, taken + len(piece)
    return b"", 0, taken


class GatherServer(tcp.Server):
    """A TCP server connection that sends its queued pieces with one ``sendmsg``, without joining them."""

    def doWrite(self):
        pending = self._tempDataBuffer
        remaining = len(self.dataBuffer) - self.offset
        pieces: list[Any] = [memoryview(self.dataBuffer)[self.offset:]] if remaining else []
        pieces.extend(pending[:GATHER_PIECES])
        try:
            sent = untilConcludes(self.socket.sendmsg, pieces)
        except OSError as exc:
            if exc.args[0] not in (EWOULDBLOCK, ENOBUFS):
                return main.CONNECTION_LOST
            sent = 0
        self.dataBuffer, self.offset, taken = sent_through(self.dataBuffer, self.offset, pending, sent)
        self._tempDataLen -= taken
        if self.offset < len(self.dataBuffer) or self._tempDataLen:
            return None
        # all sent: from here on as Twisted's FileDescriptor.doWrite
        self.dataBuffer, self.offset = b"", 0
        self.stopWriting()
        if self.producer is not None and (not self.streamingProducer or self.producerPaused):
            self.producerPaused = False
            self.producer.resumeProducing()
        elif self.disconnecting:
            return self._postLoseConnection()
        elif self._writeDisconnecting:
            self._writeDisconnected = True
            return self._closeWriteConnection()
        return None


def gather_writes(port):
    """The connections ``port`` accepts from now on send with :class:`GatherServer` (returns ``port``)."""
    if isinstance(port, tcp.Port):  # a test's in-memory port has no sockets to send on
        port.transport = GatherServer
    return port


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


class PeerEndpoints:
    """An ``Agent`` endpoint factory for HTTP between peer nodes whose connections read the socket in large
    pieces (from ``bind_address`` when given: a peer knows a node by the address it connects from). With
    ``tls`` (a client connection creator, see :class:`dnsmirror.peer_tls.PeerTLS`) every connection is made
    inside TLS, whatever the URL's scheme."""

    def __init__(self, reactor, connect_timeout: float, bind_address: tuple[str, int] | None = None,
                 tls: IOpenSSLClientConnectionCreator | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.bind_address = bind_address
        self.tls = tls

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, uri.port, timeout=self.connect_timeout, bindAddress=self.bind_address)
        if self.tls is not None:
            # the TLS protocol grows its socket's reads itself once its handshake is done
            return wrapClientTLS(self.tls, endpoint)
        return _LargeReads(endpoint)
