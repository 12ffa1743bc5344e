"""Peer nodes share cached content, with real components: dnsmirror nodes in their own network
namespaces in front of one docker-registry that requires a login (htpasswd); curl, skopeo and containerd
as clients. Three nodes with static peers:

- an image pulled with skopeo through node A, then through node B, then with containerd (no registry
  configuration) on node C: B's and C's layers and configs come from peers, each after one access check
  (a HEAD upstream with the client's credentials: reading a manifest grants nothing it names), and the
  registry serves each blob once;
- a blob pulled through node A is served to node B's client by node A, not by the registry again,
  also when B's first choice of peer is node C, which only knows that A holds it;
- a request upstream refuses (no credentials) gets upstream's 401 and never reaches a peer;
- a peer without the shared secret is refused, and its client is served from upstream;
- a cached file damaged on its holder is found before it is sent (a clean miss, served from upstream)
  and dropped there; bytes from a peer that fail verification cut the stream, the retry is served from
  upstream;
- a peer that is down costs a refused connection, then upstream serves;
- after every node restarts, the cache each one announces again is found, also when a node announces
  before its peers are up (the refused announcement is sent again).

Two nodes that find each other through ``peers.dns_name``:

- a peer killed mid-blob: the rest comes from the registry, and the client sees no break;
- nodes asking a moment apart: the second streams the first one's fill, the registry sends it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dns_support import wait_until
from harness import ECR_HOST, require_netns
from harness.containerd import Containerd
from harness.images import build_image, push_image, skopeo_copy
from harness.netns import Cluster, Namespace, Process
from harness.pki import create_ca
from harness.registry import Registry
from harness.sniff import Sniffer
from mirror_support import MirrorNode, curl_argv, scrape_metrics, upstream_dns

from dnsmirror.config import HostPort
from dnsmirror.failures import PEER_KINDS
from dnsmirror.peer_tls import peer_identity
from dnsmirror.peers import AUTH_HEADER, HOLDERS_HEADER, rendezvous, sign

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is needed (scripts/setup.sh)"),
]

REPOSITORY = "team/app"
USER, PASSWORD = "team", "s3cret-team-password"
PEER_PORT = 5001


# a peer that answers every blob request with 500,000 random bytes: right length, wrong content
LYING_PEER = """
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Liar(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "500000")
        self.end_headers()
        self.wfile.write(os.urandom(500000))
    def log_message(self, *args):
        pass
server = HTTPServer((sys.argv[1], int(sys.argv[2])), Liar)
print("listening", flush=True)
server.serve_forever()
"""


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def peer_overrides(node: Namespace, others: list[Namespace], secret: Path, lookup: int = 1) -> dict:
    return {
        "peers": {
            "listen": f"{node.address}:{PEER_PORT}",
            "static": [f"{o.address}:{PEER_PORT}" for o in others],
            "secret_file": str(secret),
            "lookup": lookup,
            "timeout": "2s",
        },
        "dns": {"ttl": 1},
    }  # a stopping node drains for ttl + 1 s


def fetch(node: Namespace, mirror: MirrorNode, digest: str, *, login: bool = True) -> tuple[int, bytes]:
    """GET a blob through ``mirror`` with curl in ``node``, trusting that node's CA; (status, body)."""
    options = ["-o", "-", "-w", "\n%{http_code}", *(["-u", f"{USER}:{PASSWORD}"] if login else [])]
    path = f"/v2/{REPOSITORY}/blobs/{digest}"
    argv = curl_argv(ECR_HOST, mirror.address, path, mirror.trust_bundle(), *options, max_time=30)
    done = node.run(argv, check=False, timeout=60)
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status or 0), body


def pull(node: Namespace, mirror: MirrorNode, reference: str) -> None:
    target = mirror.workdir / "pulled"
    skopeo_copy(node, f"docker://{reference}", f"oci:{target}:x", ca_file=mirror.trust_bundle(),
                src_creds=f"{USER}:{PASSWORD}")
    shutil.rmtree(target)


