"""What tests of real upstream clients share: a test PKI whose CA signs local HTTPS servers, and a loopback
DNS responder the test controls (so names resolve through a configured resolver, as in production)."""

from __future__ import annotations

import datetime
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord
from twisted.internet import reactor, ssl
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from dnsmirror.config import HostPort

# --- a loopback DNS responder the tests control --------------------------------------------------------


class LocalDnsResponder(DatagramProtocol):
    """Authoritative answers from a dict: ``records[name] = [("A", "1.2.3.4"), ("CNAME", "x.test"), ...]``.

    Unknown names get NXDOMAIN; names in ``silent`` get no answer; names in ``servfail`` get SERVFAIL.
    ``queries`` records every (name, type) asked.
    """

    def __init__(self, records: dict[str, list[tuple[str, str]]], ttl: int = 60) -> None:
        self.records = records
        self.ttl = ttl
        self.silent: set[str] = set()
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def datagramReceived(self, data: bytes, addr) -> None:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        self.queries.append((name, qtype))
        if name in self.silent:
            return
        reply = request.reply()
        if name in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
        elif name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for kind, value in self.records[name]:
                if kind == "CNAME":
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(value), ttl=self.ttl))
                elif kind == qtype:
                    rdata = A(value) if kind == "A" else AAAA(value)
                    reply.add_answer(RR(name, getattr(QTYPE, kind), rdata=rdata, ttl=self.ttl))
        self.transport.write(reply.pack(), addr)


def start_dns(
    test: TestCase, records: dict[str, list[tuple[str, str]]], ttl: int = 60
) -> tuple[LocalDnsResponder, HostPort]:
    """Listen on a free loopback UDP port for the duration of ``test``."""
    responder = LocalDnsResponder(records, ttl)
    port = reactor.listenUDP(0, responder, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return responder, HostPort("127.0.0.1", port.getHost().port)


# --- a test PKI -----------------------------------------------------------------------------------------


class _Pki:
    def __init__(self, directory: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dnsmirror test public CA")])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.servers: dict[str, ssl.CertificateOptions] = {}

    def server_options(self, host: str) -> ssl.CertificateOptions:
        if host not in self.servers:
            now = datetime.datetime.now(datetime.UTC)
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(self.ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .sign(self.ca_key, hashes.SHA256())
            )
            pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            self.servers[host] = ssl.PrivateCertificate.loadPEM(pem).options()
        return self.servers[host]


@cache
def pki() -> _Pki:
    import atexit
    import shutil
    import tempfile

    # one CA per test process, removed when the process ends
    directory = Path(tempfile.mkdtemp(prefix="dnsmirror-upstream-pki-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return _Pki(directory)
