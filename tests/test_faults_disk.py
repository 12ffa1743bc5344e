"""Fault table, cache disk rows: a full, read-only or damaged cache disk, and a mirror killed mid-fill.

Each row runs dnsmirror as a node (its own network namespace) in front of Debian's docker-registry and
states what a client gets with dnsmirror, checked against what the registry itself serves (the client
without dnsmirror): the same bytes, or a cut connection where noted, and never a complete response
with a wrong byte.

| fault | with dnsmirror | without |
|---|---|---|
| cache.dir on a tmpfs smaller than the blob | 200/206, right bytes, every time | 200/206 |
| two fills that fit alone, not together | both 200, right bytes | 200 |
| cache.dir remounted read-only | 200/206, right bytes (cached content too) | 200/206 |
| a flipped byte in a cached blob | up to 16 MiB: right bytes at once; bigger, whole GET: cut at worst, never
wrong; entry dropped; next: right bytes; Range: right bytes | 200 |
| a flipped byte in a cached manifest | right bytes at once; entry dropped and refetched | 200 |
| dnsmirror SIGKILLed mid-fill, restarted | temp files removed at start; 200, right bytes | 200 |
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import ECR_HOST, require_netns
from harness.netns import Cluster, Namespace
from harness.pki import create_ca
from harness.registry import Registry
from mirror_support import MirrorNode, curl_argv, upstream_dns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is needed (scripts/setup.sh)"),
]

REPOSITORY = "faults/disk"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on ``path`` (a fresh directory), unmounted even on failure."""
    path.mkdir(parents=True)
    try:
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={size},mode=0755",
                f"dnsmirror-{uuid.uuid4().hex[:8]}",
                str(path),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


