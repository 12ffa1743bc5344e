"""The cluster CA: creation with X.509 Name Constraints, CSRs for an enterprise PKI, and the checks
``serve`` runs before it trusts the CA files.

The CA sits on every node, so both the root and the intermediate that signs leaves carry critical
name constraints: they permit exactly the DNS subtrees that the capture patterns live in (derived
from :attr:`dnsmirror.patterns.Pattern.literal_suffix`) and exclude every IP address. A stolen
intermediate key can then impersonate registries only, never a bank or an internal service.

Everything here is plain, synchronous code (file and key work); callers keep it off the reactor.
"""

from __future__ import annotations

import datetime
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dnsmirror.patterns import Pattern

ROOT_DAYS = 3650
INTERMEDIATE_DAYS = 365
EXPIRY_WARNING = datetime.timedelta(days=30)
# Every IPv4 and IPv6 address: a registry CA never needs to sign for an IP.
EXCLUDED_NETWORKS = ("0.0.0.0/0", "::/0")

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CaError(Exception):
    """A CA file that cannot be used: names the file, the problem, and the fix."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


# --- constraints from capture patterns ---------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Subtree:
    """A DNS name constraint: ``.amazonaws.com`` (subdomains only) or ``docker.io`` (the name and its
    subdomains), as RFC 5280 and Go's crypto/x509 read them."""

    name: str
    patterns: tuple[str, ...] = field(default=(), compare=False)

    @property
    def base(self) -> str:
        return self.name.lstrip(".")

    @property
    def subdomains_only(self) -> bool:
        return self.name.startswith(".")

    def permits(self, host: str) -> bool:
        """True when ``host`` lies inside this subtree."""
        host = host.lower().rstrip(".")
        base = self.base.lower()
        if host == base:
            return not self.subdomains_only
        return host.endswith("." + base)

    def covers_subdomains_of(self, suffix: str) -> bool:
        """True when every strict subdomain of ``suffix`` lies inside this subtree."""
        suffix = suffix.lower()
        base = self.base.lower()
        return suffix == base or suffix.endswith("." + base)

    def explain(self) -> str:
        if self.subdomains_only:
            return f"subdomains of {self.base}"
        return f"{self.name} and its subdomains"


def _pattern_subtree(pattern: Pattern) -> Subtree:
    # RFC 5280 form (no leading dot): the literal suffix and its subdomains. The leading-dot form
    # (subdomains only) is a Go/OpenSSL extension that strict verifiers (cryptography) reject as malformed.
    return Subtree(pattern.literal_suffix, (pattern.text,))


def _subtree_contains(outer: Subtree, inner: Subtree) -> bool:
    if inner.subdomains_only:
        return outer.covers_subdomains_of(inner.base)
    return outer.permits(inner.base) and outer.covers_subdomains_of(inner.base)


def required_subtrees(patterns: Iterable[str]) -> list[Subtree]:
    """The fewest DNS subtrees that cover every capture pattern, each with the patterns it serves."""
    by_name: dict[str, list[str]] = {}
    for text in patterns:
        subtree = _pattern_subtree(Pattern.parse(text))
        by_name.setdefault(subtree.name, []).extend(subtree.patterns)
    candidates = [Subtree(name, tuple(pats)) for name, pats in by_name.items()]
    widest = [c for c in candidates
              if not any(o.name != c.name and _subtree_contains(o, c) for o in candidates)]
    served: dict[str, list[str]] = {w.name: [] for w in widest}
    for candidate in candidates:
        # containment is transitive, so some widest subtree holds every candidate
        owner = next(w for w in widest if _subtree_contains(w, candidate))
        served[owner.name].extend(p for p in candidate.patterns if p not in served[owner.name])
    return sorted(Subtree(name, tuple(pats)) for name, pats in served.items())


def name_constraints(subtrees: Sequence[Subtree]) -> x509.NameConstraints:
    """Permit the DNS subtrees, exclude every IP address."""
    import ipaddress

    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(s.name) for s in subtrees],
        excluded_subtrees=[x509.IPAddress(ipaddress.ip_network(n)) for n in EXCLUDED_NETWORKS],
    )


