"""The cluster CA: constraint derivation, creation, chain verification by real verifiers, and the checks
``serve`` runs on the CA files."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dnsmirror import ca, cli, config, tls

ECR_HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
DEFAULT_PATTERNS = config.load().capture


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(ca.pem(c) for c in certs))
    return path


def forge_leaf(bundle: ca.CaBundle, san: x509.GeneralName, cn: str = "forged") -> x509.Certificate:
    """What a thief of the intermediate key could sign: any SAN it likes."""
    key = ca.new_key()
    now = datetime.datetime.now(datetime.UTC)
    ski = bundle.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(bundle.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(bundle.key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def bundle() -> ca.CaBundle:
    return ca.create_ca(ca.required_subtrees(DEFAULT_PATTERNS))


@pytest.fixture
def ca_dir(tmp_path) -> Path:
    ca.init_directory(tmp_path / "ca", DEFAULT_PATTERNS)
    return tmp_path / "ca"


def minted_leaf(bundle: ca.CaBundle, host: str) -> x509.Certificate:
    authority = ca.CertificateAuthority(
        bundle.cert, bundle.key, (bundle.cert,), Path("ca.crt"), Path("ca.key")
    )
    return tls.mint_leaf(authority, ca.new_key(), host, tls.MAX_LEAF_VALIDITY,
                         datetime.datetime.now(datetime.UTC).timestamp())


# --- constraint derivation ---------------------------------------------------------------------------


def test_default_patterns_need_these_subtrees():
    subtrees = {s.name: s.patterns for s in ca.required_subtrees(DEFAULT_PATTERNS)}
    assert subtrees["amazonaws.com"] == ("*.dkr.ecr.*.amazonaws.com",)
    assert subtrees["amazonaws.com.cn"] == ("*.dkr.ecr.*.amazonaws.com.cn",)
    assert subtrees["pkg.dev"] == ("*-docker.pkg.dev",)
    assert subtrees["azurecr.io"] == ("*.azurecr.io",)
    # RFC 5280 form only: strict verifiers reject a leading dot as a malformed DNS constraint
    assert not any(name.startswith(".") for name in subtrees)
    # a literal name permits itself and its subdomains, so it absorbs the narrower patterns
    assert subtrees["docker.io"] == ("docker.io", "registry-1.docker.io")
    assert subtrees["gcr.io"] == ("gcr.io", "*.gcr.io")
    assert "registry-1.docker.io" not in subtrees
    for pattern in DEFAULT_PATTERNS:
        assert sum(pattern in pats for pats in subtrees.values()) == 1, pattern


def test_subtree_semantics_follow_rfc5280_and_go():
    dotted, plain = ca.Subtree(".amazonaws.com"), ca.Subtree("docker.io")
    assert dotted.permits(ECR_HOST) and not dotted.permits("amazonaws.com")
    assert not dotted.permits("notamazonaws.com") and not dotted.permits("amazonaws.com.evil.io")
    assert (
        plain.permits("docker.io")
        and plain.permits("registry-1.docker.io")
        and not plain.permits("xdocker.io")
    )


def test_describe_constraints_says_why():
    text = ca.describe_constraints(DEFAULT_PATTERNS)
    assert "amazonaws.com" in text and "needed by *.dkr.ecr.*.amazonaws.com" in text
    assert "0.0.0.0/0" in text and "::/0" in text


# --- creation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, path_length", [("root_cert", 1), ("cert", 0)])
def test_root_and_intermediate_are_constrained_cas(bundle, which, path_length):
    cert = getattr(bundle, which)
    assert (
        isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        and cert.public_key().curve.name == "secp256r1"
    )
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == path_length
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert (
        usage.critical
        and usage.value.key_cert_sign
        and usage.value.crl_sign
        and not usage.value.digital_signature
    )
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    permitted = {n.value for n in constraints.value.permitted_subtrees}
    assert permitted == {s.name for s in ca.required_subtrees(DEFAULT_PATTERNS)}
    assert {n.value for n in constraints.value.excluded_subtrees} == {
        ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}


def test_init_writes_keys_0600_and_refuses_to_overwrite(ca_dir):
    for name in ("root.key", "ca.key"):
        assert (ca_dir / name).stat().st_mode & 0o777 == 0o600
    root = x509.load_pem_x509_certificate((ca_dir / "root.crt").read_bytes())
    intermediate = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert intermediate.issuer == root.subject
    intermediate.verify_directly_issued_by(root)
    with pytest.raises(ca.CaError, match="already exists"):
        ca.init_directory(ca_dir, DEFAULT_PATTERNS)
    ca.init_directory(ca_dir, DEFAULT_PATTERNS, force=True)
    assert x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes()) != intermediate


# --- chain verification by real verifiers --------------------------------------------------------------


def openssl_verify(
    tmp_path: Path, bundle: ca.CaBundle, leaf: x509.Certificate
) -> subprocess.CompletedProcess:
    root = write_pem(tmp_path / "root.pem", bundle.root_cert)
    intermediate = write_pem(tmp_path / "intermediate.pem", bundle.cert)
    leaf_path = write_pem(tmp_path / "leaf.pem", leaf)
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(root),
         "-untrusted", str(intermediate), str(leaf_path)],
        capture_output=True, text=True, timeout=20)


def cryptography_verify(bundle: ca.CaBundle, leaf: x509.Certificate, subject: x509.GeneralName):
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([bundle.root_cert]))
        .build_server_verifier(subject)
    )
    return verifier.verify(leaf, [bundle.cert])


def test_minted_ecr_leaf_is_accepted_by_openssl_strict(tmp_path, bundle):
    done = openssl_verify(tmp_path, bundle, minted_leaf(bundle, ECR_HOST))
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done.stdout + done.stderr


def test_minted_ecr_leaf_is_accepted_by_cryptography(bundle):
    chain = cryptography_verify(bundle, minted_leaf(bundle, ECR_HOST), x509.DNSName(ECR_HOST))
    assert [c.subject for c in chain] == [chain[0].subject, bundle.cert.subject, bundle.root_cert.subject]


def test_forged_example_com_leaf_is_rejected_by_openssl(tmp_path, bundle):
    done = openssl_verify(tmp_path, bundle, forge_leaf(bundle, x509.DNSName("example.com"), "example.com"))
    assert done.returncode != 0
    assert "permitted subtree violation" in done.stdout + done.stderr


def test_forged_example_com_leaf_is_rejected_by_cryptography(bundle):
    leaf = forge_leaf(bundle, x509.DNSName("example.com"), "example.com")
    with pytest.raises(verification.VerificationError, match="no permitted name constraints matched"):
        cryptography_verify(bundle, leaf, x509.DNSName("example.com"))


def test_forged_leaf_that_only_ends_like_a_subtree_is_rejected(tmp_path, bundle):
    # constraints match whole labels: "evilamazonaws.com" is not under "amazonaws.com"
    leaf = forge_leaf(bundle, x509.DNSName("evilamazonaws.com"))
    done = openssl_verify(tmp_path, bundle, leaf)
    assert done.returncode != 0 and "permitted subtree violation" in done.stdout + done.stderr
    with pytest.raises(verification.VerificationError, match="no permitted name constraints matched"):
        cryptography_verify(bundle, leaf, x509.DNSName("evilamazonaws.com"))


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "::1"])
def test_ip_san_leaves_are_rejected(tmp_path, bundle, address):
    ip = ipaddress.ip_address(address)
    leaf = forge_leaf(bundle, x509.IPAddress(ip))
    done = openssl_verify(tmp_path, bundle, leaf)
    assert done.returncode != 0 and "excluded subtree violation" in done.stdout + done.stderr
    with pytest.raises(verification.VerificationError):
        cryptography_verify(bundle, leaf, x509.IPAddress(ip))


# --- loading and checking the CA files -------------------------------------------------------------------


def test_load_authority_accepts_a_fresh_ca(ca_dir):
    authority, warnings = ca.load_authority(ca_dir / "ca.crt", ca_dir / "ca.key", DEFAULT_PATTERNS)
    assert warnings == []
    assert authority.chain == (authority.cert,)
    assert "dnsmirror cluster CA" in authority.cert.subject.rfc4514_string()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused_with_the_fix(ca_dir, mode):
    os.chmod(ca_dir / "ca.key", mode)
    with pytest.raises(ca.CaError) as caught:
        ca.load_authority(ca_dir / "ca.crt", ca_dir / "ca.key", DEFAULT_PATTERNS)
    assert caught.value.path == str(ca_dir / "ca.key")
    assert f"{mode:04o}" in caught.value.problem and "chmod 600" in caught.value.fix


def test_key_that_does_not_match_is_refused(ca_dir, tmp_path):
    other = tmp_path / "other"
    ca.init_directory(other, DEFAULT_PATTERNS)
    with pytest.raises(ca.CaError, match="does not match the certificate") as caught:
        ca.load_authority(ca_dir / "ca.crt", other / "ca.key", DEFAULT_PATTERNS)
    assert caught.value.path == str(other / "ca.key")


def test_a_leaf_is_not_a_ca(ca_dir, tmp_path, bundle):
    leaf_key = ca.new_key()
    authority = ca.CertificateAuthority(bundle.cert, bundle.key, (), Path("x"), Path("y"))
    leaf = tls.mint_leaf(
        authority, leaf_key, "docker.io", 3600, datetime.datetime.now(datetime.UTC).timestamp()
    )
    write_pem(tmp_path / "leaf.crt", leaf)
    ca.write_private(tmp_path / "leaf.key", ca.key_pem(leaf_key))
    with pytest.raises(ca.CaError, match="is not a CA certificate") as caught:
        ca.load_authority(tmp_path / "leaf.crt", tmp_path / "leaf.key", DEFAULT_PATTERNS)
    assert caught.value.path == str(tmp_path / "leaf.crt")


def test_constraints_must_cover_every_pattern_and_name_it(tmp_path):
    ca.init_directory(tmp_path, ["*.dkr.ecr.*.amazonaws.com", "docker.io"])
    with pytest.raises(ca.CaError) as caught:
        ca.load_authority(tmp_path / "ca.crt", tmp_path / "ca.key", ["docker.io", "*.azurecr.io"])
    assert "'*.azurecr.io'" in caught.value.problem and "dnsmirror ca constraints" in caught.value.fix
    ca.load_authority(
        tmp_path / "ca.crt", tmp_path / "ca.key", ["registry-1.docker.io", "*.dkr.ecr.*.amazonaws.com"]
    )


def test_uncovered_patterns_reads_subtrees_like_a_verifier():
    # a CA from elsewhere may use the leading-dot (subdomains only) form that Go and OpenSSL accept
    subtrees = [ca.Subtree(".amazonaws.com"), ca.Subtree("docker.io")]
    cert = ca.create_ca(subtrees).cert
    assert ca.uncovered_patterns(cert, ["*.dkr.ecr.*.amazonaws.com", "*.docker.io", "docker.io"]) == []
    assert [p for p, _ in ca.uncovered_patterns(cert, ["amazonaws.com", "*.example.io", "quay.io"])] == [
        "amazonaws.com", "*.example.io", "quay.io"]


def _self_signed_ca(constraints: x509.NameConstraints | None):
    key = ca.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unconstrained")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return key, builder.sign(key, hashes.SHA256())


def test_a_ca_without_name_constraints_is_refused(tmp_path):
    key, cert = _self_signed_ca(None)
    write_pem(tmp_path / "ca.crt", cert)
    ca.write_private(tmp_path / "ca.key", ca.key_pem(key))
    with pytest.raises(ca.CaError, match="no DNS name constraints"):
        ca.load_authority(tmp_path / "ca.crt", tmp_path / "ca.key", DEFAULT_PATTERNS)


def test_expired_ca_is_refused_and_expiring_ca_warns(tmp_path):
    ca.init_directory(tmp_path, DEFAULT_PATTERNS, intermediate_days=20)
    authority, warnings = ca.load_authority(tmp_path / "ca.crt", tmp_path / "ca.key", DEFAULT_PATTERNS)
    assert (
        len(warnings) == 1 and "less than 30 days" in warnings[0] and str(tmp_path / "ca.crt") in warnings[0]
    )
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=21)
    with pytest.raises(ca.CaError, match="expired"):
        ca.load_authority(tmp_path / "ca.crt", tmp_path / "ca.key", DEFAULT_PATTERNS, now=later)


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(ca.CaError, match="does not exist") as caught:
        ca.load_authority(tmp_path / "ca.crt", tmp_path / "ca.key", DEFAULT_PATTERNS)
    assert "dnsmirror ca init" in caught.value.fix


# --- an intermediate from an enterprise PKI ------------------------------------------------------------


def _enterprise_sign(csr: x509.CertificateSigningRequest):
    """The security team's PKI: signs the CSR as an intermediate, copying the requested extensions."""
    root_key, root = _self_signed_ca(None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
    )
    for extension in csr.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return root, builder.sign(root_key, hashes.SHA256())


