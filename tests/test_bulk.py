"""The bulk TLS byte path: the plaintext of one read is delivered in one piece, in order, before any
shutdown or error; large writes leave as the same bytes."""

from __future__ import annotations

import os
import random
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from tls_support import MemoryTLS, Recorder
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator, ClientFactory, Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dnsmirror import bulk

HOST = "quay.io"
MiB = 1024 * 1024


class BulkTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tls = MemoryTLS(self.addCleanup)
        self.clock = self.tls.clock

    def connect(self, bulk_protocol=True):
        client, server, recorders, pump = self.tls.connect(
            HOST, protocol_class=bulk.BulkTLSProtocol if bulk_protocol else None, greet=False)
        client.transport.bufferSize = 64 * 1024  # a TCP connection's default socket read
        pump.flush()
        return client, server, recorders, pump

    def test_a_large_write_arrives_whole_in_order_and_in_few_pieces(self) -> None:
        client, server, recorders, pump = self.connect()
        body = os.urandom(3 * MiB + 12345)
        server.write(body)
        self.clock.advance(0)
        pump.flush()
        received = recorders["client"]
        self.assertEqual(received.received, body)
        # 16 KiB records, but each read of the wire is handed on in one piece
        self.assertLess(len(received.pieces), len(body) // (16 * 1024) // 4)

    def test_writes_made_while_a_read_is_handed_on_keep_both_directions_whole(self) -> None:
        # the client echoes each piece from inside its dataReceived: an encryption nested in a decryption,
        # both using the reactor's one pair of buffers
        client, server, recorders, pump = self.connect()
        echo = recorders["client"]
        echo.dataReceived = lambda data: (echo.pieces.append(data), echo.transport.write(data))
        body = os.urandom(3 * MiB + 4321)
        server.write(body)
        self.clock.advance(0)
        pump.flush()
        self.assertEqual(echo.received, body)
        self.assertEqual(recorders["server"].received, body)

    def test_a_write_nested_in_queuing_the_ciphertext_goes_after_it(self) -> None:
        # the queued ciphertext's write calls back into the connection (as a producer paused by a full buffer
        # may): the nested write's records follow the piece being queued, none sent twice or lost, since the
        # memory BIO is emptied before it is written into again
        client, server, recorders, pump = self.connect()
        first, nested = os.urandom(2 * MiB + 777), os.urandom(64 * 1024 + 5)
        wire, queue = server.transport, server.transport.write
        unwritten = [nested]

        def write(data: bytes) -> None:
            queue(data)
            if unwritten:  # the first queued write only
                server.write(unwritten.pop())

        wire.write = write
        server.write(first)
        self.clock.advance(0)
        pump.flush()
        piece = bulk.SEND_PIECE
        self.assertEqual(recorders["client"].received, first[:piece] + nested + first[piece:])

    def test_stock_protocol_delivers_record_by_record(self) -> None:
        # the control of the test above: without the bulk protocol, one piece per 16 KiB record
        client, server, recorders, pump = self.connect(bulk_protocol=False)
        body = os.urandom(MiB)
        server.write(body)
        self.clock.advance(0)
        pump.flush()
        self.assertEqual(recorders["client"].received, body)
        self.assertGreaterEqual(len(recorders["client"].pieces), MiB // (16 * 1024))

    def test_many_small_writes_keep_their_order(self) -> None:
        client, server, recorders, pump = self.connect()
        pieces = [os.urandom(size) for size in (1, 100, 16 * 1024, 16 * 1024 + 1, 300 * 1024, 7)]
        for piece in pieces:
            server.write(piece)
        self.clock.advance(0)
        pump.flush()
        self.assertEqual(recorders["client"].received, b"".join(pieces))

    def test_data_before_a_close_is_delivered_before_the_connection_ends(self) -> None:
        client, server, recorders, pump = self.connect()
        body = os.urandom(200 * 1024)
        server.write(body)
        server.loseConnection()  # close_notify follows the body in the same read
        self.clock.advance(0)
        pump.flush()
        self.assertEqual(recorders["client"].received, body)
        self.assertIsNotNone(recorders["client"].lost)

    def wire_bytes_of(self, server, body: bytes) -> bytes:
        """The ciphertext ``server`` sends for ``body``, taken off the wire."""
        wire = bytearray()
        server.transport.write = wire.extend
        server.write(body)
        self.clock.advance(0)
        return bytes(wire)

    def test_data_before_a_corrupt_record_is_delivered_then_the_connection_fails(self) -> None:
        client, server, recorders, pump = self.connect()
        first = os.urandom(64 * 1024)
        server.write(first)
        self.clock.advance(0)
        pump.flush()
        wire = bytearray(self.wire_bytes_of(server, os.urandom(64 * 1024)))  # the next records, off the wire
        wire[-10] ^= 0xFF  # the last record fails its authentication tag
        client.dataReceived(bytes(wire))
        pump.flush()
        received = recorders["client"]
        self.assertTrue(received.received.startswith(first))
        self.assertLess(len(received.received), 2 * 64 * 1024)  # the corrupt record's bytes never arrive
        self.assertIsNotNone(received.lost)

    def test_openssl_reads_each_socket_read_where_it_lies(self) -> None:
        client, server, recorders, pump = self.connect()
        body = os.urandom(MiB + 999)
        wire = self.wire_bytes_of(server, body)
        client.dataReceived(wire)
        connection = client._tlsConnection
        # the receiving BIO reads the very bytes the socket gave, and holds none of them afterwards
        self.assertIs(client._received, wire)
        self.assertEqual(bulk._lib.BIO_get_mem_data(connection._into_ssl, bulk._PENDING), 0)
        self.assertEqual(recorders["client"].received, body)

    def test_each_socket_read_is_handed_on_in_one_string_when_reads_cut_records(self) -> None:
        # a 1 MiB read ends inside a record (16 KiB and its overhead): OpenSSL holds its start when the next
        # read comes, and that read's plaintext, one record more than it brought, still goes in one piece
        client, server, recorders, pump = self.connect()
        body = os.urandom(5 * MiB)
        wire = self.wire_bytes_of(server, body)
        pieces = recorders["client"].pieces
        for start in range(0, len(wire), bulk.SOCKET_READ):
            before = len(pieces)
            client.dataReceived(wire[start:start + bulk.SOCKET_READ])
            self.assertEqual(len(pieces) - before, 1)
        self.assertEqual(recorders["client"].received, body)
        # each string is the recorder's alone: none is kept (or freed) by the byte path
        for piece in pieces:
            self.assertIs(type(piece), bytes)
            self.assertEqual(sys.getrefcount(piece), 3)  # the list's, this loop's and the argument's

    def test_records_split_across_socket_reads_arrive_whole_and_in_order(self) -> None:
        # a record cut by a read stays in OpenSSL's own buffer while the BIO under it is replaced
        client, server, recorders, pump = self.connect()
        body = os.urandom(300 * 1024 + 17)
        wire = self.wire_bytes_of(server, body)
        cuts = sorted(random.Random(7).sample(range(1, len(wire)), 40) + [1, 2, 5, 16 * 1024 + 22])
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            if end > start:
                client.dataReceived(wire[start:end])
        self.assertEqual(recorders["client"].received, body)
        self.assertIsNone(recorders["client"].lost)

    def test_bytes_the_receiving_bio_still_holds_go_before_the_next_read(self) -> None:
        client, server, recorders, pump = self.connect()
        body = os.urandom(200 * 1024)
        wire = self.wire_bytes_of(server, body)
        half = len(wire) // 2
        client.receive_from(wire[:half])  # not read yet when the next bytes come
        client.dataReceived(wire[half:])
        self.assertEqual(recorders["client"].received, body)
        self.assertIsNone(recorders["client"].lost)

    def test_a_handshake_read_a_byte_at_a_time_completes(self) -> None:
        # each one-byte read gets a BIO of its own: OpenSSL keeps the partial handshake records meanwhile
        sides = {}

        def factory(side: str) -> Factory:
            built = Factory()
            built.buildProtocol = lambda addr: sides.setdefault(side, Recorder())
            return built

        server_factory = TLSMemoryBIOFactory(self.tls.sni, False, factory("server"), clock=self.clock)
        client_factory = TLSMemoryBIOFactory(optionsForClientTLS(HOST, trustRoot=self.tls.root), True,
                                             factory("client"), clock=self.clock)
        server_factory.protocol = client_factory.protocol = bulk.BulkTLSProtocol
        server, client = server_factory.buildProtocol(None), client_factory.buildProtocol(None)
        server_wire, client_wire = StringTransport(), StringTransport()
        server.makeConnection(server_wire)
        client.makeConnection(client_wire)
        for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
            sent, received = client_wire.value(), server_wire.value()
            client_wire.clear()
            server_wire.clear()
            for index in range(len(sent)):
                server.dataReceived(sent[index:index + 1])
            for index in range(len(received)):
                client.dataReceived(received[index:index + 1])
            self.clock.advance(0)
        body = os.urandom(70 * 1024)
        client.write(body)
        self.clock.advance(0)
        sent = client_wire.value()
        for index in range(0, len(sent), 7):
            server.dataReceived(sent[index:index + 7])
        self.assertEqual((sides["client"].handshakes, sides["server"].handshakes), (1, 1))
        self.assertEqual(sides["server"].received, body)

    def test_the_end_of_input_is_marked_in_the_bio_that_reads_now(self) -> None:
        # pyOpenSSL marks the end of input (Twisted's connectionLost) in the BIO it knows: the live one
        client, server, recorders, pump = self.connect()
        body = os.urandom(100 * 1024)
        client.dataReceived(self.wire_bytes_of(server, body))
        client._tlsConnection.bio_shutdown()
        client._flushReceiveBIO()
        self.assertTrue(client._lostTLSConnection)  # an end without close_notify: the TLS connection fails
        self.assertEqual(recorders["client"].received, body)

    def test_socket_reads_grow_after_the_handshake(self) -> None:
        client, server, recorders, pump = self.connect()
        self.assertEqual(client.transport.bufferSize, bulk.SOCKET_READ)

    def test_after_the_handshake_one_encryption_call_takes_a_whole_piece(self) -> None:
        client, server, recorders, pump = self.connect()
        calls = _CountingLib(bulk._lib)
        self.patch(bulk, "_lib", calls)
        body = os.urandom(2 * bulk.SEND_PIECE + 12345)
        server.write(body)
        self.clock.advance(0)
        pump.flush()
        self.assertEqual(recorders["client"].received, body)
        # with partial writes allowed it would be one call per 16 KiB record (129 here)
        self.assertEqual(calls.ssl_writes, 3)

    def test_a_large_write_made_before_the_handshake_arrives_whole_after_it(self) -> None:
        # refused before the handshake, the write is queued and made again, whole, once it is done
        client, server, recorders, pump = self.tls.connect(
            HOST, protocol_class=bulk.BulkTLSProtocol, greet=False)
        calls = _CountingLib(bulk._lib)
        self.patch(bulk, "_lib", calls)
        body = os.urandom(2 * bulk.SEND_PIECE + 777)
        client.write(body)
        self.assertEqual(client._appSendBuffer, [body])
        pump.flush()
        self.clock.advance(0)
        pump.flush()
        self.assertEqual(recorders["server"].received, body)
        self.assertEqual(calls.ssl_writes, 1 + 3)  # the refused one, then one per piece


class _CountingLib:
    """OpenSSL's binding, counting the calls to SSL_write."""

    def __init__(self, lib) -> None:
        self._lib, self.ssl_writes = lib, 0

    def SSL_write(self, *args):
        self.ssl_writes += 1
        return self._lib.SSL_write(*args)

    def __getattr__(self, name):
        return getattr(self._lib, name)


def test_sent_through_keeps_every_unsent_byte_in_order_without_copying() -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=40), st.data(), st.lists(st.binary(min_size=1, max_size=30), max_size=6))
    def check(buffer: bytes, draw, pending: list[bytes]) -> None:
        offset = draw.draw(st.integers(0, len(buffer)))
        queued = buffer[offset:] + b"".join(pending)
        sent = draw.draw(st.integers(0, len(queued)))
        originals = [buffer, *pending]
        left = list(pending)
        new_buffer, new_offset, taken = bulk.sent_through(buffer, offset, left, sent)
        assert new_buffer[new_offset:] + b"".join(left) == queued[sent:]
        assert taken == sum(map(len, pending)) - sum(map(len, left))
        assert new_buffer == b"" or any(new_buffer is piece for piece in originals)  # never a copy
        assert all(any(piece is original for original in pending) for piece in left)

    check()