def describe_constraints(patterns: Sequence[str]) -> str:
    """Human-readable text for ``dnsmirror ca constraints``: each subtree and the patterns needing it."""
    subtrees = required_subtrees(patterns)
    width = max(len(s.name) for s in subtrees)
    lines = ["Permitted DNS subtrees (critical X.509 name constraints on the root and the intermediate):"]
    for subtree in subtrees:
        lines.append(
            f"  {subtree.name:<{width}}  {subtree.explain()}; needed by {', '.join(subtree.patterns)}"
        )
    lines.append(
        f"Excluded IP ranges: {', '.join(EXCLUDED_NETWORKS)} (no certificate may name an IP address)"
    )
    return "\n".join(lines)


# --- coverage check of an existing certificate -------------------------------------------------------


def _dns_subtrees(names: Iterable[x509.GeneralName] | None) -> list[Subtree] | None:
    if names is None:
        return None
    return [Subtree(n.value) for n in names if isinstance(n, x509.DNSName)]


def uncovered_patterns(cert: x509.Certificate, patterns: Iterable[str]) -> list[tuple[str, str]]:
    """``(pattern, why)`` for each capture pattern whose names this CA certificate may not sign.

    A certificate without name constraints covers everything and is reported by :func:`check_authority`.
    """
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return []
    permitted = _dns_subtrees(constraints.permitted_subtrees)
    excluded = _dns_subtrees(constraints.excluded_subtrees) or []
    problems = []
    for text in patterns:
        pattern = Pattern.parse(text)
        suffix = pattern.literal_suffix
        literal = suffix == pattern.text
        if permitted:  # an empty list of DNS subtrees leaves DNS names unconstrained
            if literal:
                inside = any(s.permits(suffix) for s in permitted)
            else:
                inside = any(s.covers_subdomains_of(suffix) for s in permitted)
            if not inside:
                allowed = ", ".join(s.name for s in permitted)
                problems.append((pattern.text, f"outside the permitted DNS subtrees ({allowed})"))
                continue
        for ex in excluded:
            hit = ex.permits(suffix) if literal else (
                ex.covers_subdomains_of(suffix) or ex.base == suffix or ex.base.endswith("." + suffix))
            if hit:
                problems.append((pattern.text, f"overlaps the excluded DNS subtree {ex.name}"))
                break
    return problems


def has_name_constraints(cert: x509.Certificate) -> bool:
    try:
        value = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(_dns_subtrees(value.permitted_subtrees))


# --- creation -----------------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dnsmirror"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _ca_extensions(builder, key, path_length: int, subtrees: Sequence[Subtree], server_auth_only: bool):
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(name_constraints(subtrees), critical=True)
    )
    if server_auth_only:
        # clients that nest EKUs (Go, Windows) then accept only TLS server leaves under this CA
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class CaBundle:
    """A freshly created root and intermediate."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def create_ca(subtrees: Sequence[Subtree], *, root_days: int = ROOT_DAYS,
              intermediate_days: int = INTERMEDIATE_DAYS, now: datetime.datetime | None = None) -> CaBundle:
    """A name-constrained root (pathlen 1) and intermediate (pathlen 0), both ECDSA P-256."""
    now = now or _now()
    start = now - datetime.timedelta(hours=1)
    tag = secrets.token_hex(4)
    root_key = new_key()
    root_name = _name(f"dnsmirror cluster root CA {tag}")
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root_builder = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=root_days))
        .add_extension(root_ski, critical=False)
    )
    root_cert = _ca_extensions(root_builder, root_key, 1, subtrees, False).sign(root_key, hashes.SHA256())
    key = new_key()
    end = min(start + datetime.timedelta(days=intermediate_days), root_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"dnsmirror cluster CA {tag}"))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False
        )
    )
    cert = _ca_extensions(builder, key, 0, subtrees, True).sign(root_key, hashes.SHA256())
    return CaBundle(root_key, root_cert, key, cert)


def create_csr(
    key: ec.EllipticCurvePrivateKey, subtrees: Sequence[Subtree]
) -> x509.CertificateSigningRequest:
    """A CSR for an intermediate that an enterprise PKI signs; it requests the same extensions
    :func:`create_ca` puts on the intermediate (CA, pathlen 0, name constraints, serverAuth)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        _name(f"dnsmirror cluster CA {secrets.token_hex(4)}")
    )
    builder = _ca_extensions(builder, key, 0, subtrees, True)
    return builder.sign(key, hashes.SHA256())


