"""Per-SNI leaf certificates for the HTTPS listener.

Every TLS connection starts on a *default context* that has no certificate at all. OpenSSL calls our
server-name callback during the ClientHello; for a captured name we switch the connection to that
host's context (a leaf for exactly that name + the intermediate), minted on first use and kept in a
bounded LRU. Without SNI, or for a name we do not capture, the connection stays on the certificate-less
context and OpenSSL ends the handshake with a ``handshake_failure`` alert: nothing is minted.

No key is generated on the handshake path: each CA load creates one leaf key (in a thread) that all
leaves of that CA share. Signing a leaf is synchronous in the callback (OpenSSL cannot wait); it costs
well under a millisecond, measured in :class:`TlsStats` and in ``bench/tls_handshake.py``.

:class:`CaWatcher` polls the CA files and swaps in a rotated CA without restart.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import threads
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from dnsmirror import ca as camod
from dnsmirror.logs import fields
from dnsmirror.patterns import HostMatcher, is_valid_host, normalize_host
from dnsmirror.periodic import Periodic

log = logging.getLogger("dnsmirror.tls")

MAX_LEAF_VALIDITY = 7 * 86400.0
# Clients' clocks may be behind ours; the backdate counts inside the validity period.
BACKDATE = 3600.0
# ECDHE + AEAD only for TLS 1.2 (TLS 1.3 suites are all AEAD); ECDSA first since our leaves are ECDSA.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)
# TLS 1.3 in the same order: AES-128-GCM first, as Go clients (containerd, docker, skopeo) ask for it on
# CPUs with AES instructions; OpenSSL's own order puts AES-256-GCM first, about a fifth dearer per byte
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
ALPN_HTTP11 = b"http/1.1"


@dataclass
class TlsStats:
    """Counters of the TLS front (read by metrics)."""

    refused_no_sni: int = 0
    refused_not_captured: int = 0
    leaves_minted: int = 0
    leaf_cache_hits: int = 0
    mint_errors: int = 0
    mint_seconds_total: float = 0.0
    mint_seconds_max: float = 0.0
    ca_reloads: int = 0
    ca_reload_errors: int = 0


# An ECDSA server leaf only signs the handshake: no key encipherment, no certificate signing.
SERVER_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def mint_leaf(authority: camod.CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey, host: str,
              validity: float, now: float) -> x509.Certificate:
    """A leaf for exactly ``host`` (SAN dNSName, no wildcard), signed by ``authority``.

    Valid from ``now - BACKDATE`` for ``validity`` seconds in total, never beyond the CA's own expiry.
    """
    start = datetime.datetime.fromtimestamp(now - BACKDATE, datetime.UTC)
    end = min(start + datetime.timedelta(seconds=min(validity, MAX_LEAF_VALIDITY)), authority.not_after)
    # CN is limited to 64 characters; longer names live in the (then critical) SAN only
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= 64 else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(authority.cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=not len(subject))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SERVER_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority.ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
    )
    return builder.sign(authority.key, hashes.SHA256())


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    if ALPN_HTTP11 in offered:
        return ALPN_HTTP11
    # a client offering only h2 carries on without ALPN, i.e. HTTP/1.1
    return SSL.NO_OVERLAPPING_PROTOCOLS


def base_context() -> SSL.Context:
    """A server context with dnsmirror's protocol settings and no certificate."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    context.set_alpn_select_callback(_select_alpn)
    context.set_cipher_list(TLS12_CIPHERS)
    context.set_tls13_ciphersuites(TLS13_SUITES)
    return context


@dataclass
class _HostEntry:
    context: SSL.Context
    renew_at: float
    leaf: x509.Certificate


@dataclass(frozen=True)
class SigningState:
    """One CA generation: the CA and the leaf key all its leaves share."""

    authority: camod.CertificateAuthority
    leaf_key: ec.EllipticCurvePrivateKey


def prepare_signing(authority: camod.CertificateAuthority) -> SigningState:
    """Pair a CA with a fresh leaf key (key generation: call this off the reactor)."""
    return SigningState(authority, camod.new_key())


