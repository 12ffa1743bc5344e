"""The end-to-end harness proves itself with real components and no dnsmirror involved.

A TLS docker-registry in one namespace, an image built here and pushed by skopeo, and containerd in
another namespace (whose hosts file maps the registry name) pulling it with ``ctr`` and through the
CRI; plus the pure parts (image layout, protobuf encoding, the test CA) without root.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from harness import ECR_HOST, ECR_HOST_2, require_netns
from harness.blobhost import BlobHost
from harness.containerd import Containerd
from harness.cri import CriError, CriImageClient, decode_message, encode_field, pull_image_request
from harness.dns import StaticDNS
from harness.images import INDEX_MEDIA_TYPE, BuiltImage, build_image, push_image, skopeo
from harness.netns import NETNS_ETC_DIR, Cluster, Namespace, cleanup_stale, list_namespaces
from harness.pki import TestCA, bundle, create_ca
from harness.registry import Registry

REPOSITORY = "team/app"


# --- pure parts: no root needed -------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_image_layout_is_content_addressed_and_consistent(tmp_path: Path) -> None:
    image = build_image(tmp_path / "layout", tag="v1", big_layer_size=300_000)
    for blob in image.blobs():
        assert _sha256(blob.read()) == blob.digest and len(blob.read()) == blob.size
    layout_index = json.loads((tmp_path / "layout" / "index.json").read_text())
    assert layout_index["manifests"][0]["digest"] == image.index.digest
    assert layout_index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    index = json.loads(image.index.read())
    assert index["mediaType"] == INDEX_MEDIA_TYPE
    assert [(entry["platform"]["os"], entry["platform"]["architecture"]) for entry in index["manifests"]] == [
        ("linux", "amd64"), ("linux", "arm64")]
    for platform in image.platforms:
        manifest = json.loads(platform.manifest.read())
        config = json.loads(platform.config.read())
        assert manifest["config"]["digest"] == platform.config.digest
        assert [layer["digest"] for layer in manifest["layers"]] == [
            layer.digest for layer in platform.layers
        ]
        assert config["architecture"] == platform.platform.split("/")[1]
        own_layer = platform.layers[-1]
        tar = gzip.decompress(own_layer.read())
        assert config["rootfs"]["diff_ids"] == [image.big_layer.digest, _sha256(tar)]
        with tarfile.open(tmp_path / "layout" / "blobs" / "sha256" / own_layer.digest[7:]) as archive:
            for path, content in platform.files.items():
                assert archive.extractfile(path).read() == content
    assert image.big_layer is not None and image.big_layer.size > 300_000
    with tarfile.open(image.big_layer.path) as archive:
        assert archive.getmember("data/random.bin").size == 300_000
    amd64, arm64 = image.platforms
    assert amd64.layers[0] == arm64.layers[0] and amd64.layers[1] != arm64.layers[1]
    chain = _sha256(f"{amd64.diff_ids[0]} {amd64.diff_ids[1]}".encode())
    assert amd64.chain_id == chain


def test_image_digests_are_fresh_per_build_and_stable_per_nonce(tmp_path: Path) -> None:
    first = build_image(tmp_path / "a", nonce="n1")
    again = build_image(tmp_path / "b", nonce="n1")
    fresh = build_image(tmp_path / "c")
    assert first.index.digest == again.index.digest
    assert fresh.index.digest != first.index.digest


def test_protobuf_encoding_of_pull_image_request() -> None:
    request = pull_image_request("h/r:t", "user", "pw")
    # field 1 (ImageSpec{1: "h/r:t"}), field 2 (AuthConfig{1: "user", 2: "pw"})
    assert request == b"\x0a\x07\x0a\x05h/r:t" + b"\x12\x0a\x0a\x04user\x12\x02pw"
    long_name = "x" * 300
    decoded = decode_message(encode_field(1, encode_field(1, long_name)) + encode_field(3, 150))
    assert decode_message(decoded[1][0]) == {1: [long_name.encode()]}
    assert decoded[3] == [150]


def test_cri_client_falls_back_to_v1alpha2(tmp_path: Path) -> None:
    """A gRPC server that serves only ``runtime.v1alpha2`` gets the pull, with the image and the auth."""
    received: list[bytes] = []

    def pull(request: bytes, context: grpc.ServicerContext) -> bytes:
        received.append(request)
        return encode_field(1, "sha256:" + "ab" * 32)

    handler = grpc.method_handlers_generic_handler(
        "runtime.v1alpha2.ImageService", {"PullImage": grpc.unary_unary_rpc_method_handler(pull)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    socket_path = tmp_path / "cri.sock"
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    try:
        with CriImageClient(socket_path, timeout=10) as cri:
            assert cri.pull_image("h/r:t", username="u", password="p") == "sha256:" + "ab" * 32
            assert cri.api_version == "v1alpha2"
    finally:
        server.stop(None)
    assert received == [pull_image_request("h/r:t", "u", "p")]


def test_test_ca_issues_a_certificate_that_verifies_for_its_name(public_ca: TestCA, tmp_path: Path) -> None:
    server = public_ca.issue_server([ECR_HOST], tmp_path / "tls")
    verifier = (
        PolicyBuilder().store(Store([public_ca.certificate])).build_server_verifier(x509.DNSName(ECR_HOST))
    )
    chain = verifier.verify(server.certificate, [])
    assert chain[-1] == public_ca.certificate
    other = create_ca(tmp_path / "other")
    stranger = PolicyBuilder().store(Store([other.certificate])).build_server_verifier(x509.DNSName(ECR_HOST))
    with pytest.raises(x509.verification.VerificationError):
        stranger.verify(server.certificate, [])
    assert os.stat(server.key_path).st_mode & 0o077 == 0
    trust = bundle([public_ca.cert_path, other.cert_path], tmp_path / "trust.pem")
    assert len(x509.load_pem_x509_certificates(trust.read_bytes())) == 2


# --- namespaces ------------------------------------------------------------------------------------


def _listen_once(address: str) -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind((address, 0))
    listener.listen(1)
    return listener, listener.getsockname()[1]


@pytest.mark.integration
def test_cluster_connects_members_and_cleans_up_even_on_failure() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="boom"), Cluster() as cluster:
        registry_ns, node, peer = cluster.add("registry"), cluster.add("node"), cluster.add("peer")
        names = [cluster.switch, registry_ns.name, node.name, peer.name]
        assert set(names) <= set(list_namespaces())
        workdir = cluster.workdir
        # a socket opened on a thread inside the registry namespace, reached from the peer namespace
        listener, port = registry_ns.call(_listen_once, registry_ns.address)
        with listener:
            peer.run(
                [
                    "python3",
                    "-c",
                    f"import socket; socket.create_connection(('{registry_ns.address}', {port}), 2)",
                ]
            )
        # the machine's own namespace has no such address: traffic stays in the cluster
        assert (
            registry_ns.address
            not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        )
        sleeper = node.start(["sleep", "300"])
        # ip netns exec execs the program: the pid we hold becomes the server's own
        sleeper.wait_until(lambda: Path(f"/proc/{sleeper.pid}/cmdline").read_bytes().startswith(b"sleep\0"),
                           "exec'd", timeout=5)
        raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())
    assert not any((NETNS_ETC_DIR / name).exists() for name in names)
    assert not sleeper.alive()
    assert not workdir.exists()


@pytest.mark.integration
def test_parallel_clusters_do_not_collide() -> None:
    require_netns()
    with Cluster() as first, Cluster() as second:
        a, b = first.add("node"), second.add("node")
        assert a.name != b.name
        # same-looking members of two clusters never see each other
        listener, port = a.call(_listen_once, a.address)
        with listener:
            probe = b.run(
                ["python3", "-c", f"import socket; socket.create_connection(('{a.address}', {port}), 1)"],
                check=False,
            )
        assert probe.returncode != 0


@pytest.mark.integration
def test_cleanup_stale_removes_what_a_dead_run_left() -> None:
    require_netns()
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = f"dmh-{finished.pid}-dead00-node"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    (NETNS_ETC_DIR / stale).mkdir(parents=True)
    try:
        assert stale in cleanup_stale()
        assert stale not in list_namespaces() and not (NETNS_ETC_DIR / stale).exists()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


@pytest.mark.integration
def test_process_stop_kills_a_server_that_ignores_sigterm(netns_cluster: Cluster) -> None:
    node = netns_cluster.add("node")
    stubborn = node.start(
        [
            "python3",
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(300)",
        ]
    )
    stubborn.wait_until(lambda: "ready" in stubborn.stdout(), "ready")
    assert stubborn.stop(timeout=0.5) == -9


# --- real registry, skopeo and containerd ------------------------------------------------------------


@dataclass
class PublicSetup:
    """A TLS registry in its own namespace holding a pushed image, and a node namespace that resolves it."""

    cluster: Cluster
    ca: TestCA
    registry: Registry
    node: Namespace
    image: BuiltImage

    @property
    def reference(self) -> str:
        return f"{ECR_HOST}/{REPOSITORY}:{self.image.tag}"


@pytest.fixture(scope="module")
def public_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PublicSetup]:
    require_netns()
    work = tmp_path_factory.mktemp("harness")
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        node = cluster.add("node", hosts={ECR_HOST: registry_ns.address})
        ca = create_ca(work / "ca")
        image = build_image(work / "layout", tag="v1")
        with Registry(registry_ns, ECR_HOST, ca, work / "registry") as registry:
            push_image(image, node, f"{ECR_HOST}/{REPOSITORY}:v1", ca_file=ca.cert_path)
            yield PublicSetup(cluster, ca, registry, node, image)


@pytest.mark.integration
def test_skopeo_push_preserves_digests(public_setup: PublicSetup) -> None:
    raw = skopeo(public_setup.node, ["inspect", "--raw", f"docker://{public_setup.reference}"],
                 ca_file=public_setup.ca.cert_path).stdout
    assert _sha256(raw) == public_setup.image.index.digest
    registry = public_setup.registry
    assert registry.count_requests("PUT", registry.manifest_path(REPOSITORY, "v1"), status=201) == 1


@pytest.mark.integration
def test_ctr_pull_unpacks_and_the_access_log_counts_blob_gets(
    public_setup: PublicSetup, tmp_path: Path
) -> None:
    registry, image = public_setup.registry, public_setup.image
    amd64, arm64 = image.platform("linux/amd64"), image.platform("linux/arm64")
    with Containerd(
        public_setup.node, tmp_path / "containerd", ssl_cert_file=public_setup.ca.cert_path
    ) as containerd:
        containerd.pull(public_setup.reference)
        assert containerd.has_snapshot(amd64.chain_id)
        assert amd64.files["etc/dnsmirror-test/platform"] in containerd.unpacked_files(
            "etc/dnsmirror-test/platform"
        )
        assert public_setup.reference in containerd.images()
        assert {
            image.index.digest,
            amd64.manifest.digest,
            amd64.layers[0].digest,
        } <= containerd.content_digests()
    # containerd fetched this platform's layer exactly once and the other platform's not at all
    assert (
        registry.count_requests("GET", registry.blob_path(REPOSITORY, amd64.layers[0].digest), status=200)
        == 1
    )
    assert registry.count_requests("GET", registry.blob_path(REPOSITORY, arm64.layers[0].digest)) == 0
    assert registry.count_requests("HEAD", registry.manifest_path(REPOSITORY, "v1")) >= 1


@pytest.mark.integration
def test_cri_pull_by_tag_and_digest_unpacks(public_setup: PublicSetup, tmp_path: Path) -> None:
    amd64 = public_setup.image.platform("linux/amd64")
    by_digest = f"{ECR_HOST}/{REPOSITORY}@{public_setup.image.index.digest}"
    with (
        Containerd(
            public_setup.node, tmp_path / "containerd", ssl_cert_file=public_setup.ca.cert_path
        ) as containerd,
        CriImageClient(containerd.socket, timeout=60) as cri,
    ):
        assert cri.image_status(public_setup.reference) is None
        assert cri.pull_image(public_setup.reference) == amd64.config.digest
        assert cri.pull_image(by_digest) == amd64.config.digest
        assert cri.api_version in ("v1", "v1alpha2")
        status = cri.image_status(public_setup.reference)
        assert status is not None and status.id == amd64.config.digest
        assert f"{ECR_HOST}/{REPOSITORY}@{public_setup.image.index.digest}" in status.repo_digests
        assert containerd.has_snapshot(amd64.chain_id)
        # the daemon made the TLS connections itself: the CRI pull of the tag appears in the daemon's log
        assert f'PullImage \\"{public_setup.reference}\\"' in containerd.log()


@pytest.mark.integration
def test_a_client_trusting_another_ca_is_refused(public_setup: PublicSetup, tmp_path: Path) -> None:
    stranger = create_ca(tmp_path / "stranger")
    with Containerd(
        public_setup.node, tmp_path / "containerd", ssl_cert_file=stranger.cert_path
    ) as containerd:
        refused = containerd.pull(public_setup.reference, check=False)
    assert refused.returncode != 0
    assert b"certificate signed by unknown authority" in refused.stdout + refused.stderr


@pytest.mark.integration
def test_private_registry_refuses_anonymous_pulls_and_serves_credentials(public_setup: PublicSetup,
                                                                         tmp_path: Path) -> None:
    cluster, node, ca = public_setup.cluster, public_setup.node, public_setup.ca
    private_ns = cluster.add("private")  # a member added later joins the same subnet
    node.write_hosts({ECR_HOST: public_setup.registry.address, ECR_HOST_2: private_ns.address})
    reference = f"{ECR_HOST_2}/{REPOSITORY}:v1"
    image = build_image(tmp_path / "layout", tag="v1", platforms=("linux/amd64",))
    amd64 = image.platform("linux/amd64")
    with Registry(private_ns, ECR_HOST_2, ca, tmp_path / "registry", users={"alice": "a-secret"}) as registry:
        push_image(image, node, reference, ca_file=ca.cert_path, creds="alice:a-secret")
        with Containerd(node, tmp_path / "containerd", ssl_cert_file=ca.cert_path) as containerd, \
                CriImageClient(containerd.socket, timeout=60) as cri:
            anonymous = containerd.pull(reference, check=False)
            assert anonymous.returncode != 0 and b"401 Unauthorized" in anonymous.stdout + anonymous.stderr
            with pytest.raises(CriError, match="401 Unauthorized"):
                cri.pull_image(reference)
            with pytest.raises(CriError, match="401 Unauthorized"):
                cri.pull_image(reference, username="alice", password="wrong")
            assert cri.pull_image(reference, username="alice", password="a-secret") == amd64.config.digest
            containerd.pull(reference, user="alice:a-secret")
            assert containerd.has_snapshot(amd64.chain_id)
        layer_path = registry.blob_path(REPOSITORY, amd64.layers[0].digest)
        # ctr found it already in the store
        assert registry.count_requests("GET", layer_path, status=200) == 1
        assert registry.count_requests("HEAD", registry.manifest_path(REPOSITORY, "v1"), status=401) >= 2


def _fetch_seconds(node: Namespace, url: str, ca_file: Path) -> float:
    """Time a full HTTPS GET from inside ``node`` (a fresh Python, so the namespace's hosts file applies)."""
    program = ("import ssl, time, urllib.request\n"
               f"context = ssl.create_default_context(cafile={str(ca_file)!r})\n"
               "start = time.monotonic()\n"
               f"urllib.request.urlopen({url!r}, context=context, timeout=20).read()\n"
               "print(time.monotonic() - start)")
    return float(node.run(["python3", "-c", program]).stdout)


@pytest.mark.integration
def test_corrupted_blob_is_served_and_containerd_rejects_it(
    public_setup: PublicSetup, tmp_path: Path
) -> None:
    image = build_image(tmp_path / "layout", tag="corrupt", platforms=("linux/amd64",))
    layer = image.platform("linux/amd64").layers[0]
    registry = public_setup.registry
    push_image(
        image, public_setup.node, f"{ECR_HOST}/{REPOSITORY}:corrupt", ca_file=public_setup.ca.cert_path
    )
    registry.corrupt_blob(layer.digest)
    assert registry.blob_file(layer.digest).stat().st_size == layer.size
    with Containerd(
        public_setup.node, tmp_path / "containerd", ssl_cert_file=public_setup.ca.cert_path
    ) as containerd:
        refused = containerd.pull(f"{ECR_HOST}/{REPOSITORY}:corrupt", check=False)
    assert refused.returncode != 0
    assert b"unexpected commit digest" in refused.stdout + refused.stderr
    assert registry.count_requests("GET", registry.blob_path(REPOSITORY, layer.digest), status=200) >= 1


@pytest.mark.integration
def test_limit_egress_slows_the_registry(public_setup: PublicSetup, tmp_path: Path) -> None:
    image = build_image(tmp_path / "layout", tag="big", platforms=("linux/amd64",), big_layer_size=512 * 1024)
    push_image(image, public_setup.node, f"{ECR_HOST}/{REPOSITORY}:big", ca_file=public_setup.ca.cert_path)
    url = f"https://{ECR_HOST}{public_setup.registry.blob_path(REPOSITORY, image.big_layer.digest)}"
    registry_ns = public_setup.registry.namespace
    registry_ns.limit_egress("4mbit")
    try:
        slow = _fetch_seconds(public_setup.node, url, public_setup.ca.cert_path)
    finally:
        registry_ns.unlimit_egress()
    fast = _fetch_seconds(public_setup.node, url, public_setup.ca.cert_path)
    assert slow > 0.7 > fast  # 512 KiB at 4 Mbit/s is about one second


@pytest.mark.integration
def test_redirected_blobs_come_from_the_blob_host_without_authorization(public_setup: PublicSetup,
                                                                         tmp_path: Path) -> None:
    cluster, node, ca = public_setup.cluster, public_setup.node, public_setup.ca
    blobs_host = "blobs.storage.example-cdn.test"
    registry_ns, storage_ns = cluster.add("redirecting"), cluster.add("storage")
    node.write_hosts({ECR_HOST: public_setup.registry.address, ECR_HOST_2: registry_ns.address,
                      blobs_host: storage_ns.address})
    image = build_image(tmp_path / "layout", tag="v1", platforms=("linux/amd64",))
    amd64 = image.platform("linux/amd64")
    reference = f"{ECR_HOST_2}/{REPOSITORY}:v1"
    with Registry(registry_ns, ECR_HOST_2, ca, tmp_path / "registry", users={"bob": "b-secret"},
                  redirect_base_url=f"https://{blobs_host}") as registry, \
            BlobHost(storage_ns, blobs_host, ca, registry.storage_dir, tmp_path / "blobs") as blob_host:
        push_image(image, node, reference, ca_file=ca.cert_path, creds="bob:b-secret")
        with Containerd(node, tmp_path / "containerd", ssl_cert_file=ca.cert_path) as containerd:
            containerd.pull(reference, user="bob:b-secret")
            assert containerd.has_snapshot(amd64.chain_id)
        assert (
            registry.count_requests("GET", registry.blob_path(REPOSITORY, amd64.layers[0].digest), status=307)
            == 1
        )
        layer_file = "/" + str(registry.blob_file(amd64.layers[0].digest).relative_to(registry.storage_dir))
        served = [entry for entry in blob_host.requests() if entry["path"] == layer_file]
        assert [(entry["method"], entry["status"], entry["host"]) for entry in served] == [
            ("GET", 200, blobs_host)
        ]
        # Go's client drops credentials on a cross-host redirect; so must dnsmirror
        assert not any(entry["authorization"] for entry in blob_host.requests())


@pytest.mark.integration
def test_a_node_resolves_the_registry_through_dns(public_setup: PublicSetup, tmp_path: Path) -> None:
    """No hosts entry: the node's resolv.conf points at the static DNS, as it will point at dnsmirror."""
    registry = public_setup.registry
    with StaticDNS(registry.namespace, {ECR_HOST: registry.address}, tmp_path / "dns") as dns:
        node = public_setup.cluster.add("dnsnode", nameservers=[dns.address])
        answer = node.run(["dig", "+short", "+time=2", "+tries=1", ECR_HOST]).stdout.decode().split()
        assert answer == [registry.address]
        unknown = node.run(["dig", "+time=2", "+tries=1", "unknown.example.com"]).stdout.decode()
        assert "status: NXDOMAIN" in unknown
        with Containerd(node, tmp_path / "containerd", ssl_cert_file=public_setup.ca.cert_path) as containerd:
            containerd.pull(public_setup.reference)
        assert (ECR_HOST, "A") in dns.queries()


@pytest.mark.integration
def test_harness_threads_do_not_leak_namespaces() -> None:
    """``Namespace.call`` switches only its own short-lived thread, never the test's."""
    require_netns()
    before = os.readlink("/proc/thread-self/ns/net")
    with Cluster() as cluster:
        node = cluster.add("node")
        inside = node.call(os.readlink, "/proc/thread-self/ns/net")
    assert inside != before
    assert os.readlink("/proc/thread-self/ns/net") == before