def held_by(client: Namespace, index: HostPort, digest: str, secret: Path) -> HostPort | None:
    """The holder of ``digest`` that the peer listener at ``index`` knows of (a signed HEAD, as a peer
    would send), or None."""
    auth = sign(secret.read_bytes().strip(), "HEAD", digest, time.time()).decode()
    done = client.run(["curl", "-s", "-I", "--max-time", "5", "-H", f"{AUTH_HEADER.decode()}: {auth}",
                       f"http://{index.host}:{index.port}/peer/v1/blobs/{digest}"], check=False, timeout=30)
    match = re.search(
        rf"^{HOLDERS_HEADER.decode()}: ([0-9.]+):([0-9]+)", done.stdout.decode(), re.IGNORECASE | re.MULTILINE
    )
    return HostPort(match.group(1), int(match.group(2))) if match else None


def logged_gets(registry: Registry, digest: str, expected: int) -> int:
    """GETs of ``digest`` the registry logged, once it logged ``expected`` (or after 10 s): it logs a request
    after answering it, so its line can come a moment after the client is done."""
    def count() -> int:
        return registry.count_requests("GET", registry.blob_path(REPOSITORY, digest))

    wait_until(lambda: count() >= expected, 10)
    return count()


def metric(node: Namespace, name: str) -> float:
    """One sample of the node's dnsmirror metrics; 0 when it has none yet (a label not seen so far)."""
    samples = scrape_metrics(node)
    assert samples, "nothing answered on the node's metrics listener"
    return samples.get(name, 0.0)


def sources(mirror: MirrorNode, digest: str) -> list[str]:
    """Where the mirror's access log says each request for ``digest`` was served from. The line is
    written as the response ends, so a client can be done a moment before it: wait for one."""
    def logged() -> list[str]:
        return [record.get("source") for record in mirror.log_records()
                if record.get("event") == "access" and digest in record.get("path", "")]

    wait_until(lambda: bool(logged()), 5)
    return logged()


