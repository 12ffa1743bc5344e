"""Per-SNI leaves: minting, the LRU of host contexts, renewal, refusals, CA rotation, and the pin test that
Twisted + pyOpenSSL switch a connection's context from the server-name callback."""

from __future__ import annotations

import datetime
import os
from importlib import metadata

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from harness.pki import mirror_ca
from OpenSSL import SSL
from tls_support import MemoryTLS
from twisted.trial.unittest import SynchronousTestCase

from dnsmirror import ca, config, tls
from dnsmirror.patterns import HostMatcher

ECR_HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
PATTERNS = config.load().capture


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = now if now is not None else datetime.datetime.now(datetime.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def authority(tmp_path_factory) -> ca.CertificateAuthority:
    return mirror_ca(tmp_path_factory.mktemp("ca"), PATTERNS)


def sni_server(authority, clock=None, cache_size=1024, skip=()) -> tls.SniServer:
    return tls.SniServer(HostMatcher(PATTERNS, skip), tls.prepare_signing(authority), cache_size=cache_size,
                         clock=clock or Clock())


def leaf_of(context: SSL.Context) -> x509.Certificate:
    connection = SSL.Connection(context, None)
    return connection.get_certificate(as_cryptography=True)


# --- the leaf ------------------------------------------------------------------------------------------


def test_leaf_names_exactly_the_host(authority):
    now = Clock().now
    leaf = tls.mint_leaf(authority, ca.new_key(), ECR_HOST, tls.MAX_LEAF_VALIDITY, now)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [ECR_HOST]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == ECR_HOST
    assert leaf.issuer == authority.cert.subject
    assert (
        isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        and leaf.public_key().curve.name == "secp256r1"
    )
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf.verify_directly_issued_by(authority.cert)


def test_leaf_validity_is_at_most_seven_days(authority):
    now = Clock().now
    leaf = tls.mint_leaf(authority, ca.new_key(), ECR_HOST, 30 * 86400, now)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= datetime.timedelta(days=7)
    assert leaf.not_valid_before_utc.timestamp() < now < leaf.not_valid_after_utc.timestamp()


def test_leaf_never_outlives_its_ca(authority):
    late = authority.not_after.timestamp() - 3600
    leaf = tls.mint_leaf(authority, ca.new_key(), ECR_HOST, tls.MAX_LEAF_VALIDITY, late)
    assert leaf.not_valid_after_utc == authority.not_after


def test_long_host_has_no_cn_and_a_critical_san(authority):
    host = ("a" * 60) + ".dkr.ecr.us-east-1.amazonaws.com"
    leaf = tls.mint_leaf(authority, ca.new_key(), host, 3600, Clock().now)
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


# --- the host contexts ----------------------------------------------------------------------------------


def test_captured_names_get_their_own_cached_context(authority):
    server = sni_server(authority)
    first = server.context_for(ECR_HOST)
    assert first is not None
    assert server.context_for(ECR_HOST.upper() + ".") is first
    other = server.context_for("docker.io")
    assert other is not first
    assert leaf_of(other).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["docker.io"]
    assert (server.stats.leaves_minted, server.stats.leaf_cache_hits) == (2, 1)
    assert server.stats.mint_seconds_max > 0


def test_all_leaves_share_the_pregenerated_key(authority):
    server = sni_server(authority)
    keys = {
        leaf_of(server.context_for(h)).public_key().public_numbers()
        for h in ("docker.io", "quay.io", ECR_HOST)
    }
    assert keys == {server.signing.leaf_key.public_key().public_numbers()}


@pytest.mark.parametrize(
    "name", ["example.com", "amazonaws.com", "10.0.0.1", "", "bad..name", "quay.io.evil.com"]
)
def test_names_not_captured_get_no_context(authority, name):
    server = sni_server(authority)
    assert server.context_for(name) is None
    assert server.stats.leaves_minted == 0


def test_skip_wins_over_capture(authority):
    server = sni_server(authority, skip=["ghcr.io"])
    assert server.context_for("ghcr.io") is None and server.context_for("quay.io") is not None


def test_cache_is_a_bounded_lru(authority):
    server = sni_server(authority, cache_size=2)
    server.context_for("docker.io")
    server.context_for("quay.io")
    server.context_for("docker.io")  # now most recent
    server.context_for("ghcr.io")
    assert server.cached_hosts == ["docker.io", "ghcr.io"]


def test_leaf_is_renewed_at_half_its_life(authority):
    clock = Clock()
    server = sni_server(authority, clock=clock)
    first = server.context_for("docker.io")
    lifetime = leaf_of(first).not_valid_after_utc.timestamp() - clock.now
    clock.now += lifetime / 2 - 60
    assert server.context_for("docker.io") is first
    clock.now += 120
    renewed = server.context_for("docker.io")
    assert renewed is not first
    assert leaf_of(renewed).not_valid_after_utc > leaf_of(first).not_valid_after_utc


def test_replacing_the_ca_drops_old_leaves(authority, tmp_path):
    server = sni_server(authority)
    old = server.context_for("docker.io")
    new_authority = mirror_ca(tmp_path, PATTERNS)
    server.replace_signing(tls.prepare_signing(new_authority))
    assert server.cached_hosts == []
    fresh = server.context_for("docker.io")
    assert fresh is not old and leaf_of(fresh).issuer == new_authority.cert.subject


# --- handshakes in memory: pyOpenSSL alone ---------------------------------------------------------------


def memory_handshake(server: tls.SniServer, server_name: bytes | None, client_context=None):
    """Drive a client Connection against ``server.serverConnectionForTLS`` through memory BIOs; returns the
    client Connection, or raises the client's SSL.Error (what the peer sees of a refusal)."""
    server_side = server.serverConnectionForTLS(None)
    server_side.set_accept_state()
    client_context = client_context or SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_side = SSL.Connection(client_context, None)
    if server_name is not None:
        client_side.set_tlsext_host_name(server_name)
    client_side.set_alpn_protos([b"h2", b"http/1.1"])
    client_side.set_connect_state()
    server_failed = False
    for _ in range(10):
        try:
            client_side.do_handshake()
            return client_side
        except SSL.WantReadError:
            pass
        server_side.bio_write(client_side.bio_read(65536))
        if not server_failed:
            try:
                server_side.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                server_failed = True  # the alert it queued still goes to the client
        try:
            client_side.bio_write(server_side.bio_read(65536))
        except SSL.WantReadError:
            pass
    raise AssertionError("handshake did not finish")


def test_memory_handshake_gets_the_leaf_and_http11(authority):
    server = sni_server(authority)
    client = memory_handshake(server, b"quay.io")
    assert client.get_peer_certificate(as_cryptography=True).subject.rfc4514_string() == "CN=quay.io"
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert [c.subject for c in chain] == [chain[0].subject, authority.cert.subject]
    assert client.get_alpn_proto_negotiated() == b"http/1.1"
    assert client.get_protocol_version_name() == "TLSv1.3"


@pytest.mark.parametrize(
    "server_name, counter", [(None, "refused_no_sni"), (b"example.com", "refused_not_captured")]
)
def test_no_sni_and_unknown_names_end_in_an_alert_and_are_counted(authority, server_name, counter):
    server = sni_server(authority)
    with pytest.raises(SSL.Error, match="handshake failure"):
        memory_handshake(server, server_name)
    assert getattr(server.stats, counter) == 1
    assert server.stats.leaves_minted == 0 and server.cached_hosts == []


def test_tls11_is_refused(authority):
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_max_proto_version(SSL.TLS1_1_VERSION)
    client_context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    with pytest.raises(SSL.Error, match="protocol version|unsupported protocol|no protocols available"):
        memory_handshake(sni_server(authority), b"quay.io", client_context)


# --- the pin test: Twisted's TLS protocol over the SNI connection creator
# ------------------------------------


class TwistedSniPinTests(SynchronousTestCase):
    """Twisted and pyOpenSSL versions in use switch contexts from the SNI callback correctly (known traps:
    a Context cannot be changed once a Connection was made from it; ALPN and verification live per
    context)."""

    def setUp(self) -> None:
        self.tls = MemoryTLS(self.addCleanup)
        self.sni, self.clock = self.tls.sni, self.tls.clock

    def connect(self, server_name: str):
        """Connect over an in-memory transport; returns the client and server Recorders and a pump."""
        client, server, recorders, pump = self.tls.connect(server_name, alpn=[b"http/1.1"])
        pump.flush()
        return client, server, recorders, pump

    def send(self, transport, data: bytes, pump) -> None:
        transport.write(data)
        self.clock.advance(0)  # small writes are aggregated until the next reactor turn
        pump.flush()

    def test_versions_in_the_tested_range(self) -> None:
        twisted_version = tuple(int(p) for p in metadata.version("twisted").split(".")[:2])
        pyopenssl_version = tuple(int(p) for p in metadata.version("pyopenssl").split(".")[:2])
        self.assertGreaterEqual(twisted_version, (24, 7))
        self.assertGreaterEqual(pyopenssl_version, (24, 2))

    def test_each_name_gets_its_own_verified_leaf_over_one_factory(self) -> None:
        for name in (ECR_HOST, "docker.io", ECR_HOST):
            client, server, recorders, pump = self.connect(name)
            self.assertEqual(recorders["client"].handshakes, 1, recorders["client"].lost)
            self.assertEqual(recorders["server"].handshakes, 1)
            self.assertEqual(client.negotiatedProtocol, b"http/1.1")
            self.assertEqual(server.negotiatedProtocol, b"http/1.1")
            peer = client.getPeerCertificate().to_cryptography()
            san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.assertEqual(san.get_values_for_type(x509.DNSName), [name])
            self.send(client, b"ping", pump)
            self.send(server, b"pong", pump)
            self.assertEqual((recorders["server"].received, recorders["client"].received), (b"ping", b"pong"))
        self.assertEqual(self.sni.stats.leaves_minted, 2)
        self.assertEqual(self.sni.stats.leaf_cache_hits, 1)

    def test_name_outside_the_patterns_fails_the_handshake(self) -> None:
        _, _, recorders, _ = self.connect("example.com")
        self.assertEqual(recorders["client"].handshakes, 0)
        self.assertEqual(recorders["server"].handshakes, 0)
        self.assertIn("handshake failure", str(recorders["client"].lost.value))
        self.assertEqual(self.sni.stats.refused_not_captured, 1)


# --- CA rotation -------------------------------------------------------------------------------------------


def test_watcher_swaps_a_rotated_ca_and_keeps_the_old_one_on_a_broken_swap(tmp_path):
    authority = mirror_ca(tmp_path, PATTERNS)
    server = sni_server(authority)
    old = server.context_for("docker.io")
    watcher = tls.CaWatcher(None, server, tmp_path / "ca.crt", tmp_path / "ca.key", PATTERNS, 1.0)
    watcher._checked(watcher._check())
    assert server.signing.authority is authority and server.context_for("docker.io") is old

    ca.init_directory(tmp_path, PATTERNS, force=True)
    watcher._checked(watcher._check())
    assert server.stats.ca_reloads == 1 and server.cached_hosts == []
    new_subject = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()).subject
    assert leaf_of(server.context_for("docker.io")).issuer == new_subject

    os.chmod(tmp_path / "ca.key", 0o644)
    watcher._checked(watcher._check())
    assert server.stats.ca_reload_errors == 1
    assert server.signing.authority.cert.subject == new_subject
    watcher._checked(watcher._check())  # unchanged broken files are reported once
    assert server.stats.ca_reload_errors == 1


# --- the tls config keys ----------------------------------------------------------------------------------


def test_tls_config_defaults_and_limits():
    defaults = config.load().tls
    assert (defaults.leaf_validity, defaults.leaf_cache_size, defaults.reload_interval) == (
        7 * 86400.0,
        1024,
        10.0,
    )
    custom = config.parse_document(
        {"tls": {"leaf_validity": "24h", "leaf_cache_size": 10, "reload_interval": "1s"}}
    )
    assert (custom.tls.leaf_validity, custom.tls.leaf_cache_size, custom.tls.reload_interval) == (
        86400.0,
        10,
        1.0,
    )
    with pytest.raises(config.ConfigError) as caught:
        config.parse_document(
            {"tls": {"leaf_validity": "169h", "leaf_cache_size": 0, "reload_interval": "0s"}}
        )
    paths = {path for path, _ in caught.value.problems}
    assert paths == {"tls.leaf_validity", "tls.leaf_cache_size", "tls.reload_interval"}
    assert "at most 168h" in caught.value.describe()
