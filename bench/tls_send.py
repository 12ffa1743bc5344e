"""CPU per GiB of sending a TLS stream, with and without partial writes (issue 14).

A receiver process (Python's ``ssl``, core 0) reads ``--mib`` MiB over loopback TLS 1.3 (AES-128-GCM) and
drops them; this process (core 1) sends them with :meth:`dnsmirror.bulk.BulkTLSProtocol._write` itself, 1 MiB
per write as a fill's readers hand on a socket read, on a stand-in protocol whose transport is a TCP
connection over a blocking socket (so :func:`dnsmirror.bulk.send_now` sends every byte from OpenSSL's memory
BIO, as it does for a client that keeps up). Two ways:

- ``records``: the bulk path before 2026-12-03 (:func:`write_by_records`): partial writes allowed, as
  pyOpenSSL's contexts set them, so a loop of one ``SSL_write`` per 16 KiB record, the piece's ciphertext
  sent once;
- ``whole``: what dnsmirror does (its ``_write``, partial writes cleared as its ``makeConnection`` does): one
  ``SSL_write`` per :data:`SEND_PIECE`.

Reported: this thread's CPU time per GiB (user + system, so the kernel's ``send`` counts), each round and the
median, the ways alternating; the receiver counts every byte. The certificate is a throwaway, not verified:
loopback only.

    .venv/bin/python bench/tls_send.py --mib 1024 --rounds 10
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib
from twisted.internet import tcp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tls_receive import (  # noqa: E402
    SERVER_START,
    arguments,
    handshake_over_memory_bios,
    peer_on_core_0,
    print_medians,
    rotated,
)

from dnsmirror.bulk import SEND_PIECE, BulkTLSProtocol  # noqa: E402

MiB = 1024 * 1024
WAYS = ("records", "whole")

RECEIVER = SERVER_START + r"""
buffer = bytearray(1 << 20)
for _ in range(int(sys.argv[3])):
    connection, _ = listener.accept()
    with context.wrap_socket(connection, server_side=True) as tls:
        received = 0
        while size := tls.recv_into(buffer):
            received += size
    print(received, flush=True)
"""


class _Sender:
    """What :meth:`BulkTLSProtocol._write` uses of a protocol: its connection, its transport and its way of
    sending what OpenSSL wrote."""

    _lostTLSConnection = False
    _write = BulkTLSProtocol._write
    _write_failed = BulkTLSProtocol._write_failed
    _flushSendBIO = BulkTLSProtocol._flushSendBIO

    def __init__(self, connection: SSL.Connection, sock: socket.socket) -> None:
        self._tlsConnection = connection
        self.transport = tcp.Connection(sock, None)
        self.transport.connected = True
        sock.setblocking(True)  # the transport made it non-blocking


def write_by_records(sender: _Sender, data: bytes) -> None:
    """``_write`` as it was before one ``SSL_write`` took a whole piece: the baseline of ``records``."""
    ssl, size, sent = sender._tlsConnection._ssl, len(data), 0
    with _ffi.from_buffer(data) as plaintext:
        while sent < size:
            end = min(size, sent + SEND_PIECE)
            while sent < end:
                result = _lib.SSL_write(ssl, plaintext + sent, end - sent)
                if result <= 0:
                    raise RuntimeError(f"SSL_write returned {result}")
                sent += result
            sender._flushSendBIO()


def send(port: int, way: str, total: int) -> float:
    """Sends ``total`` bytes ``way``; returns this thread's CPU-seconds."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    piece = os.urandom(SEND_PIECE)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.settimeout(None)  # OpenSSL takes a socket with a timeout for a non-blocking one
        connection = SSL.Connection(context, None)
        handshake_over_memory_bios(connection, sock)
        if way == "whole":
            _lib.SSL_clear_mode(connection._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        sender = _Sender(connection, sock)
        write = sender._write if way == "whole" else lambda data: write_by_records(sender, data)
        started = time.thread_time()
        for _ in range(total // SEND_PIECE):
            write(piece)
        spent = time.thread_time() - started
        connection.shutdown()
        sender._flushSendBIO()
        # closed with the session tickets unread, the socket would be reset and the stream's end lost
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(64 * 1024):
            pass
    return spent


def main() -> int:
    args = arguments(__doc__)
    total = args.mib * MiB // SEND_PIECE * SEND_PIECE
    order = [way for round_ in range(args.rounds) for way in rotated(WAYS, round_)]  # each way first in turn
    spent: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="dnsmirror-tls-send-") as directory, \
            peer_on_core_0(RECEIVER, Path(directory), len(order)) as (receiver, port):
        for way in order:
            spent[way].append(send(port, way, total) / (total / (1024 * MiB)))
            received = int(receiver.stdout.readline())  # type: ignore[union-attr]
            if received != total:
                raise RuntimeError(f"{way}: the receiver got {received} of {total} bytes")
    print_medians(spent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