def test_peers_share_cached_blobs_only_with_allowed_requests(tmp_path: Path) -> None:
    require_netns()
    with Cluster(tmp_path / "cluster") as cluster:
        registry_ns = cluster.add("registry")
        pusher = cluster.add("pusher", hosts={ECR_HOST: registry_ns.address})
        nodes = [cluster.add(name) for name in ("node-a", "node-b", "node-c")]
        ca = create_ca(tmp_path / "public-ca")
        secret = write_secret(tmp_path / "peer-secret", os.urandom(24).hex())
        with Registry(registry_ns, ECR_HOST, ca, tmp_path / "registry", users={USER: PASSWORD}) as registry, \
                upstream_dns(registry_ns, tmp_path / "dns", {ECR_HOST: registry_ns.address}) as dns:
            node_a, node_b, node_c = nodes
            peer_address = {node.name: HostPort(node.address, PEER_PORT) for node in nodes}

            def indexed_at_c(size: int) -> tuple[bytes, str]:
                """Random bytes whose first peer is node C both for node A's announcement and for node B's
                lookup: B can find A's copy only through what C was told."""
                while True:
                    data = os.urandom(size)
                    digest = "sha256:" + hashlib.sha256(data).hexdigest()
                    c = peer_address[node_c.name]
                    if rendezvous(digest, [peer_address[node_a.name], c])[0] == c == \
                            rendezvous(digest, [peer_address[node_b.name], c])[0]:
                        return data, digest

            data, digest = indexed_at_c(3 * 1024 * 1024)
            assert registry.place_blob(REPOSITORY, [data])[0] == digest
            blob_path = registry.blob_path(REPOSITORY, digest)
            mirrors = [MirrorNode(node, tmp_path / node.name, dns, ca,
                                  peer_overrides(node, [o for o in nodes if o is not node], secret))
                       for node in nodes]
            mirror_a, mirror_b, mirror_c = mirrors

            def announced(blob_digest: str) -> bool:
                """Node A's copy of ``blob_digest`` is known where B will look: A's announcement goes to the
                digest's first peer among B and C; B asks its own memory, then its first peer among A and
                C."""
                index = rendezvous(blob_digest, [peer_address[node_b.name], peer_address[node_c.name]])[0]
                return held_by(node_b, index, blob_digest, secret) == peer_address[node_a.name]

            try:
                for mirror in mirrors:
                    mirror.start()

                image = build_image(tmp_path / "image", tag="v1", big_layer_size=2_000_000)
                reference = f"{ECR_HOST}/{REPOSITORY}:v1"
                push_image(image, pusher, reference, ca_file=ca.cert_path, creds=f"{USER}:{PASSWORD}")
                pull(node_a, mirror_a, reference)
                # every blob A filled (all but the index, which skopeo reads by tag) is announced
                assert wait_until(lambda: all(announced(blob.digest) for blob in image.blobs()[1:]), 10)
                pull(node_b, mirror_b, reference)

                def access_checks(blob) -> int:
                    """HEADs for ``blob`` by digest from the nodes (the pusher's HEADs looked for blobs to
                    skip)."""
                    manifest = blob.media_type.endswith("manifest.v1+json")
                    path = (registry.manifest_path if manifest else registry.blob_path)(
                        REPOSITORY, blob.digest
                    )
                    return sum(
                        1
                        for entry in registry.access_log()
                        if (entry.method, entry.path) == ("HEAD", path)
                        and entry.client.rsplit(":", 1)[0] in {node.address for node in nodes}
                    )

                for blob in image.blobs():
                    if blob.media_type.endswith(("manifest.v1+json", "index.v1+json")):
                        # skopeo asks for the index by tag (pass-through, which grants it), and nodes with
                        # peers
                        # check each platform manifest before they look for it at peers: A's fill and B's
                        assert access_checks(blob) == (0 if blob is image.index else 2), blob
                        continue
                    assert registry.count_requests("GET", registry.blob_path(REPOSITORY, blob.digest)) == 1, (
                        blob
                    )
                    assert sources(mirror_b, blob.digest) == ["peer"], blob
                    assert access_checks(blob) == 2, blob  # one by node A before its fill, one by node B
                # containerd on node C, no registry configuration: its layers come from the peers too
                amd64 = image.platform("linux/amd64")
                with Containerd(
                    node_c, tmp_path / "containerd-c", ssl_cert_file=mirror_c.trust_bundle()
                ) as ctr:
                    done = ctr.pull(reference, user=f"{USER}:{PASSWORD}", check=False)
                    assert done.returncode == 0, done.stderr[-2000:]
                    assert ctr.has_snapshot(amd64.chain_id)
                for blob in (amd64.config, *amd64.layers):
                    assert registry.count_requests("GET", registry.blob_path(REPOSITORY, blob.digest)) == 1, (
                        blob
                    )
                    assert sources(mirror_c, blob.digest) == ["peer"], blob
                # node C checked the platform manifest, the config and each layer once (the index was granted
                # by containerd's own HEAD of the tag)
                for blob in (amd64.manifest, amd64.config, *amd64.layers):
                    assert access_checks(blob) == 3, blob
                assert access_checks(image.index) == 0

                served = metric(node_a, "dnsmirror_peers_served_total")
                peer_bytes = metric(node_b, 'dnsmirror_http_response_bytes_total{source="peer"}')
                upstream_bytes = metric(node_b, 'dnsmirror_http_response_bytes_total{source="upstream"}')
                assert fetch(node_a, mirror_a, digest) == (200, data)
                assert logged_gets(registry, digest, 1) == 1
                # A announces its copy to the digest's first peer (C); B asks C, is told A has it, asks A
                assert wait_until(lambda: announced(digest), 10)
                assert fetch(node_b, mirror_b, digest) == (200, data)
                assert registry.count_requests("GET", blob_path) == 1, "node B went to the registry"
                assert sources(mirror_b, digest) == ["peer"]
                assert metric(node_a, "dnsmirror_peers_served_total") == served + 1
                # node B's metrics counted the bytes as the peer's, none as upstream's
                assert metric(
                    node_b, 'dnsmirror_http_response_bytes_total{source="peer"}'
                ) >= peer_bytes + len(data)
                assert (
                    metric(node_b, 'dnsmirror_http_response_bytes_total{source="upstream"}') == upstream_bytes
                )

                # no credentials: upstream refuses, and the peers are never asked
                served_before = metric(node_a, "dnsmirror_peers_served_total")
                lookups_before = metric(node_b, "dnsmirror_peers_lookups_total")
                second = os.urandom(100_000)
                second_digest = registry.place_blob(REPOSITORY, [second])[0]
                assert fetch(node_a, mirror_a, second_digest) == (200, second)
                assert wait_until(lambda: announced(second_digest), 10)  # a peer would find A's copy
                status, _ = fetch(node_b, mirror_b, second_digest, login=False)
                assert status == 401
                status, _ = fetch(node_c, mirror_c, second_digest, login=False)
                assert status == 401
                assert metric(node_a, "dnsmirror_peers_served_total") == served_before
                assert metric(node_b, "dnsmirror_peers_lookups_total") == lookups_before

                # a cached file damaged on its holder: the holder checks it before sending, drops it and
                # answers 404, so node B's client is served from upstream without a break
                third = os.urandom(500_000)
                third_digest = registry.place_blob(REPOSITORY, [third])[0]
                assert fetch(node_a, mirror_a, third_digest) == (200, third)
                assert wait_until(lambda: announced(third_digest), 10)
                hex_digest = third_digest.split(":", 1)[1]
                cached = tmp_path / node_a.name / "cache" / "blobs" / "sha256" / hex_digest[:2] / hex_digest
                wait_until(cached.exists, 10)  # the durable commit follows the client's last byte
                cached.write_bytes(bytes(byte ^ 0xFF for byte in cached.read_bytes()))
                gets_before = logged_gets(registry, third_digest, 1)
                served_before = metric(node_a, "dnsmirror_peers_served_total")
                assert fetch(node_b, mirror_b, third_digest) == (200, third)
                assert logged_gets(registry, third_digest, gets_before + 1) == gets_before + 1
                assert sources(mirror_b, third_digest) == ["upstream"]
                assert not cached.exists(), "the holder kept a file that failed its digest"
                assert metric(node_a, "dnsmirror_peers_damaged_total") == 1
                assert metric(node_a, "dnsmirror_peers_served_total") == served_before
                assert wait_until(lambda: any(r.get("event") == "cache_failure" and r.get("kind") == "damaged"
                                              for r in mirror_a.log_records()), 5)

                # after a restart of every node, A's cache is announced again (in a batch), and found
                sixth, sixth_digest = indexed_at_c(400_000)
                assert registry.place_blob(REPOSITORY, [sixth])[0] == sixth_digest
                assert fetch(node_a, mirror_a, sixth_digest) == (200, sixth)
                for mirror in mirrors:
                    mirror.stop()
                # node A comes back first and announces before its peers are up (as in a rolling restart):
                # that announcement is refused, and sent again once they listen
                mirror_a.start()
                assert wait_until(lambda: any(r.get("event") == "announcement_failed" and r.get("retry")
                                              for r in mirror_a.log_records()), 30)
                for mirror in (mirror_b, mirror_c):
                    mirror.start()
                assert wait_until(lambda: announced(sixth_digest), 60)
                assert fetch(node_b, mirror_b, sixth_digest) == (200, sixth)
                assert registry.count_requests("GET", registry.blob_path(REPOSITORY, sixth_digest)) == 1
                assert sources(mirror_b, sixth_digest) == ["peer"]
            finally:
                for mirror in mirrors:
                    mirror.stop()

            # a node with another secret is refused by its peers and served by upstream
            outsider_secret = write_secret(tmp_path / "other-secret", os.urandom(24).hex())
            fourth = os.urandom(200_000)
            fourth_digest = registry.place_blob(REPOSITORY, [fourth])[0]
            with (
                MirrorNode(
                    node_a, tmp_path / "a-again", dns, ca, peer_overrides(node_a, [node_b], secret)
                ) as again_a,
                MirrorNode(
                    node_b, tmp_path / "outsider", dns, ca, peer_overrides(node_b, [node_a], outsider_secret)
                ) as outsider,
            ):
                assert fetch(node_a, again_a, fourth_digest) == (200, fourth)
                assert fetch(node_b, outsider, fourth_digest) == (200, fourth)
                assert logged_gets(registry, fourth_digest, 2) == 2
                assert metric(node_a, "dnsmirror_peers_refused_total") >= 1
                assert sources(outsider, fourth_digest) == ["upstream"]

            # bytes from a peer that do not match the digest (a peer that lies): the stream is cut, the
            # retry goes upstream
            third_again = os.urandom(500_000)
            third_again_digest = registry.place_blob(REPOSITORY, [third_again])[0]
            liar = node_a.start(
                [sys.executable, "-c", LYING_PEER, node_a.address, str(PEER_PORT)], "lying-peer"
            )
            liar.wait_until(lambda: "listening" in liar.stdout(), "the lying peer listening", timeout=20)
            with MirrorNode(
                node_b, tmp_path / "lied-to", dns, ca, peer_overrides(node_b, [node_a], secret)
            ) as lied_to:
                status, body = fetch(node_b, lied_to, third_again_digest)
                assert (status, body) != (200, third_again), "a body that failed verification was served"
                assert fetch(node_b, lied_to, third_again_digest) == (200, third_again)
                assert wait_until(
                    lambda: any(r.get("event") == "peer_failure" for r in lied_to.log_records()), 5
                )
                peer_errors = sum(
                    metric(node_b, f'dnsmirror_peer_errors_total{{kind="{kind}"}}') for kind in PEER_KINDS
                )
                assert peer_errors >= 1
            liar.stop(timeout=10)

            # a peer that is down: refused connection, then upstream
            fifth = os.urandom(200_000)
            fifth_digest = registry.place_blob(REPOSITORY, [fifth])[0]
            with MirrorNode(
                node_b, tmp_path / "alone", dns, ca, peer_overrides(node_b, [node_a], secret)
            ) as alone:
                assert fetch(node_b, alone, fifth_digest) == (200, fifth)
                assert sources(alone, fifth_digest) == ["upstream"]
                assert metric(node_b, "dnsmirror_peers_failures_total") == 1


