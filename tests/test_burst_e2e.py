"""The burst end to end: every node asks for the same new image at the same instant.

Five node namespaces, each with its own dnsmirror (``peers.static``: every node, one shared secret,
``peers.max_uploads: 2`` so that the cap matters among five) and its own containerd with no registry
configuration; a sixth dnsmirror node (the outsider) that is a member but pulls nothing in the bursts.
Debian's docker-registry requires a login (htpasswd) and sits behind a tc-limited link (on the registry's
side only, a fair share per node: node-to-node traffic is not limited).

- All five nodes pull a new three-layer image (~20 MiB) through the CRI at the same instant: every pull
  succeeds, the registry's access log shows exactly one GET per blob, and no node's ``/metrics`` shows
  more than ``peers.max_uploads`` concurrent uploads of one blob (sampled during the burst, and the
  high-water mark each node keeps).
- The outsider's client without a valid credential (none, or a wrong password) is refused a blob the
  five nodes hold, exactly as the registry refuses it, and no peer is asked; with the right credential it
  gets the blob from a peer.
- All five pull another new image at once and the node filling from the registry (the one the registry is
  sending the most to) is SIGKILLed mid-transfer: every other pull still succeeds.

Each test runs twice: with peer traffic in the clear (the default) and with ``peers.tls`` (burst
coordination, lookups and blob streams between nodes inside TLS).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from dns_support import wait_until
from harness import ECR_HOST, require_netns
from harness.containerd import Containerd
from harness.cri import CriError, CriImageClient
from harness.images import BuiltImage, PlatformImage, build_image, push_image
from harness.netns import Cluster, Namespace
from harness.pki import TestCA
from harness.registry import Registry
from mirror_support import MirrorNode, curl_argv, registry_upstream, scrape_metrics

pytestmark = pytest.mark.integration

REPOSITORY = "team/burst"
USER, PASSWORD = "team", "burst-team-password"
NODES = 5
PEER_PORT = 5001
MAX_UPLOADS = 2
MiB = 1 << 20
# the registry's link: the whole image takes ~1.1 s to one node alone, ~5.6 s to five nodes each
REGISTRY_RATE = 150  # Mbit/s
BIG_LAYERS = (12 * MiB, 8 * MiB)  # plus each platform's small gzip layer: three layers
# the kill scenario's link is slower, so that the victim is caught mid-transfer
KILL_RATE = 60
KILL_LAYERS = (16 * MiB, 2 * MiB)
# the most concurrent streams of one blob a node sends to peers: now (sampled during a burst), since start
UPLOADS_METRIC = "dnsmirror_peers_uploads_per_blob"
UPLOADS_MAX_METRIC = "dnsmirror_peers_uploads_per_blob_max"


@dataclass
class Node:
    namespace: Namespace
    mirror: MirrorNode
    containerd: Containerd | None


@dataclass
class World:
    cluster: Cluster
    ca: TestCA
    registry: Registry
    pusher: Namespace
    plain: Namespace  # reaches the registry without dnsmirror: how upstream itself answers
    nodes: list[Node]  # the five that pull in the bursts
    outsider: Node  # a member with its own dnsmirror, no containerd
    work: Path

    def reference(self, image: BuiltImage) -> str:
        return f"{ECR_HOST}/{REPOSITORY}:{image.tag}"

    def push(self, tag: str, big_layers: tuple[int, ...]) -> BuiltImage:
        first, *more = big_layers
        image = build_image(self.work / f"image-{tag}", tag=tag, big_layer_size=first, more_big_layers=more)
        push_image(image, self.pusher, self.reference(image), ca_file=self.ca.cert_path,
                   creds=f"{USER}:{PASSWORD}")
        return image

    def blob_gets(self, digest: str) -> int:
        return self.registry.count_requests("GET", self.registry.blob_path(REPOSITORY, digest))


def write_secret(path: Path) -> Path:
    path.write_text(os.urandom(24).hex())
    path.chmod(0o600)
    return path


def peer_overrides(node: Namespace, members: list[Namespace], secret: Path, tls: bool) -> dict:
    """The same peer list on every node (all members: a node leaves its own address out)."""
    peers = {
        "listen": f"{node.address}:{PEER_PORT}",
        "static": [f"{member.address}:{PEER_PORT}" for member in members],
        "secret_file": str(secret),
        "timeout": "2s",
        "max_uploads": MAX_UPLOADS,
        "tls": tls,
    }
    # a stopping node drains for dns.ttl + 1 s
    return {"peers": peers, "dns": {"ttl": 1}, "cache": {"max_size": "1GiB"}}


def limit_registry(registry: Registry, clients: list[str], rate_mbit: float) -> None:
    """The registry's link: ``rate_mbit`` shared fairly among the nodes (a short answer to one node does not
    wait behind another node's blob, as on a real link)."""
    registry.namespace.unlimit_egress()
    registry.namespace.limit_egress_fairly(rate_mbit, clients)


