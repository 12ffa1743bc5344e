"""What tests of real upstream clients share: a test PKI whose CA signs local HTTPS servers, and a loopback
DNS responder the test controls (so names resolve through a configured resolver, as in production)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord
from harness.pki import create_ca
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
    """The test public CA (``harness.pki``) and, per host name, a server certificate it issued."""

    def __init__(self, directory: Path) -> None:
        self.ca = create_ca(directory, "dnsmirror test public CA")
        self.ca_path = self.ca.cert_path
        self.directory = directory
        self.servers: dict[str, ssl.CertificateOptions] = {}

    def server_options(self, host: str) -> ssl.CertificateOptions:
        if host not in self.servers:
            server = self.ca.issue_server([host], self.directory / "servers", name=host)
            pem = server.cert_path.read_bytes() + server.key_path.read_bytes()
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
