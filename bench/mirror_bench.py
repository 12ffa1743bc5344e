"""Pull mirror benchmarks: dnsmirror against nginx, distribution, and pulling straight from the registry.

Everything runs in network namespaces this script creates (the end-to-end harness of ``tests/``):
Debian's docker-registry with TLS as the upstream of ``123456789012.dkr.ecr.us-east-1.amazonaws.com``
(its DNS is an unbound in the registry namespace), dnsmirror in a "node" namespace whose resolv.conf
points at dnsmirror, and a "direct" namespace whose /etc/hosts sends that name to the registry.
Measured, side by side in one run:

1. throughput of a cached blob (256 MiB) over TLS: dnsmirror against nginx serving the same file with
   an ECDSA certificate; both servers pinned to core 0 (taskset), curl pinned to core 1, HTTP/1.1,
   the median of ``--runs`` downloads each (alternating which server goes first);
2. a cold pull of an image with a big layer (``skopeo copy docker://... oci:DIR``) straight from the
   registry, and through a fresh caching proxy with an empty cache: dnsmirror, nginx ``proxy_cache``
   and docker-registry's pull-through cache (the peers run in a "peer" namespace and are reached
   through /etc/hosts); fresh client each run, ``--pulls`` runs each way, medians; in two placements
   (all sharing both cores; the proxy on a core of its own);
3. dnsmirror's resident memory while streaming a 1 GiB blob to two clients at once, cold (filling
   from upstream while both read) and cached, each on a fresh dnsmirror process: idle VmRSS after a
   warm-up request, and the peak (VmHWM and 10 ms VmRSS samples) above it.

Writes the ``mirror`` section of bench/RESULTS.md. Needs root (namespaces), nginx, curl, skopeo,
docker-registry, unbound, taskset and two cores.

    .venv/bin/python bench/mirror_bench.py --runs 7 --pulls 5
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from harness import ECR_HOST  # noqa: E402
from harness.dns import StaticDNS  # noqa: E402
from harness.images import build_image, push_image, skopeo_copy  # noqa: E402
from harness.netns import Cluster, Namespace, clean_env, netns_available  # noqa: E402
from harness.pki import TestCA, create_ca  # noqa: E402
from harness.registry import Registry  # noqa: E402
from mirror_support import MirrorNode  # noqa: E402
from procstat import cpu_seconds, idle_share, machine_ticks, process_tree, stolen_share  # noqa: E402
from results import machine, write_section  # noqa: E402

SERVER_CORE = "0"
CLIENT_CORE = "1"
MiB = 1024 * 1024
NGINX_PORT = 8443
BLOB_REPOSITORY = "bench/blobs"
PULL_REPOSITORY = "bench/app"


# --- processes -------------------------------------------------------------------------------------


@contextlib.contextmanager
def mirror(node: Namespace, workdir: Path, dns: str, public_ca: TestCA, cache: Path, cpus: str | None = None,
           cache_settings: dict | None = None):
    """A fresh dnsmirror process in ``node`` with its cache in ``cache`` (same CA for every start)."""
    overrides = {"cache": {"dir": str(cache), **(cache_settings or {})},
                 "log": {"format": "json", "level": "warning"}}
    node_mirror = MirrorNode(node, workdir, dns, public_ca, overrides, cpus=cpus)
    node_mirror.start()
    try:
        yield node_mirror
    finally:
        node_mirror.stop()


def start_nginx(namespace: Namespace, workdir: Path, http_block: str, port: int, cpus: str | None):
    """nginx (one worker, pinned to ``cpus`` if given) in ``namespace`` with ``http_block`` inside
    ``http {}``."""
    temp = workdir / "temp"
    temp.mkdir(parents=True)
    # as root, nginx's workers would drop to an account that cannot enter the private temp directory
    user = "user root;" if os.geteuid() == 0 else ""
    (workdir / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  default_type application/octet-stream;
  {http_block}
}}
""")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    argv = [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")]
    process = namespace.start(["taskset", "-c", cpus, *argv] if cpus else argv, "nginx")
    try:
        process.wait_listening(port)
    except BaseException:
        process.stop()
        raise
    return process


@contextlib.contextmanager
def nginx(node: Namespace, workdir: Path, public_ca: TestCA, blob: Path):
    """nginx, one worker pinned to the server core, serving ``blob`` as /blob over TLS (ECDSA P-256)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert = public_ca.issue_server([ECR_HOST], workdir / "tls")
    docroot = workdir / "root"
    docroot.mkdir()
    try:
        os.link(blob, docroot / "blob")
    except OSError:
        shutil.copyfile(blob, docroot / "blob")
    process = start_nginx(node, workdir, f"""
  server {{
    listen {node.address}:{NGINX_PORT} ssl;
    ssl_certificate {cert.chain_path};
    ssl_certificate_key {cert.key_path};
    ssl_protocols TLSv1.2 TLSv1.3;
    root {docroot};
  }}""", NGINX_PORT, SERVER_CORE)
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def nginx_cache(peer: Namespace, workdir: Path, public_ca: TestCA, registry: Registry, cpus: str | None):
    """nginx as a caching TLS reverse proxy of the registry, as a mirror without DNS capture would be.

    ``proxy_cache`` on disk (an empty cache), keep-alive upstream connections, the registry's certificate
    verified; responses stream to the client while they are written to the cache. Yields the processes.
    """
    workdir.mkdir(parents=True)
    cert = public_ca.issue_server([ECR_HOST], workdir / "tls")
    process = start_nginx(peer, workdir, f"""
  proxy_cache_path {workdir}/cache levels=1:2 keys_zone=blobs:10m max_size=10g inactive=1h use_temp_path=off;
  upstream registry {{ server {registry.address}:{registry.port}; keepalive 8; }}
  server {{
    listen {peer.address}:443 ssl;
    ssl_certificate {cert.chain_path};
    ssl_certificate_key {cert.key_path};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass https://registry;
      proxy_http_version 1.1;
      proxy_set_header Host $host;
      proxy_set_header Connection "";
      proxy_ssl_server_name on;
      proxy_ssl_name {ECR_HOST};
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {public_ca.cert_path};
      proxy_ssl_session_reuse on;
      proxy_cache blobs;
      proxy_cache_key $uri;
      proxy_cache_lock on;
      proxy_cache_valid 200 1h;
    }}
  }}""", 443, cpus)
    try:
        yield process_tree(process.pid, children=1)
    finally:
        process.stop()


@contextlib.contextmanager
def distribution_cache(peer: Namespace, workdir: Path, public_ca: TestCA, cpus: str | None):
    """docker-registry (distribution) as a pull-through cache of the registry, an empty storage.

    It reaches the registry by name (the peer namespace's /etc/hosts) and verifies its certificate.
    """
    proxy = Registry(peer, ECR_HOST, public_ca, workdir, trust_file=public_ca.cert_path,
                     extra_config={"proxy": {"remoteurl": f"https://{ECR_HOST}"},
                                   "log": {"level": "warn", "accesslog": {"disabled": True}}})
    with proxy:
        if cpus:
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(proxy.process.pid)], check=True,
                           capture_output=True)
        yield [proxy.process.pid]


def memory_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# --- clients ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Download:
    status: int
    size: int
    speed: float  # bytes/s, as curl reports it
    seconds: float


def curl_argv(url: str, address: str, port: int, cacert: Path, head: bool = False) -> list[str]:
    """curl fetching ``url`` (whose host is ECR_HOST) from ``address:port``, body discarded."""
    return ["curl", "-sS", "--http1.1", "--max-time", "300", "--cacert", str(cacert),
            "--resolve", f"{ECR_HOST}:{port}:{address}", *(["-I"] if head else []), "-o", "/dev/null",
            "-w", "%{http_code} %{size_download} %{speed_download} %{time_total}", url]


def parse_download(output: bytes) -> Download:
    status, size, speed, seconds = output.decode().split()
    return Download(int(status), int(size), float(speed), float(seconds))


def download(namespace: Namespace, url: str, address: str, port: int, cacert: Path, *, expected: int,
             cpu: str | None = None) -> Download:
    """One GET with curl in ``namespace`` (pinned to ``cpu``); fails unless 200 with ``expected`` bytes."""
    argv = curl_argv(url, address, port, cacert)
    done = namespace.run(["taskset", "-c", cpu, *argv] if cpu else argv, timeout=330)
    result = parse_download(done.stdout)
    if result.status != 200 or result.size != expected:
        raise RuntimeError(f"GET {url}: status {result.status}, {result.size} of {expected} bytes")
    return result


def blob_url(digest: str, port: int = 443, repository: str = BLOB_REPOSITORY) -> str:
    netloc = ECR_HOST if port == 443 else f"{ECR_HOST}:{port}"
    return f"https://{netloc}/v2/{repository}/blobs/{digest}"


# --- content ---------------------------------------------------------------------------------------


def random_chunks(size: int, chunk: int = 4 * MiB):
    """``size`` random bytes, ``chunk`` at a time (a big blob never sits in memory whole)."""
    left = size
    while left:
        piece = os.urandom(min(chunk, left))
        left -= len(piece)
        yield piece


def place_blob(registry: Registry, repository: str, size: int) -> tuple[str, Path]:
    """``size`` random bytes in the registry's storage as a blob of ``repository``."""
    return registry.place_blob(repository, random_chunks(size))


# --- the three measurements ------------------------------------------------------------------------


@dataclass
class World:
    cluster: Cluster
    work: Path
    ca: TestCA
    registry: Registry
    dns: str
    node: Namespace
    direct: Namespace
    peer: Namespace  # where the other caching proxies run; its /etc/hosts names the registry
    peer_client: Namespace  # whose /etc/hosts sends the registry's name to the peer

    def mirror(self, cache: Path, cpus: str | None = None, cache_settings: dict | None = None):
        return mirror(self.node, self.work / "mirror", self.dns, self.ca, cache, cpus, cache_settings)


def throughput(world: World, runs: int, size: int, first_reads: int = 0) -> dict:
    """Cached blob over TLS: dnsmirror vs nginx, servers on one core, curl on the other.

    With ``first_reads``, also that many first reads of the cached blob by a restarted dnsmirror: a file
    found on disk at start is hashed while it streams (the ``hashed`` row)."""
    digest, path = place_blob(world.registry, BLOB_REPOSITORY, size)
    rows: dict[str, list[Download]] = {"nginx": [], "dnsmirror": [], "hashed": []}
    cpu: dict[str, float] = {"nginx": 0.0, "dnsmirror": 0.0, "hashed": 0.0}
    with world.mirror(world.work / "cache-throughput", cpus=SERVER_CORE) as node_mirror:
        trust = node_mirror.trust_bundle()
        fill = download(world.node, blob_url(digest), node_mirror.address, 443, trust, expected=size,
                        cpu=CLIENT_CORE)
        # the first cached read once more, so that both servers start warm
        download(
            world.node, blob_url(digest), node_mirror.address, 443, trust, expected=size, cpu=CLIENT_CORE
        )
        with nginx(world.node, world.work / "nginx", world.ca, path) as server:
            nginx_url = f"https://{ECR_HOST}:{NGINX_PORT}/blob"
            download(world.node, nginx_url, world.node.address, NGINX_PORT, world.ca.cert_path, expected=size,
                     cpu=CLIENT_CORE)
            servers = {
                "nginx": (nginx_url, NGINX_PORT, world.ca.cert_path, process_tree(server.pid, children=1)),
                "dnsmirror": (blob_url(digest), 443, trust, [node_mirror.process.pid]),
            }
            for run in range(runs):
                order = ("nginx", "dnsmirror") if run % 2 == 0 else ("dnsmirror", "nginx")
                for name in order:
                    url, port, cacert, pids = servers[name]
                    before = cpu_seconds(pids)
                    rows[name].append(
                        download(
                            world.node, url, world.node.address, port, cacert, expected=size, cpu=CLIENT_CORE
                        )
                    )
                    cpu[name] += cpu_seconds(pids) - before
        for _ in range(first_reads):
            node_mirror.stop()
            node_mirror.start()
            before = cpu_seconds([node_mirror.process.pid])
            rows["hashed"].append(download(world.node, blob_url(digest), node_mirror.address, 443, trust,
                                           expected=size, cpu=CLIENT_CORE))
            cpu["hashed"] += cpu_seconds([node_mirror.process.pid]) - before
    return {"rows": rows, "cpu": cpu, "fill": fill, "size": size}


def cached_report(args: argparse.Namespace, tput: dict, note: str) -> str:
    """The ``mirror-cached`` section: cached throughput against nginx, and a restarted node's first read."""
    size = tput["size"]
    speeds = {name: [d.speed for d in rows] for name, rows in tput["rows"].items() if rows}
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    per_gib = {name: tput["cpu"][name] / (len(speeds[name]) * size / 2**30) for name in speeds}
    command = (f".venv/bin/python bench/mirror_bench.py --cached-only --runs {args.runs} "
               f"--blob-mib {args.blob_mib} --first-reads {args.first_reads}")

    def row(name: str, label: str) -> str:
        values = speeds[name]
        return (f"| {label} | **{mb(medians[name])}** | {mb(min(values))} - {mb(max(values))} | "
                f"{per_gib[name]:.2f} | {len(values)} |")

    hashed = ""
    if "hashed" in medians:
        hashed = (
            f"\n- A restarted dnsmirror's first read of the blob (found on disk at start, so hashed while it "
            f"streams, last MiB held back until the digest matches): "
            f"**{medians['hashed'] / medians['nginx']:.0%} of nginx**; later reads are not hashed again."
        )
    return f"""## Cached blobs with cache verification: dnsmirror vs nginx

Command: `{command}`. The same namespaces and servers as section 1 of the pull mirror section (servers
pinned to core {SERVER_CORE}, curl on core {CLIENT_CORE}, alternating order, a {size // MiB} MiB blob over \
TLS).
Measured: {machine()}. {note}

| server | median MB/s | min - max MB/s | server CPU-seconds per GiB | downloads |
|---|---:|---:|---:|---:|
{row("nginx", "nginx 1 worker")}
{row("dnsmirror", "dnsmirror, from its cache (verified at commit)")}
{row("hashed", "dnsmirror, first read after a restart (hashed)") if "hashed" in speeds else ""}

- **dnsmirror / nginx: {medians["dnsmirror"] / medians["nginx"]:.0%} of nginx's throughput** (target >= \
80%).{hashed}
"""


@contextlib.contextmanager
def pinned(world: World, cpu: str):
    """This process (so every skopeo it starts) and the registry on ``cpu`` only, restored afterwards."""
    everything = os.sched_getaffinity(0)
    registry_pid = str(world.registry.process.pid)
    subprocess.run(["taskset", "-a", "-p", "-c", cpu, registry_pid], check=True, capture_output=True)
    os.sched_setaffinity(0, {int(cpu)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, everything)
        subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, sorted(everything))), registry_pid],
                       check=True, capture_output=True)


