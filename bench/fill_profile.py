"""Where a cold fill's CPU goes: ``perf record`` on a dnsmirror process while it fills fresh blobs.

The namespaces of ``mirror_bench.py`` (docker-registry with TLS, dnsmirror in a node namespace); one dnsmirror
process, warmed up with one blob, then ``--fills`` cold fills of new ``--blob-mib`` blobs by curl, nothing
pinned, while ``perf record`` samples the process. Prints the process's CPU-seconds per GiB and their split by
thread (the reactor, the disk and cache-write threads) and by library (the interpreter, the kernel, AES-GCM in
pyOpenSSL's OpenSSL, sha256 in hashlib's OpenSSL, memcpy, the allocator). Needs root, ``perf``, ``curl``,
``docker-registry``, ``unbound``.

    .venv/bin/python bench/fill_profile.py --fills 3 --blob-mib 256

Run it from another checkout's directory to profile that checkout's code: ``python -m dnsmirror`` finds the
package of the current directory first.
"""

from __future__ import annotations

import argparse
import collections
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from harness import ECR_HOST  # noqa: E402
from harness.dns import StaticDNS  # noqa: E402
from harness.netns import Cluster, netns_available  # noqa: E402
from harness.pki import create_ca  # noqa: E402
from harness.registry import Registry  # noqa: E402
from mirror_bench import BLOB_REPOSITORY, MiB, World, blob_url, download, place_blob  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

# perf report --sort pid,dso,sym: "  12.34%  1234:python  libc.so.6  [.] symbol"
_ROW = re.compile(r"\s*([\d.]+)%\s+(\d+):\S+\s+(\S+)\s+\[.\]\s+(.*)")


def category(dso: str, symbol: str) -> str:
    if dso.startswith("[kernel"):
        return "kernel"
    if "libcrypto" in dso:
        return "sha256 (hashlib's OpenSSL)"
    if "_rust.abi3" in dso:
        return "AES-GCM and TLS (pyOpenSSL's OpenSSL)"
    if "libpython" in dso or "cpython" in dso or "_cffi" in dso:
        return "Python interpreter and C glue"
    if "libc" in dso:
        return "memcpy" if "mem" in symbol else "malloc and other libc"
    return "other"


def breakdown(perf_data: Path, main_tid: int) -> dict[tuple[str, str], float]:
    """Shares of the samples by (thread, category)."""
    report = subprocess.run(["perf", "report", "-i", str(perf_data), "--no-children", "--sort", "pid,dso,sym",
                             "-g", "none", "--stdio"], capture_output=True, text=True, check=True).stdout
    shares: dict[tuple[str, str], float] = collections.defaultdict(float)
    for line in report.splitlines():
        match = _ROW.match(line)
        if match:
            share, tid, dso, symbol = float(match[1]), int(match[2]), match[3], match[4].strip()
            thread = "reactor thread" if tid == main_tid else "disk and cache-write threads"
            shares[(thread, category(dso, symbol))] += share
    total = sum(shares.values()) or 1.0
    return {key: value / total for key, value in shares.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fills", type=int, default=3)
    parser.add_argument("--blob-mib", type=int, default=256)
    args = parser.parse_args()
    reason = netns_available()
    if reason is not None:
        raise SystemExit(f"fill_profile: {reason}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = args.blob_mib * MiB
    with tempfile.TemporaryDirectory(prefix="dnsmirror-fill-profile-") as tmp, \
            Cluster(Path(tmp) / "cluster") as cluster:
        work = Path(tmp)
        registry_ns, node = cluster.add("registry"), cluster.add("node")
        ca = create_ca(work / "public-ca")
        with Registry(registry_ns, ECR_HOST, ca, work / "registry") as registry, \
                StaticDNS(registry_ns, {ECR_HOST: registry_ns.address}, work / "dns") as dns:
            world = World(cluster, work, ca, registry, dns.address, node, node, node, node)
            digests = [place_blob(registry, BLOB_REPOSITORY, size)[0] for _ in range(args.fills + 1)]
            with world.mirror(work / "cache") as node_mirror:
                trust, pid = node_mirror.trust_bundle(), node_mirror.process.pid
                download(node, blob_url(digests[0]), node_mirror.address, 443, trust, expected=size)
                perf_data = work / "fill.perf"
                perf = subprocess.Popen(["perf", "record", "-F", "499", "-o", str(perf_data), "-p", str(pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                before = cpu_seconds([pid])
                speeds = [
                    download(node, blob_url(digest), node_mirror.address, 443, trust, expected=size).speed
                    for digest in digests[1:]
                ]
                per_gib = (cpu_seconds([pid]) - before) / (args.fills * size / 2**30)
                perf.send_signal(signal.SIGINT)
                perf.wait(60)
            shares = breakdown(perf_data, pid)
    rates = ", ".join(f"{speed / 1e6:.0f}" for speed in speeds)
    print(f"{args.fills} cold fills of {args.blob_mib} MiB: {rates} MB/s; "
          f"dnsmirror {per_gib:.2f} CPU-seconds per GiB")
    for thread in ("reactor thread", "disk and cache-write threads"):
        mine = {name: share for (where, name), share in shares.items() if where == thread}
        print(f"{thread}: {sum(mine.values()) * per_gib:.2f}")
        for name, share in sorted(mine.items(), key=lambda item: -item[1]):
            print(f"  {name}: {share * per_gib:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