class World:
    """docker-registry as upstream of ECR_HOST, its DNS, a node namespace, blobs placed in the registry."""

    def __init__(self, cluster: Cluster, registry: Registry, dns: str, ca, node: Namespace, pusher: Namespace,
                 workdir: Path) -> None:
        self.cluster, self.registry, self.dns, self.ca = cluster, registry, dns, ca
        self.node, self.pusher, self.workdir = node, pusher, workdir

    def blob(self, size: int, seed: int) -> tuple[str, bytes]:
        data = (hashlib.sha256(f"{seed}".encode()).digest() * (size // 32 + 1))[:size]
        data = bytes(byte ^ (index % 251) for index, byte in enumerate(data[:4096])) + data[4096:]
        digest, _ = self.registry.place_blob(REPOSITORY, [data])
        return digest, data

    def mirror(self, name: str, cache_dir: Path, **cache: object) -> MirrorNode:
        return MirrorNode(
            self.node,
            self.workdir / name,
            self.dns,
            self.ca,
            {"cache": {"dir": str(cache_dir), **cache}, "log": {"format": "json", "level": "info"}},
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    require_netns()
    workdir = tmp_path_factory.mktemp("faults-disk")
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        node = cluster.add("node")
        pusher = cluster.add("pusher", hosts={ECR_HOST: registry_ns.address})
        ca = create_ca(workdir / "public-ca")
        with Registry(registry_ns, ECR_HOST, ca, workdir / "registry") as registry, \
                upstream_dns(registry_ns, workdir / "dns", {ECR_HOST: registry_ns.address}) as dns:
            yield World(cluster, registry, dns, ca, node, pusher, workdir)


def curl(world: World, mirror: MirrorNode, path: str, *headers: str, max_time: float = 60,
         rate: str | None = None) -> tuple[int, str, bytes]:
    """(curl's exit code, HTTP status, body) of a GET through dnsmirror, from the node."""
    body = world.workdir / f"body-{uuid.uuid4().hex[:8]}"
    options = ["-o", str(body), "-w", "%{http_code}", *(["--limit-rate", rate] if rate else [])]
    for header in headers:
        options += ["-H", header]
    argv = curl_argv(ECR_HOST, mirror.address, path, mirror.trust_bundle(), *options, max_time=max_time)
    done = world.node.run(argv, check=False, timeout=max_time + 30)
    try:
        data = body.read_bytes()
    except FileNotFoundError:
        data = b""
    body.unlink(missing_ok=True)
    return done.returncode, done.stdout.decode(), data


def get_blob(world: World, mirror: MirrorNode, digest: str, byte_range: tuple[int, int] | None = None):
    headers = [f"Range: bytes={byte_range[0]}-{byte_range[1]}"] if byte_range else []
    return curl(world, mirror, f"/v2/{REPOSITORY}/blobs/{digest}", *headers)


def cached_file(cache_dir: Path, digest: str) -> Path:
    hex_ = digest.split(":", 1)[1]
    return cache_dir / "blobs" / "sha256" / hex_[:2] / hex_


def wait_for(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))


def never_wrong(outcome: tuple[int, str, bytes], expected: bytes, status: str) -> bool:
    """True when the response was right; raises if it completed as a success with wrong bytes."""
    code, http, body = outcome
    if code == 0 and http == status:
        assert body == expected, f"a complete {status} with {len(body)} wrong bytes"
        return True
    return False


# --- the cache disk full --------------------------------------------------------------------------------


def test_cache_on_a_tmpfs_smaller_than_the_blob_serves_every_get_and_range(world: World) -> None:
    big, big_data = world.blob(12 * 1024 * 1024, seed=1)
    small, small_data = world.blob(300_000, seed=2)
    with tmpfs(world.workdir / "tiny-cache", "4m") as cache_dir, \
            world.mirror("tiny", cache_dir, max_size="1GiB") as mirror:
        for _ in range(3):
            assert get_blob(world, mirror, big) == (0, "200", big_data)
            assert get_blob(world, mirror, big, (5_000_000, 9_000_000)) == (
                0,
                "206",
                big_data[5_000_000:9_000_001],
            )
        # what fits is still cached (and then served from the cache)
        assert get_blob(world, mirror, small) == (0, "200", small_data)
        wait_for(lambda: cached_file(cache_dir, small).exists(), "the small blob to be cached")
        assert get_blob(world, mirror, small, (10, 20)) == (0, "206", small_data[10:21])
        assert list((cache_dir / "tmp").iterdir()) == []
        assert [r for r in mirror.log_records() if r["level"] in ("error", "critical")] == []


def test_two_fills_that_fit_alone_but_not_together_both_complete(world: World) -> None:
    # socket buffers take several MiB of the slow client's blob at once: it must be much bigger than that, and
    # the disk must fill before the slow fill's last block (store.STAGE_SIZE, 2 MiB): at 22 MiB of 32
    slow, slow_data = world.blob(32 * 1024 * 1024, seed=10)
    fast, fast_data = world.blob(12 * 1024 * 1024, seed=11)
    with tmpfs(world.workdir / "shared-cache", "34m") as cache_dir, \
            world.mirror("shared", cache_dir, max_size="1GiB") as mirror, ThreadPoolExecutor(1) as pool:
        # a slow client's fill goes at its pace; a second blob that fits beside it starts, fills the disk,
        # and the slow fill finds the disk full mid-way: it streams on, uncached
        slow_get = pool.submit(curl, world, mirror, f"/v2/{REPOSITORY}/blobs/{slow}", rate="3M")
        wait_for(lambda: any(entry.stat().st_size >= 1024 * 1024 for entry in (cache_dir / "tmp").iterdir()),
                 "the slow fill to be under way")
        assert get_blob(world, mirror, fast) == (0, "200", fast_data)
        assert slow_get.result() == (0, "200", slow_data)
        assert any(r.get("message") == "cache disk failed mid-fill; streaming on without caching"
                   for r in mirror.log_records()), mirror.log()
        for digest, data in ((slow, slow_data), (fast, fast_data)):  # and again, whatever was cached
            assert get_blob(world, mirror, digest) == (0, "200", data)
            assert get_blob(world, mirror, digest, (1, 4_000_000)) == (0, "206", data[1:4_000_001])


def test_a_cache_dir_remounted_read_only_serves_cached_and_new_content(world: World) -> None:
    cached, cached_data = world.blob(2_000_000, seed=20)
    new, new_data = world.blob(3_000_000, seed=21)
    with tmpfs(world.workdir / "ro-cache", "64m") as cache_dir, \
            world.mirror("ro", cache_dir) as mirror:
        assert get_blob(world, mirror, cached) == (0, "200", cached_data)
        wait_for(lambda: cached_file(cache_dir, cached).exists(), "the blob to be cached")
        subprocess.run(
            ["mount", "-o", "remount,ro", str(cache_dir)], check=True, capture_output=True, timeout=30
        )
        with pytest.raises(OSError):
            (cache_dir / "probe").write_bytes(b"x")
        for _ in range(2):
            assert get_blob(world, mirror, new) == (0, "200", new_data)
            assert get_blob(world, mirror, new, (100, 2_000_000)) == (0, "206", new_data[100:2_000_001])
            assert get_blob(world, mirror, cached) == (0, "200", cached_data)
            assert get_blob(world, mirror, cached, (7, 77)) == (0, "206", cached_data[7:78])
        mirror.stop()
        # started on the read-only disk: it serves what is there, and the rest uncached
        with world.mirror("ro", cache_dir) as restarted:
            for _ in range(2):
                assert get_blob(world, restarted, cached, (7, 77)) == (0, "206", cached_data[7:78])
                assert get_blob(world, restarted, cached) == (0, "200", cached_data)
                assert get_blob(world, restarted, new) == (0, "200", new_data)
                assert get_blob(world, restarted, new, (5, 50)) == (0, "206", new_data[5:51])


# --- the cache disk damaged -----------------------------------------------------------------------------


def test_a_flipped_byte_in_a_cached_blob_is_never_served_as_a_success(world: World) -> None:
    digest, data = world.blob(20_000_000, seed=30)
    small, small_data = world.blob(1_000_000, seed=32)
    cache_dir = world.workdir / "damaged-cache"
    with world.mirror("damaged", cache_dir) as mirror:
        # a small blob is hashed whole before a byte is sent: the damage is found, the right bytes served
        small_path = cached_file(cache_dir, small)
        assert get_blob(world, mirror, small) == (0, "200", small_data)
        wait_for(small_path.exists, "the small blob to be cached")
        flip_byte(small_path, 500_000)
        assert get_blob(world, mirror, small) == (0, "200", small_data)
        wait_for(lambda: small_path.exists() and small_path.read_bytes() == small_data, "a right copy cached")

        path = cached_file(cache_dir, digest)
        assert get_blob(world, mirror, digest) == (0, "200", data)
        wait_for(path.exists, "the blob to be cached")
        for round_ in range(2):
            flip_byte(path, 3_000_000 + round_)
            # whole GET: the last bytes wait for the digest; the damage cuts the connection at worst
            first = get_blob(world, mirror, digest)
            never_wrong(first, data, "200")
            wait_for(lambda: not path.exists() or path.read_bytes() == data, "the damaged copy to be dropped")
            assert get_blob(world, mirror, digest) == (0, "200", data)
            wait_for(
                lambda: path.exists() and path.read_bytes() == data, "the right bytes to be cached again"
            )
        # a range cannot be checked on its own: the whole copy is, before the range is served
        flip_byte(path, 4_000_000)
        assert get_blob(world, mirror, digest, (3_999_000, 4_001_000)) == (
            0,
            "206",
            data[3_999_000:4_001_001],
        )
        wait_for(lambda: path.exists() and path.read_bytes() == data, "the right bytes to be cached again")
        assert get_blob(world, mirror, digest, (0, 99)) == (0, "206", data[:100])
        dropped = [r for r in mirror.log_records() if r.get("message") == "cache entry dropped"]
        assert len(dropped) >= 4


def test_a_blob_damaged_while_the_mirror_was_down_is_checked_after_the_restart(world: World) -> None:
    digest, data = world.blob(4_000_000, seed=31)
    cache_dir = world.workdir / "restart-damaged-cache"
    path = cached_file(cache_dir, digest)
    with world.mirror("restart-damaged", cache_dir) as mirror:
        assert get_blob(world, mirror, digest) == (0, "200", data)
        wait_for(path.exists, "the blob to be cached")
    stat = path.stat()
    flip_byte(path, 1_000_000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as a bad disk would: size and mtime unchanged
    with world.mirror("restart-damaged", cache_dir) as mirror:
        # found on disk at start, so not known to be intact: hashed before it is served, replaced at once
        assert get_blob(world, mirror, digest) == (0, "200", data)
        wait_for(lambda: path.exists() and path.read_bytes() == data, "a right copy to be cached")
        assert get_blob(world, mirror, digest, (5, 55)) == (0, "206", data[5:56])


def put_manifest(world: World) -> tuple[str, bytes]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
                        ).encode()
    config_digest, _ = world.registry.place_blob(REPOSITORY, [config])
    layer_digest, layer = world.blob(1000, seed=40)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    }, indent=2).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    body = world.workdir / "manifest.json"
    body.write_bytes(manifest)
    put = world.pusher.run(["curl", "-sS", "--cacert", str(world.ca.cert_path), "-X", "PUT", "-H",
                            f"Content-Type: {OCI_MANIFEST}", "--data-binary", f"@{body}", "-o", "/dev/null",
                            "-w", "%{http_code}", f"https://{ECR_HOST}/v2/{REPOSITORY}/manifests/v1"])
    assert put.stdout == b"201"
    return digest, manifest