PULL_WAYS = ("direct", "dnsmirror", "nginx", "distribution")
PULL_WAY_LABELS = {
    "direct": "direct from the registry",
    "dnsmirror": "through dnsmirror, empty cache",
    "nginx": "through nginx proxy_cache, empty cache",
    "distribution": "through distribution's pull-through cache, empty storage",
}


def cold_pulls(world: World, pulls: int, layer_size: int, image=None, pin: bool = False) -> dict:
    """skopeo copy of one image: straight from the registry, and through each caching proxy started
    fresh with an empty cache (dnsmirror, nginx proxy_cache, distribution's pull-through cache).

    With ``pin``, the proxy runs on core SERVER_CORE and the registry and skopeo share CLIENT_CORE in
    every case: a node where the registry is remote and the mirror has a core's worth of headroom."""
    reference = f"{ECR_HOST}/{PULL_REPOSITORY}:v1"
    if image is None:
        image = build_image(world.work / "pull-image", tag="v1", platforms=("linux/amd64",),
                            big_layer_size=layer_size)
        push_image(image, world.direct, reference, ca_file=world.ca.cert_path)
    big = image.big_layer
    times: dict[str, list[float]] = {name: [] for name in PULL_WAYS}
    proxy_cpu: dict[str, list[float]] = {name: [] for name in PULL_WAYS if name != "direct"}
    proxy_core = SERVER_CORE if pin else None

    @contextlib.contextmanager
    def way(name: str, run: int):
        """(client namespace, CA file it trusts, proxy pids) for one pull the ``name`` way."""
        workdir = world.work / f"pull-{name}-{'pinned' if pin else 'shared'}-{run}"
        try:
            if name == "direct":
                yield world.direct, world.ca.cert_path, []
            elif name == "dnsmirror":
                with world.mirror(workdir / "cache", cpus=proxy_core) as node_mirror:
                    yield world.node, node_mirror.trust_bundle(), [node_mirror.process.pid]
            elif name == "nginx":
                with nginx_cache(world.peer, workdir, world.ca, world.registry, proxy_core) as pids:
                    yield world.peer_client, world.ca.cert_path, pids
            else:
                with distribution_cache(world.peer, workdir, world.ca, proxy_core) as pids:
                    yield world.peer_client, world.ca.cert_path, pids
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def pull(namespace: Namespace, trust: Path, name: str, run: int) -> float:
        target = world.work / f"pulled-{name}-{run}"
        started = time.perf_counter()
        skopeo_copy(
            namespace,
            f"docker://{reference}",
            f"oci:{target}:v1",
            ca_file=trust,
            all_platforms=False,
            timeout=300,
        )
        elapsed = time.perf_counter() - started
        pulled = target / "blobs" / "sha256" / big.digest.split(":", 1)[1]
        if pulled.stat().st_size != big.size:
            raise RuntimeError(f"{name} pull: the big layer is missing or short")
        shutil.rmtree(target)
        return elapsed

    for run in range(pulls):
        # each way goes first, second, ... in turn, so that no way always follows the same one
        shift = run % len(PULL_WAYS)
        for name in PULL_WAYS[shift:] + PULL_WAYS[:shift]:
            with way(name, run) as (namespace, trust, pids):
                before = cpu_seconds(pids)
                with pinned(world, CLIENT_CORE) if pin else contextlib.nullcontext():
                    times[name].append(pull(namespace, trust, name, run))
                if pids:
                    proxy_cpu[name].append(cpu_seconds(pids) - before)
    return {"times": times, "layer": big.size, "image": sum(blob.size for blob in image.blobs()),
            "proxy_cpu": proxy_cpu, "built": image}