@dataclass
class Pair:
    """Two peer nodes in front of one registry that requires a login."""

    registry: Registry
    registry_ns: Namespace
    node_a: Namespace
    node_b: Namespace
    mirror_a: MirrorNode
    mirror_b: MirrorNode
    secret: bytes


PEERS_NAME = "dnsmirror-peers.dnsmirror.svc.cluster.local"


@contextlib.contextmanager
def two_nodes(tmp_path: Path, tls: tuple[bool, bool] = (False, False)) -> Iterator[Pair]:
    """Nodes that find each other the way the DaemonSet does: ``peers.dns_name``, whose A records (served
    by the world's DNS, named in ``peers.resolvers``) are both nodes, each leaving itself out. ``tls``:
    ``peers.tls`` of node A and of node B."""
    require_netns()
    tmp_path.mkdir(parents=True, exist_ok=True)
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        node_a, node_b = cluster.add("node-a"), cluster.add("node-b")
        ca = create_ca(tmp_path / "public-ca")
        secret = write_secret(tmp_path / "peer-secret", os.urandom(24).hex())
        names = {ECR_HOST: registry_ns.address, PEERS_NAME: [node_a.address, node_b.address]}

        def discovering(node: Namespace, dns: str, peer_tls: bool) -> dict:
            overrides = peer_overrides(node, [], secret)
            overrides["peers"].update(dns_name=PEERS_NAME, resolvers=[f"{dns}:53"], tls=peer_tls)
            return overrides

        with Registry(registry_ns, ECR_HOST, ca, tmp_path / "registry", users={USER: PASSWORD}) as registry, \
                upstream_dns(registry_ns, tmp_path / "dns", names) as dns, \
                MirrorNode(node_a, tmp_path / "a", dns, ca, discovering(node_a, dns, tls[0])) as mirror_a, \
                MirrorNode(node_b, tmp_path / "b", dns, ca, discovering(node_b, dns, tls[1])) as mirror_b:
            yield Pair(registry, registry_ns, node_a, node_b, mirror_a, mirror_b, secret.read_bytes().strip())


