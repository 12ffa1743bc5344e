"""A registry the node trusts but the mirror does not: after one failed pull, the node goes around the mirror.

Namespaces: docker-registry for ``ECR_HOST`` with a certificate from a *private* CA, and unbound as the
world's DNS; a node running dnsmirror whose ``upstream.ca_bundle`` holds only the test public CA (not
the private one); skopeo on the node trusting the private CA and dnsmirror's root, as a container runtime
on a node with a private registry's CA installed would.
"""

from __future__ import annotations

import shutil

import pytest
from harness import ECR_HOST, require_netns
from harness.images import build_image, push_image, skopeo_copy
from harness.netns import Cluster
from harness.pki import bundle, create_ca
from harness.registry import Registry
from mirror_support import MirrorNode, resolve, upstream_dns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("skopeo") is None or shutil.which("docker-registry") is None,
                       reason="skopeo and docker-registry are needed (scripts/setup.sh)"),
]

REFERENCE = f"{ECR_HOST}/team/app:v1"


def test_a_registry_whose_certificate_the_mirror_cannot_verify_is_left_uncaptured(tmp_path) -> None:
    require_netns()
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        node = cluster.add("node")
        pusher = cluster.add("pusher", hosts={ECR_HOST: registry_ns.address})
        public_ca = create_ca(tmp_path / "public-ca")
        private_ca = create_ca(tmp_path / "private-ca", common_name="dnsmirror test private CA")
        with Registry(registry_ns, ECR_HOST, private_ca, tmp_path / "registry") as registry, \
                upstream_dns(registry_ns, tmp_path / "dns", {ECR_HOST: registry_ns.address}) as dns, \
                MirrorNode(node, tmp_path / "mirror", dns, public_ca,
                           {"metrics": {"listen": f"{node.address}:9090"}}) as mirror:
            image = build_image(tmp_path / "image", platforms=("linux/amd64",))
            push_image(image, pusher, REFERENCE, ca_file=private_ca.cert_path)
            node_trust = bundle(
                [private_ca.cert_path, mirror.ca_dir / "root.crt"], tmp_path / "node-trust.pem"
            )
            assert node.call(resolve, mirror.address, ECR_HOST) == [mirror.address]
            logged_by_push = len(registry.access_log())

            # the mirror cannot verify the registry: this pull fails (502), and the registry is bypassed
            refused = skopeo_copy(node, f"docker://{REFERENCE}", f"oci:{tmp_path / 'first'}:v1",
                                  ca_file=node_trust, all_platforms=False, timeout=60, check=False)
            assert refused.returncode != 0
            assert b"502" in refused.stderr or b"Bad Gateway" in refused.stderr, refused.stderr
            # no registry API request reached it (skopeo's last resort, a /v1/_ping, goes around the mirror)
            reached = [
                entry for entry in registry.access_log()[logged_by_push:] if entry.path.startswith("/v2/")
            ]
            assert reached == []
            bypasses = [record["host"] for record in mirror.log_records()
                        if record.get("event") == "upstream_tls_bypass"]
            assert bypasses == [ECR_HOST], mirror.log()

            # the name now resolves to the registry itself, and the same pull succeeds straight from it
            assert node.call(resolve, mirror.address, ECR_HOST) == [registry_ns.address]
            skopeo_copy(node, f"docker://{REFERENCE}", f"oci:{tmp_path / 'second'}:v1", ca_file=node_trust,
                        all_platforms=False, timeout=60)
            assert (tmp_path / "second" / "index.json").exists()
            assert registry.count_requests("GET", "/v2/team/app/manifests/v1") >= 1

            metrics = node.run(["curl", "-s", f"http://{node.address}:9090/metrics"]).stdout.decode()
            assert "dnsmirror_tls_bypassed_registries 1.0" in metrics, metrics
            assert 'dnsmirror_dns_queries_total{outcome="fail_open"}' in metrics
