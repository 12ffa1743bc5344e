"""The bulk TLS byte path: the plaintext of one read is delivered in one piece, in order, before any
shutdown or error; large writes leave as the same bytes."""

from __future__ import annotations

import os

from tls_support import MemoryTLS
from twisted.trial.unittest import SynchronousTestCase

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

    def test_data_before_a_corrupt_record_is_delivered_then_the_connection_fails(self) -> None:
        client, server, recorders, pump = self.connect()
        first = os.urandom(64 * 1024)
        server.write(first)
        self.clock.advance(0)
        pump.flush()
        wire = bytearray()
        server.transport.write = wire.extend  # take the next records off the wire
        server.write(os.urandom(64 * 1024))
        self.clock.advance(0)
        wire[-10] ^= 0xFF  # the last record fails its authentication tag
        client.dataReceived(bytes(wire))
        pump.flush()
        received = recorders["client"]
        self.assertTrue(received.received.startswith(first))
        self.assertLess(len(received.received), 2 * 64 * 1024)  # the corrupt record's bytes never arrive
        self.assertIsNotNone(received.lost)

    def test_socket_reads_grow_after_the_handshake(self) -> None:
        client, server, recorders, pump = self.connect()
        self.assertEqual(client.transport.bufferSize, bulk.SOCKET_READ)
