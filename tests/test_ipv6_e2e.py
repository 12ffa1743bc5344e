"""IPv6 end to end: a dual-stack node, two IPv6-only nodes sharing their cache as peers, an IPv4-only node.

The registry and its DNS are dual-stack (A and AAAA records for the registry name, from a ULA
``fd00::/8`` subnet chosen per run). The dual-stack node's dnsmirror answers A and AAAA with its two
addresses. Each IPv6-only node has no IPv4 on its link: ``mirror.address6`` only (``mirror.address:
null``), its resolver, dnsmirror's upstream DNS, the registry and the other node (found through the
AAAA records of ``peers.dns_name``, as the DaemonSet finds its peers) are reached over IPv6, and the
second node's layers come from the first. On the IPv4-only node a captured name gets no AAAA although
the registry has one (a client must not go around the mirror).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import ECR_HOST, require_netns
from harness.containerd import Containerd
from harness.dns import StaticDNS
from harness.images import BuiltImage, build_image, push_image, skopeo_copy
from harness.netns import Cluster, Namespace
from harness.pki import TestCA, create_ca
from harness.registry import Registry
from mirror_support import MirrorNode, endpoint, resolve

pytestmark = pytest.mark.integration

REPOSITORY = "team/v6"
USER, PASSWORD = "bob", "bob-secret"
CREDS = f"{USER}:{PASSWORD}"
PEER_PORT = 5001
PEERS_NAME = "dnsmirror-peers.dnsmirror.svc.cluster.local"  # the headless Service name, as in the ConfigMap


@dataclass
class World:
    cluster: Cluster
    ca: TestCA
    registry: Registry
    dns: StaticDNS
    registry6: str
    image: BuiltImage
    work: Path
    ipv6_only: tuple[Namespace, Namespace]

    @property
    def reference(self) -> str:
        return f"{ECR_HOST}/{REPOSITORY}:{self.image.tag}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_netns()
    work = tmp_path_factory.mktemp("ipv6-e2e")
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        registry6 = registry_ns.add_address6()
        pusher = cluster.add("pusher", hosts={ECR_HOST: registry_ns.address})
        # two IPv6-only nodes (no IPv4 on their link), found by each other as the peers Service's AAAA records
        ipv6_only = (cluster.add("v6-a"), cluster.add("v6-b"))
        for node in ipv6_only:
            node.add_address6()
            node.remove_ipv4()
        ca = create_ca(work / "public-ca")
        image = build_image(work / "layout", tag="v1", big_layer_size=512 * 1024)
        records = {
            ECR_HOST: [registry_ns.address, registry6],
            PEERS_NAME: [node.address for node in ipv6_only],
        }
        # ":443": every address of the namespace, IPv4 and IPv6
        with Registry(registry_ns, ECR_HOST, ca, work / "registry", users={USER: PASSWORD},
                      extra_config={"http": {"addr": ":443"}}) as registry, \
                StaticDNS(registry_ns, records, work / "dns", extra_addresses=[registry6]) as dns:
            push_image(image, pusher, f"{ECR_HOST}/{REPOSITORY}:v1", ca_file=ca.cert_path, creds=CREDS)
            yield World(cluster, ca, registry, dns, registry6, image, work, ipv6_only)


def ctr_pull(node: Namespace, mirror: MirrorNode, reference: str, workdir: Path) -> None:
    with Containerd(node, workdir, ssl_cert_file=mirror.trust_bundle()) as containerd:
        done = containerd.pull(reference, user=CREDS, check=False)
        assert done.returncode == 0, (done.stdout + done.stderr).decode() + mirror.log()


def access_sources(mirror: MirrorNode, digest: str) -> list[tuple[str | None, str | None]]:
    """(source, client) of each request dnsmirror logged for ``digest``, waiting a moment for the line."""
    def logged() -> list[tuple[str | None, str | None]]:
        return [(record.get("source"), record.get("client")) for record in mirror.log_records()
                if record.get("event") == "access" and record.get("path", "").endswith(f"/blobs/{digest}")]

    deadline = time.monotonic() + 5
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.1)
    return logged()


def test_dual_stack_node_answers_a_and_aaaa_and_serves_over_both(world: World) -> None:
    node = world.cluster.add("dual")
    node6 = node.add_address6()
    overrides = {"mirror": {"address6": node6},
                 "dns": {"listen": [endpoint(node.address, 53), endpoint(node6, 53)]},
                 "https": {"listen": [endpoint(node.address, 443), endpoint(node6, 443)]}}
    with MirrorNode(node, world.work / "dual", world.dns.address, world.ca, overrides) as mirror:
        node.write_resolv_conf([node6, node.address])
        for server in (node.address, node6):
            assert node.call(resolve, server, ECR_HOST, "A") == [node.address]
            assert node.call(resolve, server, ECR_HOST, "AAAA") == [node6]
        ctr_pull(node, mirror, world.reference, world.work / "dual-containerd")
        # a client that insists on IPv6 reaches the mirror on its IPv6 address
        layer = world.image.platform("linux/amd64").layers[-1]
        done = node.run(
            [
                "curl",
                "-6",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(mirror.trust_bundle()),
                "-u",
                CREDS,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{remote_ip}",
                f"https://{ECR_HOST}/v2/{REPOSITORY}/blobs/{layer.digest}",
            ],
            check=False,
        )
        assert done.stdout.decode() == f"200 {node6}", done.stderr.decode()
        assert ("cache", node6) in access_sources(mirror, layer.digest)


def test_ipv6_only_nodes_pull_over_ipv6_from_upstream_and_from_each_other(world: World) -> None:
    nodes = world.ipv6_only
    secret = world.work / "peer-secret"
    secret.write_text(os.urandom(24).hex())
    secret.chmod(0o600)
    # the peers are found as the DaemonSet finds them: AAAA records of the Service name, over IPv6
    overrides = {
        "peers": {
            "listen": f"[::]:{PEER_PORT}",
            "dns_name": PEERS_NAME,
            "resolvers": [endpoint(world.registry6, 53)],
            "secret_file": str(secret),
            "timeout": "2s",
        }
    }
    node_a, node_b = nodes
    amd64 = world.image.platform("linux/amd64")
    with MirrorNode(node_a, world.work / "v6-a", world.registry6, world.ca, overrides) as mirror_a, \
            MirrorNode(node_b, world.work / "v6-b", world.registry6, world.ca, overrides) as mirror_b:
        for node in nodes:
            assert node.call(resolve, node.address, ECR_HOST, "AAAA") == [node.address]
            assert node.call(resolve, node.address, ECR_HOST, "A") == []  # no IPv4 to give
        def blob_gets() -> list[list[str]]:
            """For each amd64 layer, the clients of the registry's blob GETs so far."""
            return [
                [
                    entry.client
                    for entry in world.registry.access_log()
                    if entry.method == "GET"
                    and entry.path == world.registry.blob_path(REPOSITORY, layer.digest)
                ]
                for layer in amd64.layers
            ]

        before = blob_gets()
        ctr_pull(node_a, mirror_a, world.reference, world.work / "containerd-a")
        after_a = blob_gets()
        for old, new in zip(before, after_a, strict=True):
            # upstream over IPv6: one more GET per layer, from node A's IPv6 address
            assert len(new) == len(old) + 1 and node_a.address in new[-1], new
        ctr_pull(node_b, mirror_b, world.reference, world.work / "containerd-b")
        assert blob_gets() == after_a
        for layer in amd64.layers:
            assert [source for source, _ in access_sources(mirror_b, layer.digest)] == ["peer"], (
                mirror_b.log()
            )


def test_ipv4_only_node_gives_no_aaaa_for_a_captured_name(world: World, tmp_path: Path) -> None:
    node = world.cluster.add("v4-only")
    with MirrorNode(node, tmp_path / "mirror", world.dns.address, world.ca) as mirror:
        # the registry has an AAAA record; the node's resolver does not pass it on
        assert node.call(resolve, world.dns.address, ECR_HOST, "AAAA") == [world.registry6]
        assert node.call(resolve, node.address, ECR_HOST, "AAAA") == []
        assert node.call(resolve, node.address, ECR_HOST, "A") == [node.address]
        skopeo_copy(
            node,
            f"docker://{world.reference}",
            f"oci:{tmp_path / 'copy'}:v1",
            ca_file=mirror.trust_bundle(),
            src_creds=CREDS,
            all_platforms=False,
        )
