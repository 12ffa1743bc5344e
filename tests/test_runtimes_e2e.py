"""Every client a node may pull with, through dnsmirror, with no registry configuration anywhere.

One world for the module: a private (htpasswd) TLS docker-registry holding one multi-arch image,
pushed once; a node namespace whose resolver is dnsmirror and whose clients trust only the public CA
plus dnsmirror's root (``SSL_CERT_FILE``); a plain node whose resolver is the upstream DNS (what the
registry looks like without dnsmirror). docker (dockerd 20.10), podman, buildah (``FROM`` the captured
image), skopeo, ``ctr`` and the CRI each pull the image twice with a fresh local store: both pulls
work, the second takes every layer from dnsmirror's cache (the registry sees no new blob GET, the
access log says ``source: cache``). Anonymous clients are refused on the node as on the plain node.
An engine that is not installed is skipped with the reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from harness import ECR_HOST, require_netns
from harness.containerd import Containerd
from harness.cri import CriError, CriImageClient
from harness.images import BuiltImage, PlatformImage, build_image, push_image, skopeo_copy
from harness.netns import Cluster, Namespace
from harness.pki import TestCA
from harness.registry import Registry
from harness.runtimes import DOCKER_CLIENT, Buildah, ContainersTool, Dockerd, Podman, missing
from mirror_support import MirrorNode, registry_upstream

pytestmark = pytest.mark.integration

REPOSITORY = "team/private"
USER, PASSWORD = "alice", "alice-secret"
CREDS = f"{USER}:{PASSWORD}"
# how each client words a 401 from the registry
REFUSALS = (b"unauthorized", b"authentication required", b"no basic auth credentials", b"401")
Tool = TypeVar("Tool", bound=ContainersTool)


@dataclass
class World:
    cluster: Cluster
    ca: TestCA
    registry: Registry
    mirror: MirrorNode
    node: Namespace
    plain: Namespace
    image: BuiltImage
    work: Path

    @property
    def reference(self) -> str:
        return f"{ECR_HOST}/{REPOSITORY}:{self.image.tag}"

    @property
    def amd64(self) -> PlatformImage:
        return self.image.platform("linux/amd64")

    def trust(self) -> Path:
        return self.mirror.trust_bundle()

    def both_nodes(self) -> tuple[tuple[Namespace, Path], tuple[Namespace, Path]]:
        """(node, what its clients trust): the node behind dnsmirror, then the plain node."""
        return (self.node, self.trust()), (self.plain, self.ca.cert_path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_netns()
    work = tmp_path_factory.mktemp("runtimes-e2e")
    with Cluster() as cluster, registry_upstream(cluster, work, users={USER: PASSWORD}) as upstream:
        node = cluster.add("node")
        plain = cluster.add("plain", nameservers=[upstream.dns])
        image = build_image(work / "layout", tag="v1")
        push_image(image, upstream.pusher, f"{ECR_HOST}/{REPOSITORY}:v1", ca_file=upstream.ca.cert_path,
                   creds=CREDS)
        with MirrorNode(node, work / "mirror", upstream.dns, upstream.ca) as mirror:
            yield World(cluster, upstream.ca, upstream.registry, mirror, node, plain, image, work)


def skip_unless_installed(*programs: str) -> None:
    reason = missing(*programs)
    if reason is not None:
        pytest.skip(reason)


def upstream_blob_gets(world: World) -> int:
    paths = {world.registry.blob_path(REPOSITORY, layer.digest) for layer in world.amd64.layers}
    return sum(1 for entry in world.registry.access_log() if entry.method == "GET" and entry.path in paths)


def layer_sources(world: World, since: int) -> dict[str, list[str]]:
    """Where dnsmirror served each amd64 layer from, for requests logged after the ``since``-th record."""
    sources: dict[str, list[str]] = {layer.digest: [] for layer in world.amd64.layers}
    for record in world.mirror.log_records()[since:]:
        if record.get("event") != "access":
            continue
        for digest in sources:
            if record.get("path", "").endswith(f"/blobs/{digest}"):
                sources[digest].append(record.get("source"))
    return sources


def assert_pulled_twice(world: World, pull: Callable[[], None], reset: Callable[[], None]) -> None:
    """``pull`` works; after ``reset`` (a fresh local store) it works again, every layer from the cache."""
    pull()
    reset()
    gets_before = upstream_blob_gets(world)
    mark = len(world.mirror.log_records())
    pull()
    # the access line is written as the response ends, a moment after the client may be done
    deadline = time.monotonic() + 5
    while not all(layer_sources(world, mark).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    sources = layer_sources(world, mark)
    assert all(sources.values()) and all(
        source == "cache" for found in sources.values() for source in found
    ), sources
    assert upstream_blob_gets(world) == gets_before


def refusal(done: subprocess.CompletedProcess[bytes], where: str) -> bytes:
    """The client's failure output (timestamps removed); it must be the registry's 401."""
    output = (done.stdout + done.stderr).lower()
    assert done.returncode != 0 and any(word in output for word in REFUSALS), f"{where}: {output!r}"
    return re.sub(rb'time="[^"]*"', b"", output)


def assert_refused_alike(mirrored: subprocess.CompletedProcess[bytes],
                         direct: subprocess.CompletedProcess[bytes]) -> None:
    """An anonymous client fails through dnsmirror with exactly the words it fails with upstream."""
    assert refusal(mirrored, "through dnsmirror") == refusal(direct, "without dnsmirror")


def assert_anonymous_tool_refused_alike(
    world: World,
    workdir: Path,
    tool: type[Tool],
    attempt: Callable[[Tool], subprocess.CompletedProcess[bytes]],
) -> None:
    """``attempt`` with a fresh ``tool`` and no credentials fails alike on both nodes."""
    refusals = []
    for namespace, trust in world.both_nodes():
        with tool(namespace, workdir / f"anonymous-{namespace.role}", ssl_cert_file=trust) as anonymous:
            refusals.append(attempt(anonymous))
    assert_refused_alike(*refusals)


def test_anonymous_requests_get_the_registrys_own_refusal(world: World) -> None:
    """Status, challenge and body of an anonymous manifest and (cached) blob request are upstream's."""
    skopeo_copy(world.node, f"docker://{world.reference}", f"oci:{world.work / 'warm'}:v1",
                ca_file=world.trust(), src_creds=CREDS)  # the blob is in the cache now

    def anonymous(namespace: Namespace, trust: Path, path: str) -> tuple[str, str, bytes]:
        done = namespace.run(["curl", "-sS", "--max-time", "20", "--cacert", str(trust), "-D", "-", "-o", "-",
                              f"https://{ECR_HOST}{path}"], check=False)
        head, _, body = done.stdout.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        # header names are case-insensitive (HTTP/2 writes them in lower case)
        challenge = next((line.split(":", 1)[1].strip() for line in lines
                          if line.lower().startswith("www-authenticate:")), "")
        return lines[0].split(" ", 2)[1] if lines[0] else "", challenge, body

    for path in (world.registry.manifest_path(REPOSITORY, "v1"),
                 world.registry.blob_path(REPOSITORY, world.amd64.layers[0].digest)):
        mirrored = anonymous(world.node, world.trust(), path)
        direct = anonymous(world.plain, world.ca.cert_path, path)
        assert mirrored[0] == "401" and mirrored == direct


