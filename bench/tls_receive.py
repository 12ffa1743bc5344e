"""CPU per GiB of receiving TLS, three ways of feeding OpenSSL (issue 14, "what is left to try").

A sender process (Python's ``ssl``, core 0) streams ``--mib`` MiB over loopback TLS 1.3 (AES-128-GCM) to this
process (core 1), which decrypts it through pyOpenSSL's binding with :mod:`dnsmirror.bulk`'s sizes, outside
Twisted, so that the ways differ only in how OpenSSL is fed:

- ``memory-bio``: what dnsmirror does: one ``recv`` of up to ``SOCKET_READ``, made the connection's receiving
  BIO by :meth:`dnsmirror.bulk.BulkTLSProtocol.receive_from` itself, every record decrypted into one buffer
  as its ``_flushReceiveBIO`` does, the plaintext copied into a string (the slice the layers above get);
- ``socket-bio``: OpenSSL reads the socket itself (``SSL_set_fd``), the same buffer and slice: the copy into
  the memory BIO and the 1 MiB string per read are gone, but the binding offers no read-ahead, so OpenSSL
  reads each record with two system calls (its header, then the rest);
- ``no-slice``: ``memory-bio`` without the plaintext's copy into a string (what writing it into a fresh
  string in place would save).

Reported: this thread's CPU time per GiB (user + system, so the kernel's ``recv`` counts), each round and the
median, the ways alternating, each first in turn; the allocator keeps freed memory as dnsmirror's does. The
certificate is a throwaway, not verified: loopback only.

    .venv/bin/python bench/tls_receive.py --mib 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnsmirror import allocator  # noqa: E402
from dnsmirror.bulk import PLAIN_BUFFER, RECORD_READ, SOCKET_READ, BulkTLSProtocol  # noqa: E402

MiB = 1024 * 1024
WAYS = ("memory-bio", "socket-bio", "no-slice")

# the other end's start: a TLS server on loopback that prints its port (argv: certificate, key, connections)
SERVER_START = r"""
import socket, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(60)
print(listener.getsockname()[1], flush=True)
"""

SENDER = SERVER_START + r"""
connections, total, block = int(sys.argv[3]), int(sys.argv[4]), bytes(1 << 20)
for _ in range(connections):
    connection, _ = listener.accept()
    with context.wrap_socket(connection, server_side=True) as tls:
        left = total
        while left:
            size = min(left, len(block))
            tls.sendall(block[:size])
            left -= size
"""


def throwaway_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls-receive-bench")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Receiver:
    """What :meth:`BulkTLSProtocol.receive_from` uses of a protocol: its connection (and where it keeps the
    bytes the receiving BIO reads)."""

    def __init__(self, connection: SSL.Connection) -> None:
        self._tlsConnection = connection


def handshake_over_memory_bios(connection: SSL.Connection, sock: socket.socket) -> None:
    """The client handshake of a connection made without a socket (memory BIOs), carried over ``sock``."""
    connection.set_connect_state()
    while True:
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            send_pending(connection, sock)
            data = sock.recv(64 * 1024)
            if not data:
                raise RuntimeError("the sender closed the connection during the handshake") from None
            connection.bio_write(data)
        else:
            send_pending(connection, sock)
            return


def send_pending(connection: SSL.Connection, sock: socket.socket) -> None:
    while True:
        try:
            sock.sendall(connection.bio_read(64 * 1024))
        except SSL.WantReadError:
            return


def receive(port: int, way: str) -> tuple[int, float]:
    """A whole stream received ``way``; returns (plaintext bytes, this thread's CPU-seconds)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    plain = _ffi.new("char[]", PLAIN_BUFFER)
    slicing = way != "no-slice"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.settimeout(None)  # OpenSSL takes a socket with a timeout for a non-blocking one
        received = 0
        if way == "socket-bio":
            connection = SSL.Connection(context, sock)
            connection.set_connect_state()
            connection.do_handshake()
            ssl, started = connection._ssl, time.thread_time()
            while (result := _lib.SSL_read(ssl, plain, SOCKET_READ)) > 0:
                received += result
                _ffi.buffer(plain, result)[:]
            return received, time.thread_time() - started
        connection = SSL.Connection(context, None)
        handshake_over_memory_bios(connection, sock)
        receiver, ssl, started = _Receiver(connection), connection._ssl, time.thread_time()
        while data := sock.recv(SOCKET_READ):
            BulkTLSProtocol.receive_from(receiver, data)  # type: ignore[arg-type]
            filled = 0
            while (result := _lib.SSL_read(ssl, plain + filled, PLAIN_BUFFER - filled)) > 0:
                filled += result
                if PLAIN_BUFFER - filled < RECORD_READ:
                    received += filled
                    if slicing:
                        _ffi.buffer(plain, filled)[:]
                    filled = 0
            received += filled
            if slicing and filled:
                _ffi.buffer(plain, filled)[:]
        return received, time.thread_time() - started


@contextlib.contextmanager
def peer_on_core_0(script: str, directory: Path, connections: int,
                   *extra: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """Runs ``script`` (the other end, with a throwaway certificate made in ``directory``, for ``connections``
    connections, then ``extra`` arguments) on core 0 and moves this process to core 1; yields the process and
    the port it listens on, and stops it when done."""
    cert_path, key_path = throwaway_certificate(directory)
    peer = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-c", script, str(cert_path), str(key_path), str(connections),
         *extra],
        stdout=subprocess.PIPE, text=True)
    try:
        port = int(peer.stdout.readline())  # type: ignore[union-attr]
        os.sched_setaffinity(0, {1})
        yield peer, port
        peer.wait(timeout=60)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()


def arguments(description: str | None) -> argparse.Namespace:
    """``--mib`` per connection and ``--rounds`` per way."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB per connection (default 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="connections per way (default 5)")
    return parser.parse_args()


def rotated(ways: tuple[str, ...], by: int) -> tuple[str, ...]:
    """``ways`` starting at its ``by``-th (modulo its length): a round's first way may run in a phase of
    its own."""
    by %= len(ways)
    return ways[by:] + ways[:by]


def print_medians(spent: dict[str, list[float]]) -> None:
    print(f"{'way':12s} {'median CPU-s per GiB':>22s}  rounds")
    for way, values in spent.items():
        print(f"{way:12s} {statistics.median(values):22.3f}  {', '.join(f'{v:.3f}' for v in values)}")


def main() -> int:
    args = arguments(__doc__)
    allocator.keep_freed_memory()  # as dnsmirror's process does: large strings come from the heap
    order = [way for round_ in range(args.rounds) for way in rotated(WAYS, round_)]  # each way first in turn
    spent: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="dnsmirror-tls-receive-") as directory, \
            peer_on_core_0(SENDER, Path(directory), len(order), str(args.mib * MiB)) as (_, port):
        for way in order:
            received, cpu = receive(port, way)
            if received != args.mib * MiB:
                raise RuntimeError(f"{way}: {received} of {args.mib * MiB} bytes")
            spent[way].append(cpu / (received / (1024 * MiB)))
    print_medians(spent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
