"""CPU per GiB of receiving TLS, three ways of feeding OpenSSL (issue 14, "what is left to try").

A sender process (Python's ``ssl``, core 0) streams ``--mib`` MiB over loopback TLS 1.3 (AES-128-GCM) to this
process (core 1), which decrypts it through pyOpenSSL's binding, as :mod:`dnsmirror.bulk` does:

- ``memory-bio``: what dnsmirror does: one ``recv`` of up to 1 MiB, a read-only memory BIO over it, every
  record decrypted into one buffer, the plaintext copied into a string (the slice the layers above get);
- ``socket-bio``: OpenSSL reads the socket itself (``SSL_set_fd``), the same buffer and slice: the copy into
  the memory BIO and the 1 MiB string per read are gone, but the binding offers no read-ahead, so OpenSSL
  reads each record with two ``recv`` calls (its header, then the rest);
- ``no-slice``: ``memory-bio`` without the plaintext's copy into a string (what writing it into a fresh
  string in place would save).

Reported: this thread's CPU time per GiB (user + system, so the kernel's ``recv`` counts), each round and the
median, the ways alternating. The certificate is a throwaway, not verified: loopback only.

    .venv/bin/python bench/tls_receive.py --mib 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

MiB = 1024 * 1024
WAYS = ("memory-bio", "socket-bio", "no-slice")
SOCKET_READ = MiB
PLAIN_BUFFER = SOCKET_READ + 64 * 1024
RECORD_ROOM = 32 * 1024

SENDER = r"""
import socket, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(60)
print(listener.getsockname()[1], flush=True)
total, block = int(sys.argv[3]), bytes(1 << 20)
for _ in range(int(sys.argv[4])):
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


def receive(port: int, way: str) -> tuple[int, float]:
    """A whole stream received ``way``; returns (plaintext bytes, this thread's CPU-seconds)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    plain = _ffi.new("char[]", PLAIN_BUFFER)
    pending = _ffi.new("char **")
    slicing = way != "no-slice"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.settimeout(None)  # OpenSSL takes a socket with a timeout for a non-blocking one
        connection = SSL.Connection(context, sock)
        connection.set_connect_state()
        connection.do_handshake()
        ssl, received = connection._ssl, 0
        started = time.thread_time()
        if way == "socket-bio":
            while (result := _lib.SSL_read(ssl, plain, SOCKET_READ)) > 0:
                received += result
                _ffi.buffer(plain, result)[:]
        else:
            sending_bio, receiving_bio, kept = _lib.BIO_new(_lib.BIO_s_mem()), None, b""
            while data := sock.recv(SOCKET_READ):
                unread = _lib.BIO_get_mem_data(receiving_bio, pending) if receiving_bio is not None else 0
                if unread > 0:
                    data = _ffi.buffer(pending[0], unread)[:] + data
                receiving_bio = _lib.BIO_new_mem_buf(_ffi.from_buffer(data), len(data))
                _lib.BIO_set_mem_eof_return(receiving_bio, -1)
                _lib.SSL_set_bio(ssl, receiving_bio, sending_bio)
                kept = data  # the BIO reads these bytes where they lie
                filled = 0
                while (result := _lib.SSL_read(ssl, plain + filled, PLAIN_BUFFER - filled)) > 0:
                    filled += result
                    if PLAIN_BUFFER - filled < RECORD_ROOM:
                        received += filled
                        if slicing:
                            _ffi.buffer(plain, filled)[:]
                        filled = 0
                received += filled
                if slicing and filled:
                    _ffi.buffer(plain, filled)[:]
            del kept
        return received, time.thread_time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB per connection (default 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="connections per way (default 5)")
    args = parser.parse_args()
    order = [way for _ in range(args.rounds) for way in WAYS]
    spent: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="dnsmirror-tls-receive-") as directory:
        cert_path, key_path = throwaway_certificate(Path(directory))
        sender = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-c", SENDER, str(cert_path), str(key_path),
             str(args.mib * MiB), str(len(order))], stdout=subprocess.PIPE, text=True)
        try:
            port = int(sender.stdout.readline())  # type: ignore[union-attr]
            os.sched_setaffinity(0, {1})
            for way in order:
                received, cpu = receive(port, way)
                if received != args.mib * MiB:
                    raise RuntimeError(f"{way}: {received} of {args.mib * MiB} bytes")
                spent[way].append(cpu / (received / (1024 * MiB)))
            sender.wait(timeout=60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    print(f"{'way':12s} {'median CPU-s per GiB':>22s}  rounds")
    for way, values in spent.items():
        print(f"{way:12s} {statistics.median(values):22.3f}  {', '.join(f'{v:.3f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
