"""The pull mirror end to end: real containerd, skopeo and docker-registry, no containerd registry config.

A TLS docker-registry (certificate from a test "public" CA) serves a multi-arch image in one
namespace; dnsmirror runs in the node namespace, whose resolv.conf points at dnsmirror; containerd
runs there with an empty ``config_path`` and trusts the public CA plus dnsmirror's root. Pulls go
through dnsmirror only because of DNS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dns_support import wait_until
from harness import ECR_HOST, require_netns
from harness.containerd import Containerd
from harness.cri import CriImageClient
from harness.images import BuiltImage, build_image, push_image, skopeo, skopeo_copy
from harness.netns import Cluster, Namespace
from harness.pki import TestCA
from harness.registry import Registry
from mirror_support import MirrorNode, registry_upstream, scrape_metrics

pytestmark = pytest.mark.integration

REPOSITORY = "team/app"


@dataclass
class Setup:
    cluster: Cluster
    ca: TestCA
    registry: Registry
    mirror: MirrorNode
    node: Namespace
    image: BuiltImage
    work: Path

    @property
    def reference(self) -> str:
        return f"{ECR_HOST}/{REPOSITORY}:{self.image.tag}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_netns()
    work = tmp_path_factory.mktemp("mirror-e2e")
    with Cluster() as cluster, registry_upstream(cluster, work) as upstream:
        node = cluster.add("node")
        image = build_image(work / "layout", tag="v1", big_layer_size=3 * 1024 * 1024)
        push_image(image, upstream.pusher, f"{ECR_HOST}/{REPOSITORY}:v1", ca_file=upstream.ca.cert_path)
        with MirrorNode(node, work / "mirror", upstream.dns, upstream.ca) as mirror:
            yield Setup(cluster, upstream.ca, upstream.registry, mirror, node, image, work)


def blob_gets(setup: Setup, digest: str) -> int:
    return setup.registry.count_requests("GET", setup.registry.blob_path(REPOSITORY, digest), status=200)


def scrape(setup: Setup) -> dict[str, float]:
    """The node's dnsmirror /metrics as {sample with labels: value}."""
    samples = scrape_metrics(setup.node)
    assert samples, "nothing answered on the node's metrics listener"
    return samples


def served_bytes(samples: dict[str, float], source: str) -> float:
    return samples.get(f'dnsmirror_http_response_bytes_total{{source="{source}"}}', 0.0)


def test_ctr_pull_through_the_mirror_unpacks(setup: Setup, tmp_path: Path) -> None:
    amd64 = setup.image.platform("linux/amd64")
    before = scrape(setup)
    with Containerd(
        setup.node, tmp_path / "containerd", ssl_cert_file=setup.mirror.trust_bundle()
    ) as containerd:
        result = containerd.pull(setup.reference, check=False)
        assert result.returncode == 0, (result.stdout + result.stderr).decode() + setup.mirror.log()
        assert containerd.has_snapshot(amd64.chain_id)
        assert amd64.files["etc/dnsmirror-test/platform"] in containerd.unpacked_files(
            "etc/dnsmirror-test/platform"
        )
    for layer in amd64.layers:
        assert blob_gets(setup, layer.digest) == 1
    # the connection was dnsmirror's: the registry saw the node's mirror as its client
    assert any(entry.client.startswith(setup.mirror.address) for entry in setup.registry.access_log())
    # the metrics saw the layers come from upstream (first pull), none from the cache
    after = scrape(setup)
    layer_bytes = sum(layer.size for layer in amd64.layers)
    assert served_bytes(after, "upstream") - served_bytes(before, "upstream") >= layer_bytes
    assert served_bytes(after, "cache") - served_bytes(before, "cache") < layer_bytes
    assert after['dnsmirror_http_requests_total{method="GET",source="upstream",status_class="2xx"}'] >= len(
        amd64.layers
    )