def pem(cert: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (0600 from creation on, never wider)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


CA_FILES = ("root.crt", "root.key", "ca.crt", "ca.key")


def init_directory(directory: Path, patterns: Sequence[str], *, force: bool = False,
                   root_days: int = ROOT_DAYS, intermediate_days: int = INTERMEDIATE_DAYS) -> list[Path]:
    """``dnsmirror ca init``: write root.crt, root.key, ca.crt, ca.key into ``directory``.

    Refuses to overwrite existing files unless ``force``; returns the paths written. Validity and the
    directory are checked before anything is created, so a refusal leaves nothing behind.
    """
    check_validity_days(root_days, intermediate_days)
    _make_directory(directory)
    paths = [directory / name for name in CA_FILES]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise CaError(existing[0], "already exists", "use another --dir, or --force to replace the whole CA")
    bundle = create_ca(required_subtrees(patterns), root_days=root_days, intermediate_days=intermediate_days)
    try:
        write_public(paths[0], pem(bundle.root_cert))
        write_private(paths[1], key_pem(bundle.root_key))
        write_public(paths[2], pem(bundle.cert))
        write_private(paths[3], key_pem(bundle.key))
    except OSError as exc:
        raise CaError(directory, f"cannot write the CA files: {exc.strerror or exc}",
                      "choose a --dir you can write to") from exc
    return paths


def check_validity_days(root_days: int, intermediate_days: int) -> None:
    """Refuse validity periods that would write an expired CA or one cut short without a word."""
    if root_days < 1:
        raise CaError(
            "--root-days", f"must be at least 1, got {root_days}", "give the root's validity in days"
        )
    if intermediate_days < 1:
        raise CaError("--days", f"must be at least 1, got {intermediate_days}",
                      "give the intermediate's validity in days (default 365)")
    if intermediate_days > root_days:
        raise CaError(
            "--days",
            f"{intermediate_days} exceeds --root-days {root_days}: the intermediate cannot "
            "outlive the root that signs it",
            "lower --days or raise --root-days",
        )


def _make_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CaError(
            directory, "exists and is not a directory", "give --dir a directory (it is created if missing)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaError(directory, f"cannot create the directory: {exc.strerror or exc}",
                      "give --dir a path whose parent exists and is writable") from exc


def csr_directory(directory: Path, patterns: Sequence[str], *, force: bool = False) -> tuple[Path, Path]:
    """``dnsmirror ca csr``: write ca.key (0600) and ca.csr into ``directory``."""
    _make_directory(directory)
    key_path, csr_path = directory / "ca.key", directory / "ca.csr"
    for path in (key_path, csr_path):
        if path.exists() and not force:
            raise CaError(path, "already exists", "use another --dir, or --force to replace it")
    key = new_key()
    write_private(key_path, key_pem(key))
    write_public(csr_path, pem(create_csr(key, required_subtrees(patterns))))
    return key_path, csr_path


# --- loading and checking ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA that signs leaves: its certificate, key, and the chain sent after each leaf."""

    cert: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...]
    cert_path: Path
    key_path: Path

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    @property
    def ski(self) -> x509.SubjectKeyIdentifier:
        try:
            return self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.cert.public_key())