@pytest.fixture(scope="module", params=[False, True], ids=["plain-peers", "peers-tls"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_netns()
    work = tmp_path_factory.mktemp("burst-e2e")
    with Cluster() as cluster, registry_upstream(cluster, work, users={USER: PASSWORD}) as upstream, \
            contextlib.ExitStack() as stack:
        plain = cluster.add("plain", hosts={ECR_HOST: upstream.registry.address})
        members = [cluster.add(f"node-{index}") for index in range(NODES)] + [cluster.add("outsider")]
        secret = write_secret(work / "peer-secret")
        mirrors = [MirrorNode(member, work / member.role, upstream.dns, upstream.ca,
                              peer_overrides(member, members, secret, request.param)) for member in members]
        for mirror in mirrors:
            stack.callback(mirror.stop)
        with ThreadPoolExecutor(len(mirrors)) as pool:  # starting six nodes one by one would take longer
            list(pool.map(MirrorNode.start, mirrors))
        nodes = []
        for member, mirror in zip(members[:NODES], mirrors, strict=False):
            containerd = stack.enter_context(
                Containerd(member, work / f"containerd-{member.role}", ssl_cert_file=mirror.trust_bundle())
            )
            nodes.append(Node(member, mirror, containerd))
        limit_registry(upstream.registry, [member.address for member in members], REGISTRY_RATE)
        yield World(cluster, upstream.ca, upstream.registry, upstream.pusher, plain, nodes,
                    Node(members[-1], mirrors[-1], None), work)


class UploadSampler:
    """Reads every node's ``/metrics`` every 100 ms while a burst runs; keeps, per node, the highest value
    seen of each sample of :data:`UPLOADS_METRIC` (concurrent uploads of one blob)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.stop = threading.Event()
        self.peaks: dict[str, dict[str, float]] = {node.namespace.role: {} for node in nodes}
        self.scrapes = 0
        self.threads = [threading.Thread(target=node.namespace.call, args=(self._watch, node), daemon=True)
                        for node in nodes]

    def _watch(self, node: Node) -> None:
        peaks = self.peaks[node.namespace.role]
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                with urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=2) as response:
                    text = response.read().decode(errors="replace")
                self.scrapes += 1
                for line in text.splitlines():
                    if line.startswith(UPLOADS_METRIC + "{") or line.startswith(UPLOADS_METRIC + " "):
                        name, _, value = line.rpartition(" ")
                        peaks[name] = max(peaks.get(name, 0.0), float(value))
            self.stop.wait(0.1)

    def __enter__(self) -> UploadSampler:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)

    def highest(self) -> tuple[float, str]:
        """The most concurrent uploads of one blob seen on any node, and where."""
        return max(((value, f"{role}: {name}") for role, peaks in self.peaks.items()
                    for name, value in peaks.items()), default=(0.0, "no sample"))


@dataclass
class Outcome:
    node: Node
    image_id: str | None = None
    error: str | None = None
    seconds: float = 0.0


def burst(nodes: list[Node], reference: str, *, started: threading.Event | None = None) -> list[Outcome]:
    """Every node pulls ``reference`` through its containerd's CRI at the same instant (a barrier releases
    them together); ``started`` is set at that instant."""
    barrier = threading.Barrier(len(nodes), action=started.set if started is not None else None)
    outcomes = [Outcome(node) for node in nodes]

    def pull(outcome: Outcome) -> None:
        assert outcome.node.containerd is not None
        with CriImageClient(outcome.node.containerd.socket, timeout=90) as cri:
            cri.image_status(reference)  # the channel is connected before the start
            barrier.wait(30)
            began = time.monotonic()
            try:
                outcome.image_id = cri.pull_image(reference, username=USER, password=PASSWORD)
            except CriError as error:
                outcome.error = str(error)
            outcome.seconds = time.monotonic() - began

    threads = [threading.Thread(target=pull, args=(outcome,), daemon=True) for outcome in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def settled_gets(world: World, digests: list[str]) -> dict[str, int]:
    """GETs of each digest at the registry, once each is logged (a line is written after its response)."""
    wait_until(lambda: all(world.blob_gets(digest) >= 1 for digest in digests), 10)
    time.sleep(0.5)
    return {digest: world.blob_gets(digest) for digest in digests}


def explain(world: World, gets: dict[str, int]) -> str:
    """For each blob fetched upstream more than once: who fetched it, and what each node logged about it
    (its access line and anything not an access line), so that a failure says why."""
    roles = {node.namespace.address: node.namespace.role for node in [*world.nodes, world.outsider]}
    lines = [f"GETs at the registry: {gets}"]
    for digest, count in gets.items():
        if count <= 1:
            continue
        fetchers = [f"{roles.get(entry.client.rsplit(':', 1)[0], entry.client)} {entry.status} {entry.size}"
                    for entry in world.registry.access_log()
                    if entry.method == "GET" and digest in entry.path]
        lines.append(f"{digest}: fetched by {fetchers}")
        for node in [*world.nodes, world.outsider]:
            for record in node.mirror.log_records():
                if digest in str(record):
                    fields = {key: record.get(key) for key in ("time", "event", "message", "source", "host",
                                                               "status", "ms") if record.get(key) is not None}
                    lines.append(f"  {node.namespace.role}: {fields}")
    return "\n".join(lines)


def amd64_blobs(image: BuiltImage) -> PlatformImage:
    return image.platform("linux/amd64")


def test_a_burst_fetches_each_blob_once_and_no_node_uploads_above_the_cap(world: World) -> None:
    image = world.push("burst", BIG_LAYERS)
    amd64 = amd64_blobs(image)
    with UploadSampler(world.nodes + [world.outsider]) as sampler:
        outcomes = burst(world.nodes, world.reference(image))
    for outcome in outcomes:
        where = outcome.node.namespace.role
        assert outcome.error is None, f"{where}: {outcome.error}\n{outcome.node.mirror.log()}"
        assert outcome.image_id == amd64.config.digest, where
        assert outcome.node.containerd is not None and outcome.node.containerd.has_snapshot(amd64.chain_id)
    gets = settled_gets(world, [blob.digest for blob in (amd64.config, *amd64.layers)])
    assert all(count == 1 for count in gets.values()), explain(world, gets)
    assert sampler.scrapes > len(world.nodes), "the metrics were never read during the burst"
    highest, where = sampler.highest()
    # peers did upload (the metric is there and moved), and never above the cap on any node
    assert 1 <= highest <= MAX_UPLOADS, (highest, where, sampler.peaks)
    # what each node itself kept as its most concurrent uploads of one blob says the same
    peaks = {node.namespace.role: scrape_metrics(node.namespace).get(UPLOADS_MAX_METRIC, -1.0)
             for node in world.nodes}
    assert all(0 <= peak <= MAX_UPLOADS for peak in peaks.values()) and max(peaks.values()) >= 1, peaks


def http_fetch(namespace: Namespace, address: str, trust: Path, path: str, *,
               creds: str | None) -> tuple[int, bytes, str]:
    """GET ``https://ECR_HOST{path}`` sent to ``address``; (status, body, WWW-Authenticate header)."""
    headers = namespace.cluster.workdir / f"headers-{os.urandom(4).hex()}"
    try:
        options = ["-o", "-", "-D", headers, "-w", "\n%{http_code}", *(["-u", creds] if creds else [])]
        done = namespace.run(curl_argv(ECR_HOST, address, path, trust, *options, max_time=30), check=False,
                             timeout=60)
        head = headers.read_text(errors="replace") if headers.exists() else ""
    finally:
        headers.unlink(missing_ok=True)
    body, _, status = done.stdout.rpartition(b"\n")
    challenge = re.search(r"^www-authenticate: *(.*?)\r?$", head, re.IGNORECASE | re.MULTILINE)
    return int(status or 0), body, challenge.group(1) if challenge else ""


def peer_counters(world: World) -> dict[str, float]:
    """Every node's peer-served count, and the outsider's lookups and cached bytes from peers."""
    counters = {}
    for node in world.nodes:
        samples = scrape_metrics(node.namespace)
        assert samples, f"{node.namespace.role}: nothing answered on the metrics listener"
        counters[node.namespace.role] = samples.get("dnsmirror_peers_served_total", 0.0)
    samples = scrape_metrics(world.outsider.namespace)
    counters["outsider lookups"] = samples.get("dnsmirror_peers_lookups_total", 0.0)
    counters["outsider peer bytes"] = samples.get('dnsmirror_http_response_bytes_total{source="peer"}', 0.0)
    return counters


def test_a_client_without_a_valid_credential_is_refused_a_blob_the_nodes_hold(world: World) -> None:
    image = world.push("private", (2 * MiB,))
    amd64 = amd64_blobs(image)
    outcomes = burst(world.nodes, world.reference(image))
    assert all(outcome.error is None for outcome in outcomes), [o.error for o in outcomes]
    layer = amd64.layers[0]
    path = world.registry.blob_path(REPOSITORY, layer.digest)
    outsider = world.outsider
    before = peer_counters(world)
    for creds in (None, f"{USER}:wrong-password"):
        direct = http_fetch(world.plain, world.registry.address, world.ca.cert_path, path, creds=creds)
        through = http_fetch(outsider.namespace, outsider.mirror.address, outsider.mirror.trust_bundle(),
                             path, creds=creds)
        assert direct[0] == 401, direct
        assert through == direct, (creds, through, direct)
    # nobody was asked: no peer sent a byte, the outsider looked nothing up
    assert peer_counters(world) == before
    # the control: with the right credential, the outsider's client gets it from a peer, not the registry
    gets = world.blob_gets(layer.digest)
    status, body, _ = http_fetch(outsider.namespace, outsider.mirror.address, outsider.mirror.trust_bundle(),
                                 path, creds=f"{USER}:{PASSWORD}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == layer.digest.split(":", 1)[1]
    assert world.blob_gets(layer.digest) == gets
    after = peer_counters(world)
    assert after["outsider peer bytes"] >= before["outsider peer bytes"] + layer.size
    roles = [node.namespace.role for node in world.nodes]
    assert sum(after[role] for role in roles) > sum(before[role] for role in roles)


def registry_sending(world: World) -> dict[str, int]:
    """Bytes the registry has sent (and had acknowledged) on each open connection of port 443, by the
    client's ``address:port`` (``ss``)."""
    done = world.registry.namespace.run(["ss", "-tinH", "state", "established", "sport", "=", ":443"],
                                        check=False, timeout=10)
    sent: dict[str, int] = {}
    peer = None
    for line in done.stdout.decode(errors="replace").splitlines():
        endpoints = re.findall(r"\d+\.\d+\.\d+\.\d+:\d+", line)
        if endpoints and not line[:1].isspace():
            peer = endpoints[-1]  # a connection's line: local address, then the client's
            continue
        match = re.search(r"bytes_acked:(\d+)", line)  # its TCP info, on the next line
        if peer is not None and match:
            sent[peer] = int(match.group(1))
            peer = None
    return sent


def test_the_fill_holder_killed_mid_transfer_leaves_every_other_pull_succeeding(world: World) -> None:
    clients = [node.namespace.address for node in world.nodes] + [world.outsider.namespace.address]
    limit_registry(world.registry, clients, KILL_RATE)
    try:
        image = world.push("kill", KILL_LAYERS)
        amd64 = amd64_blobs(image)
        by_address = {node.namespace.address: node for node in world.nodes}
        started = threading.Event()
        victim: dict[str, object] = {}

        def kill_the_filler() -> None:
            """Once the registry has sent one node more than 4 MiB (a fill under way), SIGKILL that
            node's dnsmirror (and its containerd, whose pull cannot succeed without it)."""
            started.wait(60)
            baseline = registry_sending(world)  # pooled connections carry what earlier tests sent
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sending: dict[str, int] = {}
                for connection, acked in registry_sending(world).items():
                    address = connection.rsplit(":", 1)[0]
                    sending[address] = sending.get(address, 0) + acked - baseline.get(connection, 0)
                filler = max(sending, key=sending.__getitem__, default=None)
                if filler in by_address and sending[filler] > 4 * MiB:
                    node = by_address[filler]
                    assert node.mirror.process is not None and node.containerd is not None
                    node.mirror.process.signal(signal.SIGKILL)
                    node.containerd.process.signal(signal.SIGKILL)  # type: ignore[union-attr]
                    victim.update(node=node, sent=sending[filler])
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_the_filler, daemon=True)
        killer.start()
        outcomes = burst(world.nodes, world.reference(image), started=started)
        killer.join(5)
    finally:
        limit_registry(world.registry, clients, REGISTRY_RATE)
    assert "node" in victim, "no node was seen filling from the registry"
    assert victim["sent"] < sum(layer.size for layer in amd64.layers), "killed after its fill was complete"
    survivors = [outcome for outcome in outcomes if outcome.node is not victim["node"]]
    assert len(survivors) == NODES - 1
    for outcome in survivors:
        where = outcome.node.namespace.role
        assert outcome.error is None, f"{where}: {outcome.error}\n{outcome.node.mirror.log()}"
        assert outcome.image_id == amd64.config.digest, where
        assert outcome.node.containerd is not None and outcome.node.containerd.has_snapshot(amd64.chain_id)