COLD_WAYS = ("direct", "dnsmirror", "dnsmirror-buffered", "nginx")
COLD_WAY_LABELS = {
    "direct": "straight from the registry",
    "dnsmirror": "through dnsmirror, empty cache (digest verified; O_DIRECT cache writes, the default)",
    "dnsmirror-buffered": "through dnsmirror, empty cache (digest verified; `cache.direct_writes: false`)",
    "nginx": "through nginx proxy_cache, empty cache (no digest check; buffered cache writes)",
}
# where a cold fill's download goes: one preallocated file in /dev/shm, so no run pays for fresh pages
SHM_TARGET = Path("/dev/shm")


def touch_and_free(size: int = 1024 * MiB) -> None:
    """Touch ``size`` of fresh memory and free it: on this VM freed pages go back to the host, and the next
    writer would page-fault them in one by one (the fetch being timed, or a proxy's cache write)."""
    block = mmap.mmap(-1, size)
    piece = b"\1" * (64 * MiB)
    for _ in range(size // len(piece)):
        block.write(piece)
    block.close()


def fetch_to_file(namespace: Namespace, url: str, address: str, port: int, cacert: Path, target: Path,
                  cpu: str | None) -> Download:
    """curl of ``url`` into ``target`` (written in place from offset 0: no truncation, its pages stay)."""
    argv = ["curl", "-sS", "--http1.1", "--max-time", "300", "--cacert", str(cacert),
            "--resolve", f"{ECR_HOST}:{port}:{address}", "-o", "-",
            "-w", "%{stderr}%{http_code} %{size_download} %{speed_download} %{time_total}", url]
    argv = ["taskset", "-c", cpu, *argv] if cpu else argv
    fd = os.open(target, os.O_WRONLY)
    try:
        done = subprocess.run(namespace.exec_argv(argv), stdout=fd, stderr=subprocess.PIPE, timeout=330,
                              env=clean_env())
    finally:
        os.close(fd)
    return parse_download(done.stderr.strip().splitlines()[-1])


def file_digest(path: Path, size: int) -> str:
    """sha256 of the first ``size`` bytes of ``path``."""
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        left = size
        while left:
            chunk = file.read(min(left, 8 * MiB))
            if not chunk:
                break
            hasher.update(chunk)
            left -= len(chunk)
    return "sha256:" + hasher.hexdigest()


class ColdPlacement(NamedTuple):
    """Where a cold fill's processes run (None: not pinned), its table label and what it stands for."""

    proxy_core: str | None
    client_core: str | None
    registry_core: str | None  # this process is pinned there too
    label: str
    meaning: str


COLD_PLACEMENTS = {
    "shared": ColdPlacement(None, None, None, "nothing pinned",
                            "the registry, curl and the proxy share both cores"),
    "pinned": ColdPlacement(
        SERVER_CORE, CLIENT_CORE, CLIENT_CORE,
        f"proxy on core {SERVER_CORE}, curl and the registry on core {CLIENT_CORE}",
        "a registry is remote: it never takes the proxy's core; the proxy's CPU per GiB sets its rate, up to "
        "what the other core gives the registry and curl together, the row straight from the registry"),
    "node": ColdPlacement(
        SERVER_CORE, SERVER_CORE, CLIENT_CORE,
        f"proxy and curl on core {SERVER_CORE}, the registry on core {CLIENT_CORE}",
        "a node: the client beside the mirror, the registry remote; the proxy and curl share the core"),
}


def cold_fills(world: World, node2: Namespace, runs: int, size: int, placement: str) -> dict:
    """A cold blob with curl: straight from the registry, through dnsmirror (O_DIRECT cache writes, and in
    ``node2`` a second one with buffered writes) and through nginx ``proxy_cache``.

    The proxies are started once (start-up not timed) and warmed up with one blob; each run then places a
    new blob in the registry, so every proxy fetches it cold, and downloads it every way, each way first in
    turn. ``placement`` (of COLD_PLACEMENTS): "shared", nothing pinned; "pinned", the proxies on core
    SERVER_CORE, curl and the registry on CLIENT_CORE (as the cold pulls' placement: a registry is remote and
    never takes the proxy's core); "node", the proxies and curl on SERVER_CORE (a node: the client beside the
    mirror), the registry alone on CLIENT_CORE. CPU: each proxy's user + system time, and the registry's."""
    target = SHM_TARGET / f"dnsmirror-cold-bench-{os.getpid()}"
    with target.open("wb") as file:  # preallocated and touched once: every run overwrites the same pages
        for piece in random_chunks(size):
            file.write(piece)
    proxy_core, client_core, registry_core, _, _ = COLD_PLACEMENTS[placement]
    workdir = world.work / f"cold-{placement}"
    try:
        with world.mirror(workdir / "cache", cpus=proxy_core) as direct_writes, \
                mirror(node2, workdir / "mirror2", world.dns, world.ca, workdir / "cache2", proxy_core,
                       {"direct_writes": False}) as buffered_writes, \
                nginx_cache(world.peer, workdir / "nginx", world.ca, world.registry, proxy_core) as nginxes:
            # (client namespace, address, port, CA file, proxy pids) of each way
            ways = {
                "direct": (world.direct, world.registry.address, world.registry.port, world.ca.cert_path, []),
                "dnsmirror": (world.node, direct_writes.address, 443, direct_writes.trust_bundle(),
                              [direct_writes.process.pid]),
                "dnsmirror-buffered": (node2, buffered_writes.address, 443, buffered_writes.trust_bundle(),
                                       [buffered_writes.process.pid]),
                "nginx": (world.peer_client, world.peer.address, 443, world.ca.cert_path, nginxes),
            }
            with pinned(world, registry_core) if registry_core else contextlib.nullcontext():
                samples = cold_runs(world, ways, runs, size, target, client_core)
    finally:
        target.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {**samples, "size": size, "placement": placement}


def cold_runs(world: World, ways: dict, runs: int, size: int, target: Path, client_core: str | None) -> dict:
    """``runs`` rounds (and one uncounted first) of a new blob downloaded every way of ``ways`` into
    ``target``, each way first in turn. Returns, by way and in the order of the rounds: the downloads
    ("rows"), the proxy's and the registry's CPU-seconds, and the machine's shares idle and stolen."""
    rows: dict[str, list[Download]] = {name: [] for name in COLD_WAYS}
    proxy_cpu: dict[str, list[float]] = {name: [] for name in COLD_WAYS}
    registry_cpu: dict[str, list[float]] = {name: [] for name in COLD_WAYS}
    # the machine's CPU time during each fetch: (share idle, share stolen by the hypervisor)
    machine: dict[str, list[tuple[float, float]]] = {name: [] for name in COLD_WAYS}
    registry_pids = [world.registry.process.pid]
    for run in range(runs + 1):  # the first round warms every way up and is not counted
        digest, _ = place_blob(world.registry, BLOB_REPOSITORY, size)
        shift = run % len(COLD_WAYS)
        for name in COLD_WAYS[shift:] + COLD_WAYS[:shift]:
            namespace, address, port, trust, pids = ways[name]
            touch_and_free()
            before, registry_before = cpu_seconds(pids), cpu_seconds(registry_pids)
            ticks = machine_ticks()
            result = fetch_to_file(namespace, blob_url(digest, port), address, port, trust, target,
                                   client_core)
            ticks_after = machine_ticks()
            spent = cpu_seconds(pids) - before
            registry_spent = cpu_seconds(registry_pids) - registry_before
            if result.status != 200 or result.size != size:
                raise RuntimeError(f"{name}: status {result.status}, {result.size} of {size} bytes")
            if file_digest(target, size) != digest:
                raise RuntimeError(f"{name}: the downloaded blob does not match its digest")
            if run:
                rows[name].append(result)
                proxy_cpu[name].append(spent)
                registry_cpu[name].append(registry_spent)
                machine[name].append(
                    (idle_share(ticks, ticks_after), stolen_share(ticks, ticks_after))
                )
    return {"rows": rows, "proxy_cpu": proxy_cpu, "registry_cpu": registry_cpu, "machine": machine}


def cold_report(args: argparse.Namespace, placements: list[dict], note: str) -> str:
    """The ``mirror-cold`` section: a cold blob fill through dnsmirror and nginx proxy_cache, and direct."""
    size = placements[0]["size"]
    command = (f".venv/bin/python bench/mirror_bench.py --cold-only --runs {args.runs} "
               f"--blob-mib {args.blob_mib}")
    lines = []
    ratios = {}
    paired = []
    for result in placements:
        placement = COLD_PLACEMENTS[result["placement"]].label
        medians = {}
        for name in COLD_WAYS:
            speeds = [d.speed for d in result["rows"][name]]
            medians[name] = statistics.median(speeds)
            gib = size / 2**30
            proxy = (f"{statistics.median(result['proxy_cpu'][name]) / gib:.2f}" if name != "direct" else "")
            registry = statistics.median(result["registry_cpu"][name]) / gib
            idle = statistics.median(share for share, _ in result["machine"][name])
            stolen = statistics.median(share for _, share in result["machine"][name])
            lines.append(f"| {placement} | {COLD_WAY_LABELS[name]} | **{mb(medians[name])}** | "
                         f"{', '.join(mb(s) for s in speeds)} | {proxy} | {registry:.2f} | {idle:.0%} / "
                         f"{stolen:.0%} |")
        ratios[placement] = (medians["dnsmirror"] / medians["nginx"],
                             medians["dnsmirror-buffered"] / medians["nginx"])
        by_round = round_ratios(result["rows"]["dnsmirror"], result["rows"]["nginx"])
        paired.append(f"{placement}: **{statistics.median(by_round):.2f}x** "
                      f"({', '.join(f'{ratio:.2f}' for ratio in by_round)})")
    summary = "; ".join(f"{direct:.2f}x (buffered writes: {buffered:.2f}x) {placement}"
                        for placement, (direct, buffered) in ratios.items())
    placements_text = "; ".join(f"{COLD_PLACEMENTS[result['placement']].label} "
                                f"({COLD_PLACEMENTS[result['placement']].meaning})" for result in placements)
    return f"""## Cold blob fill: dnsmirror vs nginx proxy_cache vs the registry itself

Command: `{command}`. A {size // MiB} MiB blob in docker-registry's storage (TLS, the registry in a
namespace), fetched with curl (`--http1.1`, certificate verified) into one preallocated file in /dev/shm,
1 GiB of memory touched and freed before each timed fetch, the file hashed afterwards (every row is checked
against the digest). The proxies start once with empty caches (start-up not timed) and fetch a
warm-up blob; then each run places a new blob in the registry, so every proxy fetches it cold: dnsmirror
(node namespace, its DNS answering the registry's name; a second one with buffered cache writes in another
namespace) and nginx `proxy_cache` (peer namespace, one worker, keep-alive upstream, certificate verified).
{args.runs} runs, each way first in turn, in each placement: {placements_text}.
Measured: {machine()}. {note}

| placement | way | median MB/s | all runs MB/s | proxy CPU-s per GiB | registry CPU-s per GiB \
| machine idle / stolen |
|---|---|---:|---|---:|---:|---:|
{chr(10).join(lines)}

- **dnsmirror / nginx proxy_cache, cold fill: {summary}** (target >= 1.0x, dnsmirror verifying the digest).
- The same ratio taken round by round (dnsmirror's fetch against nginx's of the same round, minutes apart at
  most, so a slow phase of the VM falls on both), median and each round: {"; ".join(paired)}.
- Machine idle / stolen: the median share of the two cores' time idle (or waiting for I/O), and taken by the
  hypervisor (`steal` in /proc/stat), while each fetch ran.
"""


def round_ratios(ours: list[Download], theirs: list[Download]) -> list[float]:
    """Each round's speed of ``ours`` over that of ``theirs`` (both in the order of their rounds; as many
    of each, or ValueError)."""
    return [mine.speed / other.speed for mine, other in zip(ours, theirs, strict=True)]


class MemorySampler:
    """Samples a process's VmRSS every ``interval`` seconds on a thread, keeping the maximum."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, memory_kib(self.pid, "VmRSS"))
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def two_clients_memory(world: World, node_mirror: MirrorNode, digest: str, size: int) -> dict:
    """Idle RSS after a warm-up HEAD, then the peak while two curls GET the blob at once."""
    trust = node_mirror.trust_bundle()
    pid = node_mirror.process.pid
    head = world.node.run(curl_argv(blob_url(digest), node_mirror.address, 443, trust, head=True), timeout=60)
    if parse_download(head.stdout).status != 200:
        raise RuntimeError(f"warm-up HEAD: {head.stdout!r}")
    time.sleep(0.5)
    idle = memory_kib(pid, "VmRSS")
    argv = world.node.exec_argv(curl_argv(blob_url(digest), node_mirror.address, 443, trust))
    started = time.perf_counter()
    with MemorySampler(pid) as sampler:
        clients = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        outputs = []
        for client in clients:
            try:
                outputs.append(client.communicate(timeout=330))
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
    elapsed = time.perf_counter() - started
    downloads = [parse_download(out) for out, _ in outputs]
    for result, (_, err) in zip(downloads, outputs, strict=True):
        if result.status != 200 or result.size != size:
            raise RuntimeError(
                f"two-client GET: status {result.status}, {result.size} of {size} bytes {err!r}"
            )
    hwm = memory_kib(pid, "VmHWM")
    return {"idle": idle, "peak": max(hwm, sampler.peak), "sampled": sampler.peak, "hwm": hwm,
            "samples": sampler.samples, "seconds": elapsed}


def memory(world: World, size: int) -> dict:
    """Two clients reading a ``size`` blob: cold (fill from upstream meanwhile), then cached."""
    digest, _ = place_blob(world.registry, BLOB_REPOSITORY, size)
    cache = world.work / "cache-memory"
    with world.mirror(cache) as node_mirror:
        cold = two_clients_memory(world, node_mirror, digest, size)
    with world.mirror(cache) as node_mirror:  # a fresh process: its VmHWM covers this case only
        cached = two_clients_memory(world, node_mirror, digest, size)
    return {"cold": cold, "cached": cached, "size": size}


# --- report ----------------------------------------------------------------------------------------


def mb(rate: float) -> str:
    return f"{rate / 1e6:,.0f}"


def pull_rows(placements: dict[str, dict]) -> tuple[str, dict[str, dict[str, float]]]:
    """Markdown rows of the cold-pull table and each proxy's overhead over direct, per placement."""
    rows = []
    overheads: dict[str, dict[str, float]] = {}
    for placement, result in placements.items():
        times = result["times"]
        direct = statistics.median(times["direct"])
        overheads[placement] = {}
        for name in PULL_WAYS:
            median = statistics.median(times[name])
            cpu = result["proxy_cpu"].get(name)
            if name == "direct":
                vs_direct, cpu_cell = "", ""
            else:
                overheads[placement][name] = (median - direct) / direct
                vs_direct = f"**{overheads[placement][name]:+.0%}**" if name == "dnsmirror" else \
                    f"{overheads[placement][name]:+.0%}"
                per_gib = statistics.median(cpu) / (result["layer"] / 2**30)
                cpu_cell = f"{statistics.median(cpu):.2f} ({per_gib:.1f}/GiB)"
            rows.append(
                f"| {placement} | {PULL_WAY_LABELS[name]} | {median:.2f} | {vs_direct} | {cpu_cell} | "
                f"{', '.join(f'{t:.2f}' for t in times[name])} |"
            )
    return "\n".join(rows), overheads


def report(args: argparse.Namespace, tput: dict, pulls: dict, mem: dict) -> str:
    size = tput["size"]
    speeds = {name: [d.speed for d in rows] for name, rows in tput["rows"].items() if rows}
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    ratio = medians["dnsmirror"] / medians["nginx"]
    per_gib = {name: tput["cpu"][name] / (len(speeds[name]) * size / 2**30) for name in speeds}
    command = (f".venv/bin/python bench/mirror_bench.py --runs {args.runs} --pulls {args.pulls} "
               f"--blob-mib {args.blob_mib} --pull-layer-mib {args.pull_layer_mib} --rss-mib {args.rss_mib}")

    def tput_row(name: str, label: str) -> str:
        values = speeds[name]
        return (f"| {label} | **{mb(medians[name])}** | {mb(min(values))} - {mb(max(values))} | "
                f"{per_gib[name]:.2f} |")

    def mem_row(label: str, result: dict) -> str:
        above = (result["peak"] - result["idle"]) / 1024
        return (f"| {label} | {result['idle'] / 1024:.0f} | {result['peak'] / 1024:.0f} | **{above:.0f}** | "
                f"{result['sampled'] / 1024:.0f} ({result['samples']} samples) | {result['seconds']:.1f} |")

    rows, overheads = pull_rows({"shared cores": pulls, "proxy on its own core": pulls["pinned"]})
    cold_above = (mem["cold"]["peak"] - mem["cold"]["idle"]) / 1024
    cached_above = (mem["cached"]["peak"] - mem["cached"]["idle"]) / 1024
    return f"""## Pull mirror: cached throughput vs nginx, cold pull overhead vs caching proxies, memory \
while streaming

Command: `{command}` (run by `make bench`). Network namespaces created by the script: docker-registry (TLS, \
a test
public CA) as the upstream of `{ECR_HOST}`, dnsmirror in a node namespace whose resolv.conf points at \
dnsmirror, a
direct-client namespace whose /etc/hosts names the registry. Log level warning.
Measured: {machine()}. {args.note}

### 1. A cached {size // MiB} MiB blob over TLS, one client

Both servers pinned to core {SERVER_CORE} (taskset), in the node namespace; curl (`--http1.1 -o /dev/null`, \
verifying
the certificate) pinned to core {CLIENT_CORE}; {args.runs} downloads each, alternating which server goes \
first. nginx:
one worker, the same file (a hard link of the registry's copy), ECDSA P-256 certificate, default buffers.

| server | median MB/s | min - max MB/s | server CPU-seconds per GiB |
|---|---:|---:|---:|
{tput_row("nginx", "nginx 1 worker")}
{tput_row("dnsmirror", "dnsmirror, from its cache")}

- **dnsmirror / nginx: {ratio:.0%} of nginx's throughput** (target >= 80%).
- The fill that put the blob in the cache (one client, upstream over the namespaces' veth link):
  {mb(tput["fill"].speed)} MB/s.

### 2. Cold pull, `skopeo copy docker://{ECR_HOST}/{PULL_REPOSITORY}:v1 oci:DIR:v1`

One platform, a {pulls["layer"] / MiB:.0f} MiB uncompressed layer ({pulls["image"] / MiB:.1f} MiB in all, \
pushed with
skopeo). Direct: the registry's address from /etc/hosts. Through dnsmirror: the node's DNS answers \
dnsmirror's address.
The peers, caching TLS proxies without DNS capture, reached through /etc/hosts: nginx with `proxy_cache` \
(one worker,
keep-alive upstream, the registry's certificate verified; it streams while caching and does not check \
digests) and
docker-registry (distribution) as a pull-through cache. Every proxy is a fresh process with an empty cache \
each run
(start-up not timed); a fresh skopeo and destination each run; {args.pulls} runs each way, each way first in \
turn.
Two placements: everything sharing both cores; and the proxy on core {SERVER_CORE} while the registry and \
skopeo share
core {CLIENT_CORE} in every case, direct too (as on a node, where the registry is remote and does not \
compete with the
mirror for the node's CPU). CPU: the proxy's user + system time per pull (median), and per GiB pulled.

| placement | pull | median s | vs direct | proxy CPU s | all runs (s) |
|---|---|---:|---:|---:|---|
{rows}

- **Overhead of the cold pull through dnsmirror: {overheads["shared cores"]["dnsmirror"]:+.0%} sharing the \
cores,
  {overheads["proxy on its own core"]["dnsmirror"]:+.0%} with dnsmirror on its own core** (target < 15%).
- In the same run, nginx `proxy_cache`: {overheads["shared cores"]["nginx"]:+.0%} shared,
  {overheads["proxy on its own core"]["nginx"]:+.0%} on its own core; distribution's pull-through cache:
  {overheads["shared cores"]["distribution"]:+.0%} and \
{overheads["proxy on its own core"]["distribution"]:+.0%}.
  Where dnsmirror's CPU goes: bench/README.md, "What limits a cold pull".

### 3. dnsmirror's memory while two clients stream a {mem["size"] // MiB} MiB blob at once

A fresh dnsmirror process per case; idle = VmRSS after a warm-up HEAD of the blob; peak = the larger of \
VmHWM at the
end and VmRSS sampled every 10 ms. Cold: both clients start together on an empty cache (one upstream fill, \
both read
the growing file); cached: the same blob, now in the cache.

| case | idle MiB | peak MiB | peak above idle MiB | sampled max MiB | seconds |
|---|---:|---:|---:|---:|---:|
{mem_row("cold: filling from upstream while both read", mem["cold"])}
{mem_row("cached", mem["cached"])}

- **Peak above idle: {cold_above:.0f} MiB cold, {cached_above:.0f} MiB cached** (target < 100 MiB).
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=7, help="downloads per server for the throughput comparison"
    )
    parser.add_argument("--pulls", type=int, default=5, help="cold pulls each way")
    parser.add_argument("--blob-mib", type=int, default=256, help="size of the cached blob (throughput)")
    parser.add_argument("--pull-layer-mib", type=int, default=96, help="size of the pulled image's big layer")
    parser.add_argument("--rss-mib", type=int, default=1024, help="size of the blob streamed to two clients")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--cached-only", action="store_true",
                        help="only the cached-throughput comparison (section mirror-cached of RESULTS.md)")
    parser.add_argument("--cold-only", action="store_true",
                        help="only the cold blob fill comparison (section mirror-cold of RESULTS.md)")
    parser.add_argument("--placement", choices=("all", *COLD_PLACEMENTS), default="all",
                        help="with --cold-only: nothing pinned (shared), the proxy on a core of its own "
                        "(pinned), the proxy and curl on one core and the registry on the other (node), "
                        "or all")
    parser.add_argument("--first-reads", type=int, default=3,
                        help="with --cached-only: first reads after a restart (hashed while they stream)")
    parser.add_argument("--note", default="The machine is shared with other work: expect some noise.",
                        help="with --cached-only or --cold-only: what else ran on the machine")
    args = parser.parse_args()
    reason = netns_available()
    if reason is not None:
        raise SystemExit(f"mirror_bench: {reason}")
    missing = [tool for tool in ("nginx", "curl", "skopeo", "docker-registry", "unbound", "taskset")
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if missing or (os.cpu_count() or 1) < 2:
        raise SystemExit(f"mirror_bench: needs two cores and {', '.join(missing) or 'nothing else'} "
                         "(scripts/setup.sh bench)")
    # a SIGTERM unwinds the context managers below, so namespaces and processes are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="dnsmirror-mirror-bench-") as tmp, \
            Cluster(Path(tmp) / "cluster") as cluster:
        work = Path(tmp)
        registry_ns = cluster.add("registry")
        node = cluster.add("node")
        direct = cluster.add("direct", hosts={ECR_HOST: registry_ns.address})
        peer = cluster.add("peer", hosts={ECR_HOST: registry_ns.address})
        peer_client = cluster.add("peer-client", hosts={ECR_HOST: peer.address})
        ca = create_ca(work / "public-ca")
        with Registry(registry_ns, ECR_HOST, ca, work / "registry") as registry, \
                StaticDNS(registry_ns, {ECR_HOST: registry_ns.address}, work / "dns") as dns:
            world = World(cluster, work, ca, registry, dns.address, node, direct, peer, peer_client)
            if args.cold_only:
                node2 = cluster.add("node2")
                placements = [cold_fills(world, node2, args.runs, args.blob_mib * MiB, placement)
                              for placement in (COLD_PLACEMENTS if args.placement == "all" else
                                                (args.placement,))]
                body = cold_report(args, placements, args.note)
                print(body)
                if not args.no_write:
                    write_section("mirror-cold", body)
                return 0
            if args.cached_only:
                body = cached_report(
                    args, throughput(world, args.runs, args.blob_mib * MiB, args.first_reads), args.note
                )
                print(body)
                if not args.no_write:
                    write_section("mirror-cached", body)
                return 0
            tput = throughput(world, args.runs, args.blob_mib * MiB)
            pulls = cold_pulls(world, args.pulls, args.pull_layer_mib * MiB)
            pulls["pinned"] = cold_pulls(
                world, args.pulls, args.pull_layer_mib * MiB, image=pulls["built"], pin=True
            )
            mem = memory(world, args.rss_mib * MiB)
    body = report(args, tput, pulls, mem)
    print(body)
    if not args.no_write:
        write_section("mirror", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