def test_a_flipped_byte_in_a_cached_manifest_is_replaced_before_it_is_served(world: World) -> None:
    digest, manifest = put_manifest(world)
    cache_dir = world.workdir / "manifest-cache"
    path = cached_file(cache_dir, digest)
    with world.mirror("manifest", cache_dir) as mirror:
        def get() -> tuple[int, str, bytes]:
            return curl(world, mirror, f"/v2/{REPOSITORY}/manifests/{digest}", f"Accept: {OCI_MANIFEST}")

        assert get() == (0, "200", manifest)
        wait_for(path.exists, "the manifest to be cached")
        flip_byte(path, len(manifest) // 2)
        assert get() == (0, "200", manifest)  # checked whole before a byte was sent: fetched again
        wait_for(
            lambda: path.exists() and path.read_bytes() == manifest, "the right manifest to be cached again"
        )
        assert get() == (0, "200", manifest)


# --- the process killed mid-fill ------------------------------------------------------------------------


def test_a_mirror_killed_mid_fill_cleans_up_and_serves_the_blob_after_a_restart(world: World) -> None:
    digest, data = world.blob(48 * 1024 * 1024, seed=50)
    cache_dir = world.workdir / "killed-cache"
    mirror = world.mirror("killed", cache_dir).start()
    slow = None
    try:
        # a slow client: the fill goes at its pace, so it is still under way when the process dies
        slow = world.node.start(
            curl_argv(ECR_HOST, mirror.address, f"/v2/{REPOSITORY}/blobs/{digest}", mirror.trust_bundle(),
                      "--limit-rate", "2M", "-o", "/dev/null"),
            "slow-curl",
        )

        def partial() -> bool:
            return any(entry.stat().st_size > 0 for entry in (cache_dir / "tmp").iterdir())

        wait_for(partial, "a partly written temp file")
        mirror.process.signal(signal.SIGKILL)
        wait_for(lambda: not mirror.process.alive(), "the mirror to die")
        assert partial() and not cached_file(cache_dir, digest).exists()
    finally:
        if slow is not None:
            slow.stop()
        mirror.stop()
    with world.mirror("killed", cache_dir) as restarted:
        assert list((cache_dir / "tmp").iterdir()) == []
        assert get_blob(world, restarted, digest) == (0, "200", data)
        assert get_blob(world, restarted, digest, (10, 10_000_000)) == (0, "206", data[10:10_000_001])
