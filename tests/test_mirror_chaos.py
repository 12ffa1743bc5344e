"""Many clients at once doing everything a node's clients do, some of them leaving early, on a small cache.

One dnsmirror node in front of docker-registry; eight workers run 160 jobs chosen by a seeded random
generator: skopeo pulls of multi-arch images, whole blob GETs (checked against their sha256), range
GETs (checked byte for byte), HEADs, and GETs cut off after 50 ms, on blobs from 10 bytes to 20 MB, cold
and cached, with a cache small enough that blobs are evicted while others are served. Every complete
answer must be right; afterwards the mirror must have logged no error, and hold no file open but its own.
"""

from __future__ import annotations

import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dns_support import wait_until
from harness import ECR_HOST, require_netns
from harness.images import build_image, push_image, skopeo_copy
from harness.netns import Cluster, Namespace
from mirror_support import MirrorNode, curl_argv, registry_upstream

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("skopeo") is None or shutil.which("curl") is None,
                       reason="skopeo and curl are needed (scripts/setup.sh)"),
]

BLOB_SIZES = (10, 5000, 300_000, 2_000_000, 7_000_000, 20_000_000)
JOBS = 160
WORKERS = 8


def open_files(pid: int) -> list[str]:
    """Regular files the process holds open."""
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    return sorted(t for t in targets if t.startswith("/") and not t.startswith("/dev/"))


def test_concurrent_pulls_ranges_and_clients_leaving_break_nothing(tmp_path: Path) -> None:
    require_netns()
    rng = random.Random(20261126)
    with Cluster() as cluster, registry_upstream(cluster, tmp_path) as upstream:
        node = cluster.add("node")
        registry, ca, dns, pusher = upstream.registry, upstream.ca, upstream.dns, upstream.pusher
        blobs = {}
        for size in BLOB_SIZES:
            data = rng.randbytes(size)
            blobs[registry.place_blob("chaos/blobs", [data])[0]] = data
        references = []
        for index in range(3):
            reference = f"{ECR_HOST}/chaos/app:v{index}"
            image = build_image(tmp_path / f"image-{index}", tag=f"v{index}", big_layer_size=1_500_000)
            push_image(image, pusher, reference, ca_file=ca.cert_path)
            references.append(reference)
        overrides = {"cache": {"max_size": "24MiB"}}
        with MirrorNode(node, tmp_path / "mirror", dns, ca, overrides) as mirror:
            trust = mirror.trust_bundle()
            files_before = open_files(mirror.process.pid)
            jobs = [(index, rng.choice(["pull", "get", "range", "head", "cut"]), rng.choice(list(blobs)),
                     rng.random(), rng.random()) for index in range(JOBS)]

            def run(job) -> str | None:
                return run_job(job, node, mirror.address, trust, tmp_path, blobs, references)

            with ThreadPoolExecutor(WORKERS) as workers:
                problems = [problem for problem in workers.map(run, jobs) if problem]
            # a fill whose client left (a cut job) goes on to its commit on its own; under load it can
            # outlast the jobs by seconds: its cache file must be closed once it ends, not at once
            files_settled = wait_until(lambda: open_files(mirror.process.pid) == files_before, 60)
            records = mirror.log_records()
            warnings = [record for record in records if record["level"] not in ("debug", "info")]
            assert problems == [], warnings[-10:]

            errors = [record for record in records if record["level"] in ("error", "critical")]
            assert errors == [], errors[:5]
            assert files_settled, open_files(mirror.process.pid)
            served = [record for record in records if record.get("event") == "access"]
            assert len(served) >= JOBS


def run_job(job, node: Namespace, address: str, trust: Path, workdir: Path, blobs: dict[str, bytes],
            references: list[str]) -> str | None:
    """One client action; returns what went wrong, or None."""
    index, kind, digest, first, second = job
    if kind == "pull":
        reference = references[int(first * len(references))]
        target = workdir / f"pulled-{index}"
        done = skopeo_copy(node, f"docker://{reference}", f"oci:{target}:x", ca_file=trust, timeout=120,
                           all_platforms=second < 0.5, check=False)
        shutil.rmtree(target, ignore_errors=True)
        return None if done.returncode == 0 else f"pull {reference}: {done.stderr[-300:]!r}"
    data = blobs[digest]
    path = f"/v2/chaos/blobs/blobs/{digest}"

    def curl(*options: str, max_time: float = 60) -> list[str]:
        return curl_argv(ECR_HOST, address, path, trust, *options, max_time=max_time)

    if kind == "cut":
        node.run(curl("-o", "/dev/null", max_time=0.05), check=False, timeout=90)
        return None
    if kind == "head":
        done = node.run(curl("-I", "-o", "/dev/null", "-w", "%{http_code}"), check=False, timeout=90)
        return None if done.stdout == b"200" else f"HEAD {len(data)}: {done.stdout!r} {done.stderr!r}"
    if kind == "range":
        start = int(first * len(data))
        end = start + int(second * (len(data) - start))
        done = node.run(curl("-H", f"Range: bytes={start}-{end}", "-o", "-"), check=False, timeout=90)
        if done.returncode == 0 and done.stdout == data[start:end + 1]:
            return None
        return f"range {start}-{end} of {len(data)}: {len(done.stdout)} bytes, {done.stderr[-200:]!r}"
    done = node.run(curl("-o", "-"), check=False, timeout=90)
    if done.returncode == 0 and done.stdout == data:
        return None
    return f"GET {len(data)}: {len(done.stdout)} bytes, {done.stderr[-200:]!r}"