def start_download(node: Namespace, mirror: MirrorNode, digest: str, out: Path, *options: str) -> Process:
    """curl fetching a blob through ``mirror`` into ``out``, in the background."""
    path = f"/v2/{REPOSITORY}/blobs/{digest}"
    argv = curl_argv(ECR_HOST, mirror.address, path, mirror.trust_bundle(), *options,
                     "-u", f"{USER}:{PASSWORD}", "-o", str(out))
    return node.start(argv, f"download-{out.name}")


def test_a_peer_that_dies_mid_blob_is_finished_from_upstream(tmp_path: Path) -> None:
    """Node B's client reads slowly from a fill fed by node A; A is killed mid-transfer; B asks the
    registry for the rest (one 206) and its client receives every byte, verified, without a break."""
    with two_nodes(tmp_path) as world:
        # large against what sits between A and B's client when A dies (socket buffers on both hops and B's
        # 4 MiB pacing window: 21 to 25 MiB seen), so that most of it is still to come from upstream
        data = os.urandom(64 * 1024 * 1024)
        digest = world.registry.place_blob(REPOSITORY, [data])[0]
        path = world.registry.blob_path(REPOSITORY, digest)
        assert fetch(world.node_a, world.mirror_a, digest) == (200, data)
        assert wait_until(
            lambda: metric(world.node_b, "dnsmirror_peers_announcements_received_total") >= 1, 10
        )

        out = tmp_path / "slow-download"
        # ~8 s at 8 MB/s: the fill from A goes at this client's pace, so A dies with most of it unsent
        client = start_download(world.node_b, world.mirror_b, digest, out, "--limit-rate", "8M")
        try:
            assert wait_until(lambda: out.exists() and out.stat().st_size > 2 * 1024 * 1024, 20)
            world.mirror_a.process.signal(signal.SIGKILL)
            assert client.popen.wait(60) == 0, client.describe(20)
        finally:
            client.stop()
        assert out.read_bytes() == data
        # logged once answered
        wait_until(lambda: world.registry.count_requests("GET", path, status=206) >= 1, 10)
        assert world.registry.count_requests("GET", path, status=200) == 1  # node A's fill
        assert world.registry.count_requests("GET", path, status=206) == 1  # the rest, for node B
        assert sources(world.mirror_b, digest) == ["peer"]
        assert metric(world.node_b, "dnsmirror_content_peer_resumes_total") == 1