def test_cri_pull_is_served_from_the_cache(setup: Setup, tmp_path: Path) -> None:
    amd64 = setup.image.platform("linux/amd64")
    before = scrape(setup)
    with (
        Containerd(
            setup.node, tmp_path / "containerd", ssl_cert_file=setup.mirror.trust_bundle()
        ) as containerd,
        CriImageClient(containerd.socket, timeout=120) as cri,
    ):
        assert cri.pull_image(setup.reference) == amd64.config.digest
        assert containerd.has_snapshot(amd64.chain_id)
    for layer in amd64.layers:
        assert blob_gets(setup, layer.digest) == 1  # still only the first pull's GET
    # the counters moved for the cache only
    after = scrape(setup)
    layer_bytes = sum(layer.size for layer in amd64.layers)
    assert served_bytes(after, "cache") - served_bytes(before, "cache") >= layer_bytes
    assert served_bytes(after, "upstream") == served_bytes(before, "upstream")
    # the pull report: one line for this image, every blob from the cache
    image = f"{ECR_HOST}/{REPOSITORY}@{amd64.manifest.digest}"
    reports = [r for r in setup.mirror.log_records() if r.get("event") == "pull" and r.get("image") == image]
    assert reports, setup.mirror.log()
    report = reports[-1]
    assert report["outcome"] == "complete" and report["source_mix"] == "cache", report
    assert report["blobs"] == report["blobs_sent"] == len(amd64.layers) + 1
    assert report["bytes_cache"] >= layer_bytes + amd64.config.size and report["bytes_upstream"] == 0
    assert 0 <= report["first_byte_s"] <= report["seconds"] < 120
    assert after['dnsmirror_image_pulls_total{outcome="complete"}'] >= 1
    assert after['dnsmirror_image_pull_seconds_count{source_mix="cache"}'] >= 1


def test_skopeo_copy_from_and_push_to_the_captured_host(setup: Setup, tmp_path: Path) -> None:
    trust = setup.mirror.trust_bundle()
    skopeo_copy(setup.node, f"docker://{setup.reference}", f"oci:{tmp_path / 'copy'}:v1", ca_file=trust)
    pushed = build_image(tmp_path / "pushed", tag="v2", platforms=("linux/amd64",))
    push_image(pushed, setup.node, f"{ECR_HOST}/team/pushed:v2", ca_file=trust)
    raw = skopeo(
        setup.node, ["inspect", "--raw", f"docker://{ECR_HOST}/team/pushed:v2"], ca_file=trust
    ).stdout
    assert raw == pushed.index.read()
    path = setup.registry.manifest_path("team/pushed", "v2")
    assert setup.registry.count_requests("PUT", path, status=201) == 1
    # the push's bodies went upstream as they arrived, not spooled first
    streamed = scrape(setup)["dnsmirror_streamed_request_bodies_total"]
    # layer chunks (PATCH) and manifests (PUT) carry bodies; the PUT that closes a blob upload is empty
    bodies = [
        entry
        for entry in setup.registry.access_log()
        if entry.path.startswith("/v2/team/pushed/")
        and (entry.method == "PATCH" or (entry.method == "PUT" and "/manifests/" in entry.path))
    ]
    assert bodies and streamed >= len(bodies)


def test_pulls_by_digest_and_tag_survive_a_stopped_upstream(setup: Setup, tmp_path: Path) -> None:
    amd64 = setup.image.platform("linux/amd64")
    by_digest = f"{ECR_HOST}/{REPOSITORY}@{setup.image.index.digest}"
    setup.registry.stop()
    for name, reference in (("by-digest", by_digest), ("by-tag", setup.reference)):
        with Containerd(setup.node, tmp_path / name, ssl_cert_file=setup.mirror.trust_bundle()) as containerd:
            result = containerd.pull(reference, check=False)
            assert result.returncode == 0, (result.stdout + result.stderr).decode() + setup.mirror.log()
            assert containerd.has_snapshot(amd64.chain_id)
    output = setup.mirror.process.stdout() + setup.mirror.process.stderr()
    # the tag was answered from the last digest upstream gave, not by upstream
    assert '"event": "stale_tag"' in output
    # a credential upstream never allowed gets nothing from the cache while upstream cannot be asked
    stranger = setup.node.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            str(setup.mirror.trust_bundle()),
            "-H",
            "Authorization: Basic c3RyYW5nZXI6cGFzc3dvcmQ=",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            f"https://{ECR_HOST}/v2/{REPOSITORY}/blobs/{amd64.layers[0].digest}",
        ],
        check=False,
    )
    body, _, status = stranger.stdout.rpartition(b"\n")
    assert status == b"502" and b"UNAVAILABLE" in body and amd64.layers[0].read()[:64] not in body
    # why upstream failed is logged at warning with host, repository and kind, and counted by kind
    failed = [r for r in setup.mirror.log_records() if r.get("event") == "upstream_failure"
              and r.get("repository") == REPOSITORY]
    assert failed and failed[-1]["level"] == "warning" and failed[-1]["host"] == ECR_HOST, setup.mirror.log()
    assert failed[-1]["kind"] in ("connect", "connect_timeout"), failed[-1]
    assert "authorization" not in str(failed).lower() and "c3RyYW5nZXI" not in str(failed)
    errors = scrape(setup)
    assert errors[f'dnsmirror_upstream_errors_total{{kind="{failed[-1]["kind"]}"}}'] >= 1
    # every access line names its source, a refused blob read included
    accesses = [r for r in setup.mirror.log_records() if r.get("event") == "access"]
    assert accesses and all(r["source"] for r in accesses)


