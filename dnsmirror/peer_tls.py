"""TLS between peer nodes (``peers.tls``), keyed by the shared peer secret: no certificate to hand out.

Every node derives the same Ed25519 key from ``peers.secret_file`` (HKDF-SHA256) and the same
self-signed certificate for it (Ed25519 signatures are deterministic, and every field is fixed). Each
side of a peer connection presents that certificate and accepts only that certificate, so a connection
is made only between holders of the secret, as the signed requests already require; the traffic is
TLS 1.3 with ephemeral key exchange, so what one node sends another cannot be read off the node network,
nor later with the secret. There is no host name to check: the secret is the identity of the cluster,
and each request stays signed with it as well.

:func:`peer_identity` is pure (tests and a simulation can derive it); :class:`PeerTLS` makes the
pyOpenSSL contexts and the Twisted pieces: a listening factory wrapper and a client connection creator.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from dnsmirror import failures
from dnsmirror.tls import TLS13_SUITES

# a new derivation (another key from the same secret) would change this label
KEY_LABEL = b"dnsmirror peer TLS key v1"
SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dnsmirror peer nodes")])
# fixed, so that every node builds the same certificate; the secret, not a date, bounds its use
NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class PeerIdentity:
    """The key and certificate every holder of one peer secret derives."""

    key: ed25519.Ed25519PrivateKey
    certificate: x509.Certificate

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate, hex: the same on every node that holds the same secret."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()


def peer_identity(secret: bytes) -> PeerIdentity:
    """The peer TLS key and certificate derived from ``secret`` (the same bytes give the same identity)."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_LABEL).derive(secret)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, None)  # Ed25519 takes no separate hash
    )
    return PeerIdentity(key, certificate)


def _context(method: int, identity: PeerIdentity) -> SSL.Context:
    """TLS 1.3 only; presents the identity and accepts a peer only if it presents the same one."""
    context = SSL.Context(method)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    # the listener's order decides (a diagnosing curl prefers AES-256)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET
                        | SSL.OP_CIPHER_SERVER_PREFERENCE)
    # the HTTPS listener's order: AES-128-GCM first, TLS 1.3's cheapest suite on CPUs with AES instructions
    context.set_tls13_ciphersuites(TLS13_SUITES)
    context.use_certificate(identity.certificate)
    context.use_privatekey(identity.key)
    context.check_privatekey()
    # the one trusted certificate is the identity itself: a peer presenting anything else fails the handshake
    store = context.get_cert_store()
    if store is None:  # pyOpenSSL returns None only when OpenSSL has no store to give
        raise RuntimeError("OpenSSL gave no certificate store for the peer TLS context")
    store.add_cert(crypto.X509.from_cryptography(identity.certificate))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_connect_state()
        return connection


@implementer(IHandshakeListener)
class _HandshakeWatch(ProtocolWrapper):
    """Reports a connection to the peer listener that failed its TLS handshake (a node without
    ``peers.tls``, or of another secret), which would otherwise end without a word."""

    handshake_done = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.handshake_done and reason.check(SSL.Error) and self.transport is not None:
            peer = self.transport.getPeer()
            host = getattr(peer, "host", str(peer))
            failures.report(
                "peer", "tls",
                f"a connection from {host} failed the peer TLS handshake ({reason.getErrorMessage()}): "
                "peers.tls and peers.secret_file must be the same on every node",
                host=host)
        super().connectionLost(reason)


class PeerTLS:
    """The TLS of one node's peer listener and peer clients, from the shared peer secret."""

    def __init__(self, secret: bytes) -> None:
        self.identity = peer_identity(secret)
        self._server = _ServerCreator(_context(SSL.TLS_SERVER_METHOD, self.identity))
        #: for ``twisted.internet.endpoints.wrapClientTLS``
        self.client_creator = _ClientCreator(_context(SSL.TLS_CLIENT_METHOD, self.identity))

    def listening(self, factory):
        """``factory`` (the peer listener's HTTP site) behind TLS; failed handshakes are reported."""
        watched = WrappingFactory(factory)
        watched.protocol = _HandshakeWatch
        return TLSMemoryBIOFactory(self._server, False, watched)