def test_nodes_pulling_a_new_blob_a_moment_apart_share_one_upstream_fetch(tmp_path: Path) -> None:
    """A slow registry (1.25 MB/s); node A starts filling a blob; node B's client asks while A's fill is
    still under way: B streams A's growing fill instead of fetching it from the registry again."""
    with two_nodes(tmp_path) as world:
        data = os.urandom(8 * 1024 * 1024)
        digest = world.registry.place_blob(REPOSITORY, [data])[0]
        world.registry_ns.limit_egress("10mbit")  # ~7 s for this blob: time to ask while it fills
        out = tmp_path / "from-a"
        client_a = start_download(world.node_a, world.mirror_a, digest, out)
        try:
            # A announces its fill when it starts; B asks while it runs
            assert wait_until(
                lambda: metric(world.node_b, "dnsmirror_peers_announcements_received_total") >= 1, 20
            )
            assert client_a.alive(), "the fill ended before node B could ask: the registry is too fast"
            assert fetch(world.node_b, world.mirror_b, digest) == (200, data)
            assert client_a.popen.wait(60) == 0, client_a.describe(20)
        finally:
            client_a.stop()
        assert out.read_bytes() == data
        assert world.registry.count_requests("GET", world.registry.blob_path(REPOSITORY, digest)) == 1
        assert sources(world.mirror_b, digest) == ["peer"]
        assert metric(world.node_a, "dnsmirror_peers_served_while_filling_total") == 1


