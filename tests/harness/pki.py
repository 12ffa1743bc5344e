"""A test "public" CA, standing in for the web PKI that real registries use.

Independent of dnsmirror's own CA code (it shares only the fixed key usage of a server leaf): the
end-to-end tests use it for the upstream registry's certificate, which clients (and dnsmirror's
upstream client) must verify as they would a public one.

    ca = create_ca(tmp / "public-ca")
    cert = ca.issue_server(["123456789012.dkr.ecr.us-east-1.amazonaws.com"], tmp / "registry-tls")
    bundle([ca.cert_path, dnsmirror_root], tmp / "trust.pem")   # an SSL_CERT_FILE for Go clients
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dnsmirror import ca
from dnsmirror.tls import SERVER_KEY_USAGE

_VALIDITY = datetime.timedelta(days=2)
_BACKDATE = datetime.timedelta(hours=1)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class ServerCert:
    """A server certificate and key on disk; ``chain_path`` is leaf + CA (what a server presents)."""

    cert_path: Path
    key_path: Path
    chain_path: Path
    certificate: x509.Certificate


@dataclass(frozen=True)
class TestCA:
    """A self-signed root (ECDSA P-256, no name constraints) that issues server certificates."""

    __test__ = False  # not a pytest test class despite the name

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue_server(self, hostnames: Sequence[str], directory: str | os.PathLike[str], *,
                     ip_addresses: Iterable[str] = (), name: str = "server") -> ServerCert:
        """Issue a TLS server certificate for ``hostnames`` (and IPs) into ``directory/NAME.{crt,key}``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(host) for host in hostnames]
        sans += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(SERVER_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path, chain_path = (directory / f"{name}.crt", directory / f"{name}.key",
                                           directory / f"{name}-chain.crt")
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        cert_path.write_bytes(cert_pem)
        chain_path.write_bytes(cert_pem + self.cert_pem)
        _write_key(key, key_path)
        return ServerCert(cert_path, key_path, chain_path, certificate)


def create_ca(directory: str | os.PathLike[str], common_name: str = "dnsmirror test public root") -> TestCA:
    """Create a root CA in ``directory/ca.crt`` and ``directory/ca.key``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return TestCA(cert_path, key_path, certificate, key)


def bundle(cert_files: Iterable[str | os.PathLike[str]], path: str | os.PathLike[str]) -> Path:
    """Concatenate PEM files into one trust bundle (e.g. for ``SSL_CERT_FILE``); return its path."""
    path = Path(path)
    parts = [Path(cert_file).read_bytes() for cert_file in cert_files]
    path.write_bytes(b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts))
    return path


def mirror_ca(directory: Path, patterns: Sequence[str]) -> ca.CertificateAuthority:
    """dnsmirror's own CA (``dnsmirror ca init``) in ``directory``, constrained to ``patterns``, loaded."""
    ca.init_directory(directory, list(patterns), force=True)
    return ca.load_authority(directory / "ca.crt", directory / "ca.key", list(patterns))[0]
