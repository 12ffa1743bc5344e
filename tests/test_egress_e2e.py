"""A node with no direct way to its registries: dnsmirror reaches them through tinyproxy's CONNECT tunnels.

Namespaces: docker-registry for ``ECR_HOST``; tinyproxy, whose ``/etc/hosts`` names the registry; the
world's DNS, which does not (so the mirror could not reach the registry by itself); a node running
dnsmirror with ``upstream.proxy`` set, where skopeo pulls through the mirror as a runtime would.
"""

from __future__ import annotations

import shutil

import pytest
from harness import ECR_HOST, require_netns
from harness.images import build_image, push_image, skopeo_copy
from harness.netns import Cluster
from harness.pki import create_ca
from harness.proxy import EgressProxyServer
from harness.registry import Registry
from mirror_support import MirrorNode, upstream_dns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in ("skopeo", "docker-registry", "tinyproxy")),
                       reason="skopeo, docker-registry and tinyproxy are needed (scripts/setup.sh)"),
]

REFERENCE = f"{ECR_HOST}/team/app:v1"


def test_pulls_go_through_the_egress_proxy_with_the_registry_verified(tmp_path) -> None:
    require_netns()
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        proxy_ns = cluster.add("proxy", hosts={ECR_HOST: registry_ns.address})
        dns_ns = cluster.add("dns")
        node = cluster.add("node")
        pusher = cluster.add("pusher", hosts={ECR_HOST: registry_ns.address})
        ca = create_ca(tmp_path / "public-ca")
        with Registry(registry_ns, ECR_HOST, ca, tmp_path / "registry") as registry, \
                EgressProxyServer(proxy_ns, tmp_path / "proxy") as proxy, \
                upstream_dns(dns_ns, tmp_path / "dns", {"unrelated.example": dns_ns.address}) as dns, \
                MirrorNode(node, tmp_path / "mirror", dns, ca, {"upstream": {"proxy": proxy.url}}) as mirror:
            image = build_image(tmp_path / "image", platforms=("linux/amd64",))
            push_image(image, pusher, REFERENCE, ca_file=ca.cert_path)
            pushed = len(registry.access_log())

            skopeo_copy(
                node,
                f"docker://{REFERENCE}",
                f"oci:{tmp_path / 'pulled'}:v1",
                ca_file=mirror.trust_bundle(),
                all_platforms=False,
                timeout=60,
            )

            assert (tmp_path / "pulled" / "index.json").exists()
            assert proxy.connects() and set(proxy.connects()) == {f"{ECR_HOST}:443"}
            through_mirror = registry.access_log()[pushed:]
            assert through_mirror and {entry.client for entry in through_mirror} == {proxy_ns.address}
            assert any(entry.path.startswith("/v2/team/app/blobs/") for entry in through_mirror)
