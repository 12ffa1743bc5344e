"""End to end with a real Go TLS client, as containerd would connect: skopeo in a network namespace whose
resolv.conf points at dnsmirror's DNS, trusting only dnsmirror's root (SSL_CERT_FILE)."""

from __future__ import annotations

import datetime
import shutil
import sys
import time

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness.netns import Cluster, clean_env, netns_available

from dnsmirror import ca, config

ECR_HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
FORGED_HOST = "registry.example.com"
PATTERNS = config.load().capture

missing = [tool for tool in ("skopeo", "openssl", "dig", "ip") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(missing), reason=f"missing tools {missing} (scripts/setup.sh)"),
    pytest.mark.skipif(netns_available() is not None, reason=str(netns_available())),
]


def forge_leaf(ca_dir, host: str):
    """What a thief of the intermediate key could mint for a name outside the constraints."""
    authority, _ = ca.load_authority(ca_dir / "ca.crt", ca_dir / "ca.key", PATTERNS)
    key = ca.new_key()
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority.ski), critical=False
        )
        .sign(authority.key, hashes.SHA256())
    )
    return leaf, key


@pytest.fixture(scope="module")
def node():
    """A namespace running ``dnsmirror serve`` (DNS on 127.0.0.1:53, HTTPS on 127.0.0.1:443) as its resolver,
    plus a forged TLS server on 127.0.0.2:443 that the hosts file names ``FORGED_HOST``."""
    with Cluster() as cluster:
        member = cluster.add("tls", nameservers=["127.0.0.1"], hosts={FORGED_HOST: "127.0.0.2"})
        ca_dir = cluster.workdir / "ca"
        ca.init_directory(ca_dir, PATTERNS)
        document = {
            "mirror": {"address": "127.0.0.1"},
            # an upstream nobody serves: names that are not captured fail inside the namespace
            "dns": {"listen": ["127.0.0.1:53"], "upstreams": ["127.0.0.1:5399"], "timeout": "500ms"},
            "https": {"listen": ["127.0.0.1:443"]},
            "health": {"interval": "200ms", "timeout": "100ms"},
            "tls": {"ca_cert": str(ca_dir / "ca.crt"), "ca_key": str(ca_dir / "ca.key")},
            "log": {"level": "debug"},
        }
        config_path = cluster.workdir / "dnsmirror.yaml"
        config_path.write_text(yaml.safe_dump(document))
        serve = member.start([sys.executable, "-m", "dnsmirror", "serve", "--config", str(config_path)],
                             name="dnsmirror", env=clean_env(PYTHONUNBUFFERED="1"), cwd=cluster.workdir)
        serve.wait_listening(443)
        serve.wait_listening(53)

        leaf, key = forge_leaf(ca_dir, FORGED_HOST)
        (cluster.workdir / "forged.crt").write_bytes(ca.pem(leaf))
        ca.write_private(cluster.workdir / "forged.key", ca.key_pem(key))
        forged = member.start(["openssl", "s_server", "-accept", "127.0.0.2:443", "-www", "-quiet",
                               "-cert", str(cluster.workdir / "forged.crt"),
                               "-key", str(cluster.workdir / "forged.key"),
                               "-cert_chain", str(ca_dir / "ca.crt")], name="forged")
        forged.wait_listening(443)

        # captured names resolve to the mirror once its health probe has seen the HTTPS listener
        deadline = time.monotonic() + 15
        while True:
            answer = member.run(["dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", ECR_HOST], check=False)
            if answer.stdout.decode().split() == ["127.0.0.1"]:
                break
            assert time.monotonic() < deadline, f"no captured answer: {answer}\n{serve.describe()}"
            time.sleep(0.1)
        yield member, ca_dir, serve


def skopeo_inspect(member, ca_dir, reference: str, root=None):
    env = clean_env(ssl_cert_file=root or ca_dir / "root.crt")
    return member.run(["skopeo", "inspect", "--retry-times", "0", f"docker://{reference}"],
                      env=env, timeout=60, check=False)


def test_skopeo_completes_the_handshake_with_a_minted_leaf(node):
    member, ca_dir, serve = node
    done = skopeo_inspect(member, ca_dir, f"{ECR_HOST}/team/app:v1")
    output = (done.stdout + done.stderr).decode(errors="replace")
    # no upstream registry here, so the HTTP side answers 502: the TLS handshake and Go's chain
    # verification succeeded, or skopeo would not have seen an HTTP status at all
    assert done.returncode != 0
    assert "invalid status code from registry 502" in output, output
    assert "x509" not in output and "tls:" not in output, output
    assert f"host={ECR_HOST}" in serve.stderr() + serve.stdout(), serve.describe()


def test_skopeo_rejects_a_forged_leaf_outside_the_name_constraints(node):
    member, ca_dir, _ = node
    done = skopeo_inspect(member, ca_dir, f"{FORGED_HOST}/team/app:v1")
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode != 0
    assert "not authorized to sign for this name" in output, output


def test_skopeo_trusting_another_root_refuses_the_mirror(node, tmp_path):
    member, ca_dir, _ = node
    ca.init_directory(tmp_path / "other", PATTERNS)
    done = skopeo_inspect(member, ca_dir, f"{ECR_HOST}/team/app:v1", root=tmp_path / "other" / "root.crt")
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode != 0
    assert "certificate signed by unknown authority" in output, output