@implementer(IOpenSSLServerConnectionCreator)
class SniServer:
    """Creates server TLS connections that pick a per-host leaf by SNI (a Twisted connection creator)."""

    def __init__(
        self,
        matcher: HostMatcher,
        signing: SigningState,
        *,
        leaf_validity: float = MAX_LEAF_VALIDITY,
        cache_size: int = 1024,
        clock: Callable[[], float] = time.time,
        stats: TlsStats | None = None,
    ) -> None:
        if not 0 < leaf_validity <= MAX_LEAF_VALIDITY:
            raise ValueError(f"leaf validity must be within (0, {MAX_LEAF_VALIDITY}] seconds")
        self.matcher = matcher
        self.signing = signing
        self.leaf_validity = leaf_validity
        self.cache_size = cache_size
        self.clock = clock
        self.stats = stats or TlsStats()
        self._hosts: OrderedDict[str, _HostEntry] = OrderedDict()
        self.default_context = base_context()
        self.default_context.set_tlsext_servername_callback(self._on_server_name)

    # IOpenSSLServerConnectionCreator
    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.default_context, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def replace_signing(self, signing: SigningState) -> None:
        """Switch to a new CA generation; leaves of the old one are dropped at once."""
        self.signing = signing
        self._hosts.clear()

    @property
    def cached_hosts(self) -> list[str]:
        return list(self._hosts)

    def context_for(self, server_name: str) -> SSL.Context | None:
        """The context holding the leaf for ``server_name``, or ``None`` when it is not captured."""
        host = normalize_host(server_name)
        if not is_valid_host(host) or not self.matcher.captures(host):
            return None
        now = self.clock()
        entry = self._hosts.get(host)
        if entry is not None and now < entry.renew_at:
            self._hosts.move_to_end(host)
            self.stats.leaf_cache_hits += 1
            return entry.context
        entry = self._mint(host, now)
        self._hosts[host] = entry
        self._hosts.move_to_end(host)
        while len(self._hosts) > self.cache_size:
            self._hosts.popitem(last=False)
        return entry.context

    def _mint(self, host: str, now: float) -> _HostEntry:
        started = time.perf_counter()
        signing = self.signing
        leaf = mint_leaf(signing.authority, signing.leaf_key, host, self.leaf_validity, now)
        context = base_context()
        context.use_certificate(leaf)
        for cert in signing.authority.chain:
            context.add_extra_chain_cert(cert)
        context.use_privatekey(signing.leaf_key)
        elapsed = time.perf_counter() - started
        stats = self.stats
        stats.leaves_minted += 1
        stats.mint_seconds_total += elapsed
        stats.mint_seconds_max = max(stats.mint_seconds_max, elapsed)
        lifetime = leaf.not_valid_after_utc.timestamp() - now
        # renew at half of the remaining life: a leaf is never served in its last days
        log.debug("minted leaf", extra=fields(event="leaf_minted", host=host, seconds=round(elapsed, 6)))
        return _HostEntry(context, now + lifetime / 2, leaf)

    def _on_server_name(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if name is None:
            self.stats.refused_no_sni += 1
            log.debug("refused TLS without SNI", extra=fields(event="tls_refused", reason="no_sni"))
            return
        server_name = name.decode("ascii", "replace")
        try:
            context = self.context_for(server_name)
        except Exception:
            self.stats.mint_errors += 1
            log.exception("cannot mint a leaf", extra=fields(event="mint_error", host=server_name))
            return
        if context is None:
            self.stats.refused_not_captured += 1
            log.debug("refused TLS for a name not captured",
                      extra=fields(event="tls_refused", reason="not_captured", host=server_name))
            return
        connection.set_context(context)


class CaWatcher:
    """Polls the CA files; when they change, loads and checks them in a thread and swaps the new CA into
    the :class:`SniServer`. A broken replacement is logged and the running CA kept."""

    def __init__(self, reactor, server: SniServer, cert_path: Path, key_path: Path, patterns: Sequence[str],
                 interval: float) -> None:
        self.reactor = reactor
        self.server = server
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self.patterns = tuple(patterns)
        self.interval = interval
        self._seen = self._signature()
        self._loop = Periodic(reactor, interval, self.poll, "CA watcher")

    def _signature(self) -> tuple:
        """What identifies the files' content cheaply (Kubernetes swaps a symlink: stat follows it)."""
        result: list[tuple[int, int, int, int] | None] = []
        for path in (self.cert_path, self.key_path):
            try:
                st = os.stat(path)
                result.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
            except OSError:
                result.append(None)
        return tuple(result)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _check(self) -> tuple[tuple, SigningState | None, list[str], str | None]:
        signature = self._signature()
        if signature == self._seen:
            return signature, None, [], None
        try:
            authority, warnings = camod.load_authority(self.cert_path, self.key_path, self.patterns)
        except camod.CaError as exc:
            return signature, None, [], str(exc)
        return signature, prepare_signing(authority), warnings, None

    def poll(self):
        """One check (in a thread); the swap happens on the reactor."""
        checking = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._check)
        return checking.addCallback(self._checked).addErrback(
            lambda f: log.error(
                "CA check failed: %s", f.getErrorMessage(), extra=fields(event="ca_reload_failed")
            )
        )

    def _checked(self, result) -> None:
        signature, signing, warnings, problem = result
        # a broken replacement is remembered too, so that it is logged once and not every poll
        self._seen = signature
        if problem is not None:
            self.server.stats.ca_reload_errors += 1
            log.error("CA files changed but cannot be used, keeping the running CA: %s", problem,
                      extra=fields(event="ca_reload_failed"))
            return
        if signing is None:
            return
        self.server.replace_signing(signing)
        self.server.stats.ca_reloads += 1
        for warning in warnings:
            log.warning("%s", warning)
        log.warning("CA files changed: now signing with %s; cached leaves dropped",
                    signing.authority.cert.subject.rfc4514_string(), extra=fields(event="ca_reloaded"))