def test_csr_carries_the_constraints_and_the_signed_result_is_accepted(tmp_path):
    key_path, csr_path = ca.csr_directory(tmp_path, DEFAULT_PATTERNS)
    assert key_path.stat().st_mode & 0o777 == 0o600
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    constraints = csr.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert {n.value for n in constraints.value.permitted_subtrees} >= {"amazonaws.com", "docker.io"}
    assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    enterprise_root, intermediate = _enterprise_sign(csr)
    # the file may carry the enterprise chain; its self-signed root is not sent to clients
    write_pem(tmp_path / "ca.crt", intermediate, enterprise_root)
    authority, _ = ca.load_authority(tmp_path / "ca.crt", key_path, DEFAULT_PATTERNS)
    assert authority.chain == (intermediate,)
    leaf = tls.mint_leaf(
        authority, ca.new_key(), ECR_HOST, 3600, datetime.datetime.now(datetime.UTC).timestamp()
    )
    store = verification.Store([enterprise_root])
    verifier = verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName(ECR_HOST))
    verifier.verify(leaf, list(authority.chain))


# --- the ca commands ----------------------------------------------------------------------------------


def test_ca_constraints_command(capsys, tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text('capture: ["*.azurecr.io", "quay.io"]\n')
    assert cli.main(["ca", "constraints", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert ".azurecr.io" in out and "quay.io" in out and "amazonaws" not in out


def test_ca_init_and_check_commands(capsys, tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"tls: {{ca_cert: {tmp_path}/ca/ca.crt, ca_key: {tmp_path}/ca/ca.key}}\n")
    assert cli.main(["ca", "init", "--dir", str(tmp_path / "ca"), "--config", str(config_file)]) == 0
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.crt", "ca.key", "root.crt", "root.key"]
    assert cli.main(["ca", "check", "--config", str(config_file)]) == 0
    assert "covers all" in capsys.readouterr().out
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    assert cli.main(["ca", "check", "--config", str(config_file)]) == 1
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed (scripts/setup.sh)")
def test_openssl_reads_the_constraints(ca_dir):
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(ca_dir / "ca.crt")],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    assert "X509v3 Name Constraints: critical" in text
    assert "Permitted:" in text and "DNS:amazonaws.com" in text
    assert "Excluded:" in text and "IP:0.0.0.0/0.0.0.0" in text