def test_with_peers_tls_a_blob_crosses_between_nodes_encrypted(tmp_path: Path) -> None:
    """Node B's client gets a blob node A cached, from node A, with and without ``peers.tls``; a packet
    socket on node B's interface keeps every frame (node A sends at 100 Mbit/s, so that none is dropped),
    then looks for 64 pieces of the blob in them. In the clear (the control: it shows the sniffer sees the
    transfer) most pieces are found; with TLS none is, though as many bytes passed."""
    data = os.urandom(8 * 1024 * 1024)
    pieces = [data[offset:offset + 32] for offset in range(4096, len(data) - 32, len(data) // 64)][:64]
    seen = {}
    for tls in (False, True):
        with two_nodes(tmp_path / ("tls" if tls else "plain"), tls=(tls, tls)) as world:
            digest = world.registry.place_blob(REPOSITORY, [data])[0]
            assert fetch(world.node_a, world.mirror_a, digest) == (200, data)
            assert wait_until(
                lambda: metric(world.node_b, "dnsmirror_peers_announcements_received_total") >= 1, 10
            )
            world.node_a.limit_egress("100mbit")
            with Sniffer(world.node_b, pieces) as sniffer:
                assert fetch(world.node_b, world.mirror_b, digest) == (200, data)
            assert sources(world.mirror_b, digest) == ["peer"]
            assert logged_gets(world.registry, digest, 1) == 1  # node A's fill only
            seen[tls] = sniffer
    plain, encrypted = seen[False], seen[True]
    assert len(plain.found) >= len(pieces) // 2, (len(plain.found), plain.frames, plain.dropped)
    assert encrypted.bytes > len(data) and encrypted.dropped == 0, (encrypted.bytes, encrypted.dropped)
    assert encrypted.found == set(), sorted(encrypted.found)


def test_nodes_that_disagree_on_peers_tls_miss_each_other_and_pull_from_upstream(tmp_path: Path) -> None:
    """Node A with ``peers.tls``, node B without (a rolling change half done): B's request to A fails, and
    B's client is served from the registry, as without peers. B counts a failed peer, A a connection that
    failed its TLS handshake (and logs what to check)."""
    with two_nodes(tmp_path, tls=(True, False)) as world:
        data = os.urandom(1024 * 1024)
        digest = world.registry.place_blob(REPOSITORY, [data])[0]
        assert fetch(world.node_a, world.mirror_a, digest) == (200, data)
        # B asks A first: no announcement from A arrives, so the lookup goes to A by rendezvous order
        assert fetch(world.node_b, world.mirror_b, digest) == (200, data)
        assert sources(world.mirror_b, digest) == ["upstream"]
        assert logged_gets(world.registry, digest, 2) == 2
        assert wait_until(lambda: metric(world.node_b, "dnsmirror_peers_failures_total") >= 1, 10)
        assert wait_until(lambda: metric(world.node_a, 'dnsmirror_peer_errors_total{kind="tls"}') >= 1, 10)
        reported = [record for record in world.mirror_a.log_records()
                    if record.get("event") == "peer_failure" and record.get("kind") == "tls"]
        assert reported and world.node_b.address in reported[0]["reason"], reported
        assert "peers.tls" in reported[0]["reason"]
        # each node says at start which it runs: the certificate's fingerprint (one per secret) or off

        def started_with(mirror: MirrorNode) -> str:
            return next(r["tls"] for r in mirror.log_records() if r.get("message") == "peers listening")

        assert started_with(world.mirror_b) == "off"
        assert started_with(world.mirror_a) == peer_identity(world.secret).fingerprint[:16]
        # and a dashboard sees it: the nodes of a half-done rollout differ here
        assert metric(world.node_a, "dnsmirror_peers_tls") == 1
        assert metric(world.node_b, "dnsmirror_peers_tls") == 0


def test_a_host_flooding_a_peer_listener_is_held_back_and_others_are_still_served(tmp_path: Path) -> None:
    """A third host opens connections to node A's peer port (TLS) from eight threads for 4 s; A takes at
    most its burst (100) and then 20 a second from that address and closes the rest at accept, before any
    TLS work, while node B's client gets a blob from A as a peer. (The accept queue is deep: with the 50
    of Twisted's default the kernel dropped connection attempts, and each waited a second.)"""
    with two_nodes(tmp_path, tls=(True, True)) as world:
        data = os.urandom(4 * 1024 * 1024)
        digest = world.registry.place_blob(REPOSITORY, [data])[0]
        assert fetch(world.node_a, world.mirror_a, digest) == (200, data)
        assert wait_until(
            lambda: metric(world.node_b, "dnsmirror_peers_announcements_received_total") >= 1, 10
        )
        stop = time.monotonic() + 4.0
        attempts: list[str] = []

        def flood() -> None:  # in the registry's namespace: another address than either node
            while time.monotonic() < stop:
                try:
                    with socket.create_connection((world.node_a.address, PEER_PORT), timeout=5) as sock:
                        sock.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a TLS record, then gone
                    attempts.append("sent")
                except OSError as exc:
                    attempts.append(type(exc).__name__)

        flooders = [threading.Thread(target=world.registry_ns.call, args=(flood,)) for _ in range(8)]
        for flooder in flooders:
            flooder.start()
        try:
            time.sleep(1.0)
            assert fetch(world.node_b, world.mirror_b, digest) == (200, data)
        finally:
            for flooder in flooders:
                flooder.join(10)
        assert sources(world.mirror_b, digest) == ["peer"]
        refused = metric(world.node_a, "dnsmirror_peers_connections_refused_total")
        outcomes = {outcome: attempts.count(outcome) for outcome in set(attempts)}
        # taken from that address: the burst (100), then 20 a second, over at most 5 s
        assert len(attempts) > 1000 and refused >= len(attempts) - 200, (outcomes, refused)


def doctor_says_of_peers(node: Namespace, config: Path) -> str:
    """The ``peers`` line of ``dnsmirror doctor`` run in ``node`` with ``config`` (with its fix, if any)."""
    done = node.run([sys.executable, "-m", "dnsmirror", "doctor", "--config", str(config)], check=False,
                    timeout=120)
    lines = done.stdout.decode().splitlines()
    found = [index for index, line in enumerate(lines) if line[5:].startswith("peers ")]
    assert found, done.stdout.decode()[-3000:]
    shown = lines[found[0]]
    if found[0] + 1 < len(lines) and "fix:" in lines[found[0] + 1]:
        shown += "\n" + lines[found[0] + 1]
    return shown


def test_doctor_tells_which_peers_cannot_talk_to_a_node_and_why(tmp_path: Path) -> None:
    """``dnsmirror doctor`` signs a request to every peer as the node would: it names the peers of another
    ``peers.tls`` (either way) or another secret (plain: refused with 401; TLS: the handshake fails), warns
    of one it cannot reach, and passes when they agree (plain, and over TLS)."""
    with two_nodes(tmp_path, tls=(True, False)) as world:
        said = doctor_says_of_peers(world.node_a, world.mirror_a.config_path)  # A with TLS asks plain B
        assert said.startswith("FAIL") and "may run without peers.tls" in said, said
        assert world.node_b.address in said
        assert "the same peers.tls" in said
        said = doctor_says_of_peers(world.node_b, world.mirror_b.config_path)  # plain B asks A with TLS
        assert said.startswith("FAIL") and "may run with peers.tls" in said, said

        def variant(name: str, **peers: object) -> Path:
            document = yaml.safe_load(world.mirror_a.config_path.read_text())
            document["peers"].update(peers)
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(document))
            return path

        other_secret = write_secret(tmp_path / "other-secret", os.urandom(24).hex())
        said = doctor_says_of_peers(world.node_a,
                                    variant("other-secret", tls=False, secret_file=str(other_secret)))
        assert said.startswith("FAIL") and "refused the signature (401)" in said, said
        said = doctor_says_of_peers(world.node_a, variant("agreeing", tls=False))
        assert said.startswith("ok") and "every one answered" in said, said
        # B's node with A's setting: its doctor asks A over TLS, and A answers
        with_tls = tmp_path / "b-with-tls.yaml"
        document = yaml.safe_load(world.mirror_b.config_path.read_text())
        document["peers"]["tls"] = True
        with_tls.write_text(yaml.safe_dump(document))
        said = doctor_says_of_peers(world.node_b, with_tls)
        assert said.startswith("ok") and "over TLS" in said, said
        # and with another secret, the handshake itself fails: each side rejects the other's certificate
        document["peers"]["secret_file"] = str(other_secret)
        with_tls.write_text(yaml.safe_dump(document))
        said = doctor_says_of_peers(world.node_b, with_tls)
        assert said.startswith("FAIL") and "TLS handshake failed" in said, said
        said = doctor_says_of_peers(world.node_a, variant(
            "nobody-there", tls=False, dns_name=None, static=[f"{world.registry_ns.address}:{PEER_PORT}"]))
        assert said.startswith("warn") and "not reachable" in said and f"allow TCP {PEER_PORT}" in said, said
