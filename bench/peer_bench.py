"""Peer benchmark: a cold blob through a node whose peer has it, against the same blob from the registry.

Everything runs in network namespaces this script creates (the end-to-end harness of ``tests/``):
Debian's docker-registry with TLS (the upstream of ``123456789012.dkr.ecr.us-east-1.amazonaws.com``),
two dnsmirror nodes A and B that are each other's peers (shared secret, ``peers.static``), and a
"direct" namespace whose /etc/hosts sends the registry's name to the registry. Each run places a new
random blob in the registry's storage and downloads it with curl (HTTP/1.1, TLS, body discarded):

1. straight from the registry (distribution serving its own storage: the reference);
2. through node B, empty cache: B asks its peer (which answers 404), then fills from the registry;
3. through node A, empty cache, while B has the blob: A fills from its peer B (A checks the client's
   access upstream with one HEAD, then streams B's copy, verifying its sha256);
4. through node A again: A's own cache (its first read, from disk: fills are written with O_DIRECT);
5. the peer transfer alone: curl in A's namespace sends B the signed GET a node sends its peers.

Steps 2, 3 and 5 again with a second pair of nodes C and D that talk TLS to each other (``peers.tls``):
curl's signed GET then presents the peers' certificate and pins theirs, as a node does.

Nothing is pinned: the registry, both nodes and curl share the machine's cores, as on one busy node.
Medians of ``--runs`` runs; also the registry's GETs of each blob (one, from step 2, when peers work).
Writes the ``peers`` section of bench/RESULTS.md.

    .venv/bin/python bench/peer_bench.py --runs 5 --blob-mib 256
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from harness import ECR_HOST  # noqa: E402
from harness.dns import StaticDNS  # noqa: E402
from harness.netns import Cluster, Namespace, netns_available  # noqa: E402
from harness.pki import create_ca  # noqa: E402
from harness.registry import Registry  # noqa: E402
from mirror_bench import Download, MiB, blob_url, download, parse_download, place_blob  # noqa: E402
from mirror_support import MirrorNode  # noqa: E402
from procstat import cpu_seconds  # noqa: E402
from results import machine, write_section  # noqa: E402

from dnsmirror.peer_tls import peer_identity  # noqa: E402
from dnsmirror.peers import AUTH_HEADER, BLOB_PATH, sign  # noqa: E402

REPOSITORY = "bench/peers"
PEER_PORT = 5001
WAYS = ("direct", "upstream", "peer", "cached", "transfer", "upstream_tls", "peer_tls", "transfer_tls")
WAY_LABELS = {
    "direct": "straight from the registry",
    "upstream": "node B, empty cache: peer asked (404), then filled from the registry",
    "peer": "node A, empty cache: filled from peer B",
    "cached": "node A again: its own cache (first read: from disk, fills bypass the page cache)",
    "transfer": "peer transfer alone: node B's peer listener (plain HTTP) to curl's signed GET in node A's "
                "namespace",
    "upstream_tls": "`peers.tls`: node D, empty cache: peer asked (404), then filled from the registry",
    "peer_tls": "`peers.tls`: node C, empty cache: filled from peer D",
    "transfer_tls": "`peers.tls`: peer transfer alone, node D's listener to curl's signed GET over TLS in "
                    "node C's namespace",
}


@dataclass
class PeerTLSFiles:
    """What curl needs to talk to a ``peers.tls`` listener as a node does: the peers' certificate and key
    (derived from the secret) to present, and the public key to pin (there is no host name to check)."""

    cert: Path
    key: Path
    pin: str


def tls_files(work: Path, secret: bytes) -> PeerTLSFiles:
    identity = peer_identity(secret)
    cert, key = work / "peer-tls.crt", work / "peer-tls.key"
    cert.write_bytes(identity.certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(identity.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    key.chmod(0o600)
    spki = identity.certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return PeerTLSFiles(cert, key, "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode())


@contextlib.contextmanager
def peer_nodes(work: Path, node_a: Namespace, node_b: Namespace, dns: str, ca, tls: bool = False):
    secret = work / f"peer-secret-{node_a.role}"
    secret.write_text(os.urandom(24).hex())
    secret.chmod(0o600)

    def overrides(node: Namespace, other: Namespace) -> dict:
        return {"peers": {"listen": f"{node.address}:{PEER_PORT}", "static": [f"{other.address}:{PEER_PORT}"],
                          "secret_file": str(secret), "tls": tls},
                "cache": {"max_size": "4GiB"}, "log": {"format": "json", "level": "warning"}}

    with MirrorNode(node_a, work / node_a.role, dns, ca, overrides(node_a, node_b)) as mirror_a, \
            MirrorNode(node_b, work / node_b.role, dns, ca, overrides(node_b, node_a)) as mirror_b:
        yield mirror_a, mirror_b, secret.read_bytes().strip()


def peer_get(namespace: Namespace, address: str, digest: str, secret: bytes, size: int,
             tls: PeerTLSFiles | None = None) -> Download:
    """A signed GET of ``digest`` from the peer listener at ``address``, the way a node asks its peers."""
    header = f"{AUTH_HEADER.decode()}: {sign(secret, 'GET', digest, time.time()).decode()}"
    scheme, tls_options = "http", []
    if tls is not None:
        # the peers' certificate both ways; its key pinned instead of a host name checked
        scheme, tls_options = "https", ["--cert", str(tls.cert), "--key", str(tls.key), "--insecure",
                                        "--pinnedpubkey", tls.pin, "--tlsv1.3"]
    argv = ["curl", "-sS", "--max-time", "300", "-H", header, "-o", "/dev/null", *tls_options,
            "-w", "%{http_code} %{size_download} %{speed_download} %{time_total}",
            f"{scheme}://{address}:{PEER_PORT}{BLOB_PATH}{digest}"]
    result = parse_download(namespace.run(argv, timeout=330).stdout)
    if result.status != 200 or result.size != size:
        raise RuntimeError(f"peer GET {digest}: status {result.status}, {result.size} of {size} bytes")
    return result


def measure(registry: Registry, direct: Namespace, ca, plain, encrypted, runs: int, size: int,
            tls: PeerTLSFiles) -> dict:
    """``plain`` and ``encrypted``: ((node A, mirror A), (node B, mirror B), secret) of each pair."""
    (node_a, mirror_a), (node_b, mirror_b), secret = plain
    (node_c, mirror_c), (node_d, mirror_d), tls_secret = encrypted
    rows: dict[str, list[Download]] = {way: [] for way in WAYS}
    cpu: dict[str, float] = {way: 0.0 for way in WAYS}
    registry_gets: list[int] = []
    # each way counts the CPU of the pair it runs on
    pids = {way: [mirror_c.process.pid, mirror_d.process.pid] if way.endswith("_tls")
            else [mirror_a.process.pid, mirror_b.process.pid] for way in WAYS}
    trust_a, trust_b = mirror_a.trust_bundle(), mirror_b.trust_bundle()
    trust_c, trust_d = mirror_c.trust_bundle(), mirror_d.trust_bundle()
    for run in range(runs + 1):  # the first run warms both nodes up and is not counted
        digest, _ = place_blob(registry, REPOSITORY, size)
        url = blob_url(digest, repository=REPOSITORY)
        # (client namespace, address curl connects to, CA file it trusts) of each way
        clients = {
            "direct": (direct, registry.address, ca.cert_path),
            "upstream": (node_b, mirror_b.address, trust_b),
            "peer": (node_a, mirror_a.address, trust_a),
            "cached": (node_a, mirror_a.address, trust_a),
            "upstream_tls": (node_d, mirror_d.address, trust_d),
            "peer_tls": (node_c, mirror_c.address, trust_c),
        }
        # the direct pull goes first in even runs and last in odd ones; the others depend on their order
        order = WAYS if run % 2 == 0 else (*WAYS[1:], WAYS[0])
        for way in order:
            before = cpu_seconds(pids[way])
            if way == "transfer":
                result = peer_get(node_a, mirror_b.address, digest, secret, size)
            elif way == "transfer_tls":
                result = peer_get(node_c, mirror_d.address, digest, tls_secret, size, tls)
            else:
                namespace, address, trust = clients[way]
                result = download(namespace, url, address, 443, trust, expected=size)
            if run:
                rows[way].append(result)
                cpu[way] += cpu_seconds(pids[way]) - before
        if run:
            path = f"/v2/{REPOSITORY}/blobs/{digest}"
            registry_gets.append(
                sum(
                    1
                    for entry in registry.access_log()
                    if entry.method == "GET"
                    and entry.path == path
                    and entry.client.rsplit(":", 1)[0] in (node_a.address, node_c.address)
                )
            )
    return {"rows": rows, "cpu": cpu, "registry_gets": registry_gets, "size": size, "runs": runs}


def report(args: argparse.Namespace, result: dict) -> str:
    size, runs = result["size"], result["runs"]
    median = {way: statistics.median(d.seconds for d in result["rows"][way]) for way in WAYS}
    lines = [
        "## Peers: a cold blob from a peer node, against the same blob from the registry",
        "",
        f"Command: `.venv/bin/python bench/peer_bench.py --runs {args.runs} --blob-mib {args.blob_mib}` "
        f"(a new {size // MiB} MiB blob per run, curl over TLS, nothing pinned: registry, two pairs of "
        "dnsmirror nodes (A and B in the clear, C and D with `peers.tls`) and curl share the cores; "
        f"medians of {runs} runs after a warm-up run; each pair's CPU counted for its own rows).",
        f"Measured: {machine()}.",
        "",
        "| way | median s | MB/s | dnsmirror CPU-s per GiB (both nodes) |",
        "|---|---:|---:|---:|",
    ]
    for way in WAYS:
        per_gib = result["cpu"][way] / runs / (size / 2**30)
        lines.append(f"| {WAY_LABELS[way]} | {median[way]:.3f} | {size / median[way] / 1e6:,.0f} | "
                     f"{per_gib:.2f} |")
    lines += [
        "",
        f"- **From a peer: {median['peer'] / median['upstream']:.0%} of the time of a fill from the "
        f"registry** "
        f"({median['peer'] / median['direct']:.0%} of a download straight from the registry; a fill from "
        f"the registry through the node: {median['upstream'] / median['direct']:.0%}).",
        f"- **Peer transfer alone (B's listener to a signed GET, no TLS): "
        f"{size / median['transfer'] / 1e6:,.0f} MB/s** (target >= 800 MB/s); A's fill from B above adds A's "
        "digest check, cache write and TLS to its client.",
        f"- **With `peers.tls`: the peer transfer alone {size / median['transfer_tls'] / 1e6:,.0f} MB/s** "
        f"({median['transfer'] / median['transfer_tls']:.0%} of the plain transfer's rate), a fill from a "
        f"peer {size / median['peer_tls'] / 1e6:,.0f} MB/s ({median['peer'] / median['peer_tls']:.0%} of "
        "the plain one's).",
        f"- Node A's and node C's GETs of each blob at the registry: {result['registry_gets']} (0: every "
        "fill of either came from its peer; each sent the registry one HEAD per blob, the client's access "
        "check).",
        "- Here the registry is a local process, so a peer saves little time; what it saves is the "
        "registry's "
        "bandwidth and request quota, one fetch per cluster instead of one per node.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blob-mib", type=int, default=256)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    reason = netns_available()
    if reason is not None:
        raise SystemExit(f"peer_bench: {reason}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="dnsmirror-peer-bench-") as tmp, \
            Cluster(Path(tmp) / "cluster") as cluster:
        work = Path(tmp)
        registry_ns = cluster.add("registry")
        direct = cluster.add("direct", hosts={ECR_HOST: registry_ns.address})
        node_a, node_b = cluster.add("node-a"), cluster.add("node-b")
        node_c, node_d = cluster.add("node-c"), cluster.add("node-d")
        ca = create_ca(work / "public-ca")
        with Registry(registry_ns, ECR_HOST, ca, work / "registry") as registry, \
                StaticDNS(registry_ns, {ECR_HOST: registry_ns.address}, work / "dns") as dns, \
                peer_nodes(work, node_a, node_b, dns.address, ca) as (mirror_a, mirror_b, secret), \
                peer_nodes(work, node_c, node_d, dns.address, ca, tls=True) as (mirror_c, mirror_d,
                                                                                   tls_secret):
            result = measure(registry, direct, ca, ((node_a, mirror_a), (node_b, mirror_b), secret),
                             ((node_c, mirror_c), (node_d, mirror_d), tls_secret), args.runs,
                             args.blob_mib * MiB, tls_files(work, tls_secret))
    body = report(args, result)
    print(body)
    if not args.no_write:
        write_section("peers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
