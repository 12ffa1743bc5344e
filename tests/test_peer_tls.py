"""TLS between peer nodes (``peers.tls``): the identity derived from the shared secret, the handshake
between holders of one secret (and its refusal otherwise), and a blob fetched by the real peer client
from the real peer listener over TLS on loopback."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509 import BasicConstraints, ExtendedKeyUsage
from cryptography.x509.oid import ExtendedKeyUsageOID
from fakes import task_until
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web import server

from dnsmirror import bulk, failures
from dnsmirror.config import HostPort
from dnsmirror.peer_tls import PeerTLS, peer_identity
from dnsmirror.peers import Holders, PeerClient, PeerRequest, PeerResource, PeerSet, PeerStats
from dnsmirror.store import Store
from dnsmirror.streaming import DiskIO

SECRET = b"a-long-enough-cluster-secret"
OTHER_SECRET = b"another-cluster-secret-of-32-b"


def test_every_holder_of_a_secret_derives_the_same_identity_and_no_one_else_does() -> None:
    one, again, other = peer_identity(SECRET), peer_identity(SECRET), peer_identity(OTHER_SECRET)
    assert one.fingerprint == again.fingerprint
    assert other.fingerprint != one.fingerprint
    assert other.certificate.public_key() != one.certificate.public_key()
    assert isinstance(one.key, ed25519.Ed25519PrivateKey)
    assert one.certificate.public_key() == one.key.public_key()
    # an end-entity certificate for both ends of a connection, never a CA
    assert one.certificate.extensions.get_extension_for_class(BasicConstraints).value.ca is False
    usages = set(one.certificate.extensions.get_extension_for_class(ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def _pump(this: SSL.Connection, that: SSL.Connection) -> None:
    """Moves what ``this`` has written to ``that``."""
    try:
        that.bio_write(this.bio_read(1 << 16))
    except SSL.WantReadError:
        pass


def handshake(server: SSL.Context, client: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    """A handshake between two in-memory connections, then one message each way; raises ``SSL.Error``."""
    accepting, connecting = SSL.Connection(server, None), SSL.Connection(client, None)
    accepting.set_accept_state()
    connecting.set_connect_state()
    for _ in range(10):
        for this, that in ((connecting, accepting), (accepting, connecting)):
            try:
                this.do_handshake()
            except SSL.WantReadError:
                pass
            _pump(this, that)
    connecting.sendall(b"to the listener")
    _pump(connecting, accepting)
    assert accepting.recv(100) == b"to the listener"
    accepting.sendall(b"to the client")
    _pump(accepting, connecting)
    assert connecting.recv(100) == b"to the client"
    return accepting, connecting


def contexts(secret: bytes) -> tuple[SSL.Context, SSL.Context]:
    tls = PeerTLS(secret)
    return tls._server.context, tls.client_creator.context


def test_nodes_of_one_secret_talk_tls_1_3_with_each_checking_the_other() -> None:
    server, _ = contexts(SECRET)
    _, client = contexts(SECRET)  # another node: its own contexts, the same secret
    accepting, connecting = handshake(server, client)
    assert connecting.get_protocol_version_name() == "TLSv1.3"
    assert connecting.get_cipher_name() == "TLS_AES_128_GCM_SHA256"
    # the listener's order decides, also for a client that prefers another suite (a diagnosing curl)
    prefers_256 = PeerTLS(SECRET).client_creator.context
    prefers_256.set_tls13_ciphersuites(b"TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256")
    assert handshake(server, prefers_256)[1].get_cipher_name() == "TLS_AES_128_GCM_SHA256"
    # each side saw the other's certificate: the listener knows its client holds the secret too
    assert accepting.get_peer_certificate() is not None and connecting.get_peer_certificate() is not None


def test_a_node_of_another_secret_is_refused_on_either_side() -> None:
    server, client = contexts(SECRET)
    other_server, other_client = contexts(OTHER_SECRET)
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        handshake(server, other_client)  # the listener rejects the client's certificate
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        handshake(other_server, client)  # the client rejects the listener's


def test_a_client_without_the_certificate_or_below_tls_1_3_is_refused() -> None:
    server, _ = contexts(SECRET)
    anonymous = SSL.Context(SSL.TLS_CLIENT_METHOD)  # trusts anything, presents nothing
    with pytest.raises(SSL.Error):
        handshake(server, anonymous)
    old = SSL.Context(SSL.TLS_CLIENT_METHOD)
    old.set_max_proto_version(SSL.TLS1_2_VERSION)
    with pytest.raises(SSL.Error):
        handshake(server, old)


class PeerTransferOverTLS(TestCase):
    """The peer listener behind ``PeerTLS.listening`` and the peer client with its creator, on loopback."""

    timeout = 30

    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="dnsmirror-peer-tls-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        self.store = Store.open(tmp / "cache", 64 * 2**20)
        self.addCleanup(self.store.close)
        self.disk = DiskIO(reactor, self.store, threads=2)
        self.disk.start()
        self.addCleanup(self.disk.stop)
        self.data = os.urandom(3 * 2**20 + 12345)
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        with self.store.writer(self.digest) as writer:
            writer.write(self.data)
            writer.commit()
        self.listener_stats = PeerStats()
        resource = PeerResource(reactor, self.disk, SECRET, Holders(), self.listener_stats, 0)
        site = server.Site(resource, requestFactory=PeerRequest)
        site.noisy = False
        listening = PeerTLS(SECRET).listening(site)
        # the bulk byte path, as dnsmirror.app installs it for every TLS connection (here the listener's only:
        # installing it for the process would change other tests' connections)
        listening.protocol = bulk.BulkTLSProtocol
        port = reactor.listenTCP(0, listening, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.peer = HostPort("127.0.0.1", port.getHost().port)

    def client(self, tls) -> PeerClient:
        peers = PeerSet(reactor, [self.peer], None, self.peer.port, is_local=lambda host: False)
        client = PeerClient(reactor, peers, Holders(), SECRET, 1, 5.0, 10.0, PeerStats(), tls=tls)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_a_blob_comes_whole_from_a_peer_over_tls(self):
        client = self.client(PeerTLS(SECRET).client_creator)
        found = yield defer.ensureDeferred(client.fetch(self.digest))
        self.assertIsNotNone(found)
        peer, response = found
        self.assertEqual(peer, self.peer)
        body = yield response.read_body(len(self.data) + 1)
        self.assertEqual(hashlib.sha256(body).hexdigest(), self.digest.removeprefix("sha256:"))
        self.assertEqual(self.listener_stats.served, 1)

    @defer.inlineCallbacks
    def test_a_plain_client_and_a_client_of_another_secret_get_nothing_and_are_reported(self):
        tls_failures = failures.failures.count("peer", "tls")
        # a plain client's request is not TLS: the listener drops the connection and says why
        client = self.client(None)
        found = yield defer.ensureDeferred(client.fetch(self.digest))
        self.assertIsNone(found)
        self.assertEqual(client.stats.failures, 1)
        yield task_until(lambda: failures.failures.count("peer", "tls") == tls_failures + 1)
        # a node of another secret fails the handshake: its side and the listener's both report it
        client = self.client(PeerTLS(OTHER_SECRET).client_creator)
        found = yield defer.ensureDeferred(client.fetch(self.digest))
        self.assertIsNone(found)
        self.assertEqual(client.stats.failures, 1)
        yield task_until(lambda: failures.failures.count("peer", "tls") == tls_failures + 3)
        self.assertEqual(self.listener_stats.served, 0)