class Writer(Protocol):
    """Writes ``pieces`` as a streaming producer's consumer would, then ends the connection its way."""

    def __init__(self, pieces: list[bytes], end: str) -> None:
        self.pieces, self.end = pieces, end
        self.pauses = self.resumes = 0

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        for piece in self.pieces:
            self.transport.write(piece)
        self.transport.unregisterProducer()
        getattr(self.transport, self.end)()

    def pauseProducing(self) -> None:
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.resumes += 1

    def stopProducing(self) -> None:
        pass


class SlowReader(Protocol):
    """Reads nothing for a while (the sender's socket buffers fill, its sends are partial), then all."""

    def __init__(self, done: defer.Deferred) -> None:
        self.done, self.pieces = done, []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        reactor.callLater(0.3, self.transport.resumeProducing)

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self.pieces))


class GatherWritesTests(TestCase):
    timeout = 30  # a lost byte count leaves the connection open: fail soon
    @defer.inlineCallbacks
    def check_delivery(self, end: str):
        rng = random.Random(7)
        pieces = [os.urandom(rng.choice((1, 7, 1500, 64 * 1024, 300 * 1024))) for _ in range(120)]
        writers: list[Writer] = []

        def build(_address) -> Writer:
            writers.append(Writer(pieces, end))
            return writers[-1]

        factory = Factory()
        factory.buildProtocol = build
        port = bulk.gather_writes(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.addCleanup(port.stopListening)
        done: defer.Deferred = defer.Deferred()
        yield ClientCreator(reactor, SlowReader, done).connectTCP("127.0.0.1", port.getHost().port)
        received = yield done
        self.assertIsInstance(writers[0].transport, bulk.GatherServer)
        self.assertEqual(received, b"".join(pieces))
        self.assertGreater(writers[0].pauses, 0)  # the queue went over the buffer size while the reader slept

    def test_queued_pieces_arrive_whole_and_in_order_before_the_close(self):
        return self.check_delivery("loseConnection")

    def test_queued_pieces_arrive_whole_and_in_order_before_a_half_close(self):
        return self.check_delivery("loseWriteConnection")


class _Sink(Protocol):
    pass


class _Rewriting(ProtocolWrapper):
    def write(self, data: bytes) -> None:
        super().write(data.upper())


def test_send_now_sends_only_where_nothing_is_queued_before_it_and_the_connection_stays_open() -> None:
    import socket

    from twisted.internet import tcp

    near, far = socket.socketpair()
    near.setblocking(False)
    connection = tcp.Connection(near, _Sink(), reactor)
    connection.connected = True
    try:
        data = memoryview(b"0123456789")
        assert bulk.send_now(object(), data) == 0  # not a TCP connection: the caller queues it all
        connection._tempDataBuffer, connection._tempDataLen = [b"queued"], 6
        assert bulk.send_now(connection, data) == 0  # would pass bytes queued before it
        connection._tempDataBuffer, connection._tempDataLen = [], 0
        connection.dataBuffer, connection.offset = b"queued", 2
        assert bulk.send_now(connection, data) == 0
        connection.dataBuffer, connection.offset = b"queued", 6
        assert bulk.send_now(connection, data) == 10
        assert far.recv(100) == b"0123456789"
        passing_on = ProtocolWrapper(WrappingFactory(Factory()), _Sink())
        passing_on.makeConnection(connection)
        assert bulk.send_now(passing_on, data) == 10  # a wrapper that only passes writes on: looked through
        assert far.recv(100) == b"0123456789"
        changing = _Rewriting(WrappingFactory(Factory()), _Sink())
        changing.makeConnection(connection)
        assert bulk.send_now(changing, data) == 0  # a wrapper with writes of its own: they go through it
        connection.disconnecting = True
        assert bulk.send_now(connection, data) == 0  # closing: Twisted sends what is queued, then closes
        connection.disconnecting = False
        connection._aborting = True  # as abortConnection() leaves it until connectionLost
        assert bulk.send_now(connection, data) == 0
        connection._aborting = False
        far.close()
        total = 0
        for _ in range(50):  # a closed peer: the send fails, and the queued write will meet that again
            total += bulk.send_now(connection, memoryview(b"x" * 65536))
        assert bulk.send_now(connection, data) == 0
    finally:
        near.close()
        far.close()


class DirectSendTests(TestCase):
    """TLS over real loopback sockets: ciphertext sent straight from OpenSSL's buffer, the rest queued."""

    timeout = 30

    @defer.inlineCallbacks
    def transfer(self, reader_sleeps: bool):
        tls_setup = MemoryTLS(self.addCleanup)
        rng = random.Random(11)
        pieces = [os.urandom(rng.choice((1, 7, 1500, 300 * 1024, 1024 * 1024, 3 * 1024 * 1024)))
                  for _ in range(24)]
        writers: list[Writer] = []
        direct: list[int] = []
        original = bulk.send_now

        def counting(transport, data):
            sent = original(transport, data)
            direct.append(sent)
            return sent

        self.patch(bulk, "send_now", counting)

        def build(_address) -> Writer:
            writers.append(Writer(pieces, "loseConnection"))
            return writers[-1]

        app = Factory()
        app.buildProtocol = build
        server_factory = TLSMemoryBIOFactory(tls_setup.sni, False, app)
        server_factory.protocol = bulk.BulkTLSProtocol
        port = bulk.gather_writes(reactor.listenTCP(0, server_factory, interface="127.0.0.1"))
        self.addCleanup(port.stopListening)
        done: defer.Deferred = defer.Deferred()
        client_app = ClientFactory()
        client_app.buildProtocol = lambda _address: (SlowReader(done) if reader_sleeps else Collector(done))
        options = optionsForClientTLS(HOST, trustRoot=tls_setup.root)
        client_factory = TLSMemoryBIOFactory(options, True, client_app)
        client_factory.protocol = bulk.BulkTLSProtocol
        reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        received = yield done
        self.assertEqual(len(received), sum(map(len, pieces)))
        self.assertEqual(received, b"".join(pieces))
        return writers[0], sum(direct)

    @defer.inlineCallbacks
    def test_a_reader_that_keeps_up_gets_ciphertext_sent_straight_from_the_buffer(self):
        _writer, direct = yield self.transfer(reader_sleeps=False)
        self.assertGreater(direct, 1024 * 1024)

    @defer.inlineCallbacks
    def test_a_reader_that_sleeps_gets_the_queued_rest_whole_and_in_order(self):
        writer, _direct = yield self.transfer(reader_sleeps=True)
        self.assertGreater(writer.pauses, 0)  # the socket filled: the rest was queued, the producer paused


class Collector(Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done, self.pieces = done, []

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self.pieces))