def test_skopeo(world: World, tmp_path: Path) -> None:
    copies = iter(range(10))

    def pull() -> None:
        skopeo_copy(world.node, f"docker://{world.reference}", f"oci:{tmp_path / str(next(copies))}:v1",
                    ca_file=world.trust(), src_creds=CREDS, all_platforms=False)

    assert_pulled_twice(world, pull, lambda: None)
    assert_refused_alike(
        *(
            skopeo_copy(
                namespace,
                f"docker://{world.reference}",
                f"oci:{tmp_path / 'anonymous'}:v1",
                ca_file=trust,
                check=False,
            )
            for namespace, trust in world.both_nodes()
        )
    )


def test_ctr_and_cri(world: World, tmp_path: Path) -> None:
    with Containerd(world.node, tmp_path / "containerd", ssl_cert_file=world.trust()) as containerd, \
            CriImageClient(containerd.socket, timeout=120) as cri:
        def ctr_pull() -> None:
            done = containerd.pull(world.reference, user=CREDS, check=False)
            assert done.returncode == 0, (done.stdout + done.stderr).decode() + world.mirror.log()
            assert containerd.has_snapshot(world.amd64.chain_id)

        def forget() -> None:
            for name in containerd.images():
                containerd.remove_image(name)
            containerd.ctr(["content", "prune", "references"], check=False)
            assert not {layer.digest for layer in world.amd64.layers} & containerd.content_digests()

        assert_pulled_twice(world, ctr_pull, forget)

        def cri_pull() -> None:
            assert (
                cri.pull_image(world.reference, username=USER, password=PASSWORD) == world.amd64.config.digest
            )

        assert_pulled_twice(world, cri_pull, forget)
        with pytest.raises(CriError) as refused:
            cri.pull_image(world.reference)
        assert any(word.decode() in refused.value.details.lower() for word in REFUSALS), refused.value.details
        mirrored = containerd.pull(world.reference, check=False)  # ctr sends no credential
    with Containerd(world.plain, tmp_path / "plain", ssl_cert_file=world.ca.cert_path) as plain:
        assert_refused_alike(mirrored, plain.pull(world.reference, check=False))


