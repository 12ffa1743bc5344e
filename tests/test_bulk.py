"""The bulk TLS byte path: the plaintext of one read is delivered in one piece, in order, before any
shutdown or error; large writes leave as the same bytes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from harness.pki import mirror_ca
from twisted.internet import protocol, task
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from dnsmirror import bulk, config, tls
from dnsmirror.patterns import HostMatcher

HOST = "quay.io"
PATTERNS = config.load().capture
MiB = 1024 * 1024


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.lost = None

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason) -> None:
        self.lost = reason


class BulkTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="dnsmirror-bulk-"))
        self.addCleanup(shutil.rmtree, directory, True)
        authority = mirror_ca(directory, PATTERNS)
        self.root = Certificate.loadPEM((directory / "root.crt").read_bytes())
        self.sni = tls.SniServer(HostMatcher(PATTERNS), tls.prepare_signing(authority))
        self.clock = task.Clock()

    def connect(self, bulk_protocol=True):
        recorders: dict[str, Recorder] = {}

        def recording(side: str) -> protocol.Factory:
            factory = protocol.Factory()
            factory.buildProtocol = lambda addr: recorders.setdefault(side, Recorder())
            return factory

        server_factory = TLSMemoryBIOFactory(self.sni, False, recording("server"), clock=self.clock)
        options = optionsForClientTLS(HOST, trustRoot=self.root)
        client_factory = TLSMemoryBIOFactory(options, True, recording("client"), clock=self.clock)
        if bulk_protocol:
            server_factory.protocol = client_factory.protocol = bulk.BulkTLSProtocol
        client, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None),
            greet=False)
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