def fetch_blob(
    namespace: Namespace, trust: Path, digest: str, repository: str = REPOSITORY
) -> tuple[int, bytes]:
    """GET a blob by digest with curl inside ``namespace`` (DNS sends it to that node's dnsmirror)."""
    result = namespace.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            str(trust),
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            f"https://{ECR_HOST}/v2/{repository}/blobs/{digest}",
        ],
        check=False,
    )
    body, _, status = result.stdout.rpartition(b"\n")
    return int(status or 0), body


def test_containerd_content_store_is_a_verified_read_only_source(setup: Setup, tmp_path: Path) -> None:
    """A second node whose containerd already holds a layer serves it without fetching it upstream; a
    damaged copy there is caught by the digest check and fetched upstream instead."""
    arm64 = setup.image.platform("linux/arm64")
    good, damaged = arm64.layers[-1], arm64.config
    content = tmp_path / "containerd-content"
    (content / "blobs" / "sha256").mkdir(parents=True)
    (content / "blobs" / "sha256" / good.digest[7:]).write_bytes(good.read())
    (content / "blobs" / "sha256" / damaged.digest[7:]).write_bytes(b"X" + damaged.read()[1:])
    node2 = setup.cluster.add("node2")
    if setup.registry.process is None or not setup.registry.process.alive():
        setup.registry.start()
    overrides = {"cache": {"containerd_content": str(content)}}

    def good_heads() -> int:
        return setup.registry.count_requests("HEAD", setup.registry.blob_path(REPOSITORY, good.digest))

    gets_before, heads_before = blob_gets(setup, good.digest), good_heads()
    damaged_before = blob_gets(setup, damaged.digest)
    with MirrorNode(node2, tmp_path / "mirror2", setup.mirror.upstream_dns, setup.ca, overrides) as mirror2:
        trust = mirror2.trust_bundle()
        assert fetch_blob(node2, trust, good.digest) == (200, good.read())
        # only the access check (a HEAD with the client's credentials) went upstream; the registry logs a
        # request once it has answered it, so its line can come a moment after the client is done
        wait_until(lambda: good_heads() > heads_before, 10)
        assert (blob_gets(setup, good.digest), good_heads()) == (gets_before, heads_before + 1)
        status, body = fetch_blob(node2, trust, damaged.digest)
        assert body != damaged.read()  # cut before the end: the damaged copy never reaches a client whole
        assert fetch_blob(node2, trust, damaged.digest) == (200, damaged.read())
        wait_until(lambda: blob_gets(setup, damaged.digest) > damaged_before, 10)
        assert blob_gets(setup, damaged.digest) == damaged_before + 1


def test_a_large_monolithic_push_streams_through_with_flat_memory(setup: Setup, tmp_path: Path) -> None:
    """64 MiB PUT through the mirror: the registry stores it intact and dnsmirror's memory does not grow by
    it."""
    import hashlib
    import os

    if setup.registry.process is None or not setup.registry.process.alive():
        setup.registry.start()
    blob = tmp_path / "big.bin"
    with open(blob, "wb") as out:
        for _ in range(64):
            out.write(os.urandom(1024 * 1024))
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    trust = str(setup.mirror.trust_bundle())
    base = f"https://{ECR_HOST}/v2/team/big/blobs"
    started = setup.node.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            trust,
            "-X",
            "POST",
            "-o",
            "/dev/null",
            "-D",
            "-",
            f"{base}/uploads/",
        ]
    ).stdout.decode()
    location = next(line.split(":", 1)[1].strip() for line in started.splitlines()
                    if line.lower().startswith("location:"))
    url = location if location.startswith("https://") else f"https://{ECR_HOST}{location}"
    url += ("&" if "?" in url else "?") + f"digest={digest}"
    status = Path(f"/proc/{setup.mirror.process.pid}/status")

    def high_water_kib() -> int:
        return next(
            int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")
        )

    before = high_water_kib()
    put = setup.node.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "120",
            "--cacert",
            trust,
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{blob}",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ]
    ).stdout
    assert put == b"201"
    assert high_water_kib() - before < 32 * 1024  # well under the 64 MiB body
    assert fetch_blob(setup.node, setup.mirror.trust_bundle(), digest, repository="team/big") == (
        200,
        blob.read_bytes(),
    )