def check_key_permissions(key_path: Path) -> None:
    """Refuse a key readable or writable by group or others."""
    try:
        mode = os.stat(key_path).st_mode
    except FileNotFoundError:
        raise CaError(
            key_path,
            "does not exist",
            "create a CA with `dnsmirror ca init --dir DIR` and point tls.ca_key at DIR/ca.key",
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CaError(
            key_path,
            f"is accessible by group or others (mode {stat.S_IMODE(mode):04o})",
            f"chmod 600 {key_path} (Kubernetes: defaultMode: 0400 on the Secret volume, no fsGroup)",
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaError(
            path,
            f"{what} does not exist",
            "create a CA with `dnsmirror ca init --dir DIR`, or set tls.ca_cert/tls.ca_key",
        ) from None
    except OSError as exc:
        raise CaError(
            path, f"cannot read {what}: {exc.strerror or exc}", "check the path and its permissions"
        ) from exc


def _same_public_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def load_authority(cert_path: Path | str, key_path: Path | str, patterns: Sequence[str],
                   now: datetime.datetime | None = None) -> tuple[CertificateAuthority, list[str]]:
    """Load and check the CA files; returns the CA and warnings, or raises :class:`CaError`.

    ``cert_path`` holds the signing CA first, optionally followed by the certificates above it (an
    enterprise chain); self-signed roots in it are not sent to clients, which must already trust them.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    now = now or _now()
    check_key_permissions(key_path)
    try:
        certs = x509.load_pem_x509_certificates(_read(cert_path, "CA certificate"))
    except ValueError:
        raise CaError(
            cert_path,
            "is not a PEM certificate file",
            "point tls.ca_cert at the CA certificate (PEM), e.g. the ca.crt `dnsmirror ca init` wrote",
        ) from None
    try:
        key = serialization.load_pem_private_key(_read(key_path, "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(key_path, f"is not an unencrypted PEM private key ({exc})",
                      "point tls.ca_key at the CA's private key (PEM, no passphrase)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(key_path, f"holds a {type(key).__name__}, not an ECDSA or RSA key",
                      "use an ECDSA P-256 key (`dnsmirror ca init` or `dnsmirror ca csr` write one)")
    cert = certs[0]
    if not _same_public_key(cert.public_key(), key.public_key()):
        raise CaError(
            key_path,
            f"does not match the certificate in {cert_path}",
            "install the key and certificate of the same CA (both from one `ca init` or one signed CSR)",
        )
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise CaError(
            cert_path,
            "is not a CA certificate (basicConstraints CA:TRUE is missing)",
            "use the intermediate CA written by `dnsmirror ca init` (ca.crt), not a server certificate",
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise CaError(cert_path, "is not allowed to sign certificates (keyUsage lacks keyCertSign)",
                          "issue the CA with keyUsage keyCertSign, e.g. from `dnsmirror ca csr`")
    except x509.ExtensionNotFound:
        pass
    if not has_name_constraints(cert):
        raise CaError(cert_path, "has no DNS name constraints, so its key could impersonate any web site",
                      "create a constrained CA with `dnsmirror ca init` or have `dnsmirror ca csr` signed")
    for ca_cert in certs:
        problems = uncovered_patterns(ca_cert, patterns)
        if problems:
            pattern, why = problems[0]
            raise CaError(
                cert_path,
                f"name constraints of {ca_cert.subject.rfc4514_string()} do not cover "
                f"capture pattern {pattern!r}: {why}",
                "recreate the CA for the current capture list (`dnsmirror ca constraints` shows what it "
                "needs; `dnsmirror ca init --config FILE`), or remove the pattern from capture",
            )
    if cert.not_valid_before_utc > now:
        raise CaError(cert_path, f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                      "check the clock of this node, or install a CA that is valid now")
    if cert.not_valid_after_utc <= now:
        raise CaError(cert_path, f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                      "rotate the CA (docs/security.md, 'Rotating the CA')")
    warnings = []
    if cert.issuer == cert.subject and basic.path_length != 0:
        warnings.append(
            f"{key_path}: is the key of a self-signed root CA, so a node holding it could mint other "
            "intermediates; give nodes the intermediate (ca.crt / ca.key of `dnsmirror ca init`) and "
            "keep the root key offline"
        )
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        warnings.append(f"{cert_path}: the CA expires on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
                        "in less than 30 days; rotate it (docs/security.md, 'Rotating the CA')")
    chain = tuple(c for c in certs if c.issuer != c.subject)
    return CertificateAuthority(cert, key, chain, cert_path, key_path), warnings