def test_docker(world: World, tmp_path: Path) -> None:
    skip_unless_installed("dockerd", DOCKER_CLIENT, "nsenter", "unshare")
    with Dockerd(world.node, tmp_path / "docker", ssl_cert_file=world.trust()) as docker:
        mirrored = docker.pull(world.reference)
        docker.login(ECR_HOST, USER, PASSWORD)

        def pull() -> None:
            done = docker.pull(world.reference)
            assert done.returncode == 0, (done.stdout + done.stderr).decode() + docker.log()
            inspected = docker.docker(["image", "inspect", "--format", "{{.Id}} {{.Architecture}}",
                                       world.reference]).stdout.decode().split()
            assert inspected == [world.amd64.config.digest, "amd64"]

        assert_pulled_twice(world, pull, docker.remove_all_images)
    with Dockerd(world.plain, tmp_path / "plain-docker", ssl_cert_file=world.ca.cert_path) as plain:
        assert_refused_alike(mirrored, plain.pull(world.reference))


def test_podman(world: World, tmp_path: Path) -> None:
    skip_unless_installed("podman")
    with Podman(world.node, tmp_path / "podman", ssl_cert_file=world.trust()) as podman:
        def pull() -> None:
            done = podman.pull(world.reference, creds=CREDS)
            assert done.returncode == 0, (done.stdout + done.stderr).decode()
            image_id = podman.run(
                ["image", "inspect", "--format", "{{.Id}}", world.reference]
            ).stdout.decode()
            assert f"sha256:{image_id.strip()}" == world.amd64.config.digest

        assert_pulled_twice(world, pull, podman.reset_storage)
    assert_anonymous_tool_refused_alike(world, tmp_path, Podman,
                                        lambda podman: podman.pull(world.reference))


def test_buildah_from_a_captured_image(world: World, tmp_path: Path) -> None:
    skip_unless_installed("buildah")
    with Buildah(world.node, tmp_path / "buildah", ssl_cert_file=world.trust()) as buildah:
        def build() -> None:
            done = buildah.build_from(world.reference, creds=CREDS)
            assert done.returncode == 0, (done.stdout + done.stderr).decode()
            inspected = json.loads(
                buildah.run(["inspect", "--type", "image", "localhost/dnsmirror-built:1"]).stdout
            )
            diff_ids = inspected["OCIv1"]["rootfs"]["diff_ids"]
            # the captured image's layers, then the one COPY added
            assert (
                tuple(diff_ids[:-1]) == world.amd64.diff_ids
                and len(diff_ids) == len(world.amd64.diff_ids) + 1
            )

        assert_pulled_twice(world, build, buildah.reset_storage)
    assert_anonymous_tool_refused_alike(world, tmp_path, Buildah,
                                        lambda buildah: buildah.build_from(world.reference))
